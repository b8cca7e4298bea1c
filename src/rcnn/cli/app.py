"""The shared Typer app and console; command modules register on ``app``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="rcnn",
    help="R-CNN: region proposals → CNN features → per-class SVMs → NMS → VOC AP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one red error line to stderr and return an ``Exit`` to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_model(path: Path, load: Callable[[Path], Any] | None = None) -> Any:
    """The model file ``path`` read by ``load`` (default :meth:`rcnn.detect.RCNNModel.load`), or exit
    (code 2) with the loader's one-line error (every model loader raises a ``ValueError``)."""
    if load is None:
        from rcnn.detect import RCNNModel

        load = RCNNModel.load
    try:
        return load(path)
    except ValueError as e:
        raise fail(str(e), 2) from None
