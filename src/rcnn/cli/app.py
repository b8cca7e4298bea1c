"""The shared Typer app and console; command modules register on ``app``.

Also the CLI-wide behaviour: commands listed in workflow order under panels (``WORKFLOW``),
``rcnn --version``, and usage errors (bad option value, missing argument, unknown option)
printed as one ``error:`` line with exit code 2, like :func:`fail`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from rcnn._version import __version__

# `rcnn --help` lists the commands under these panels, in this order (the order of a project's work).
# A command missing here is listed last under "Other" (tests/test_cli_vocabulary.py fails on it).
WORKFLOW: dict[str, tuple[str, ...]] = {
    "Try it": ("demo", "detect", "models"),
    "Data": ("info", "propose", "proposals-recall"),
    "Train": ("backbones", "features", "train", "bbox-reg", "finetune", "softmax-model"),
    "Evaluate & analyse": ("evaluate", "evaluate-dets", "report", "fp-analysis", "sensitivity", "show-warps", "units"),
    "Segmentation": ("segment-proposals", "segment-train", "segment-evaluate", "segment"),
    "Near-duplicates": ("dedup",),
    "Scale": (),  # Ray runs through `--engine ray` on features / detect / evaluate; its own commands go here
}
_ORDER = {name: (i, panel) for i, (panel, name) in enumerate(
    (panel, name) for panel, names in WORKFLOW.items() for name in names)}

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one red error line to stderr and return an ``Exit`` to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def exits(*errors: type[Exception], code: int = 2, prefix: str = ""):
    """A library error of the types ``errors`` raised in the block becomes one ``error: <prefix><message>``
    line and exit ``code`` (:func:`fail`)."""
    try:
        yield
    except typer.Exit:  # a RuntimeError: already reported
        raise
    except errors as e:
        raise fail(f"{prefix}{e}", code) from None


def print_error(msg: str) -> None:
    """A per-image failure the command goes on after: one ``error:`` line on stderr."""
    err_console.print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)


def print_warning(msg: str) -> None:
    """One ``warning:`` line on stderr."""
    err_console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def print_first(items: Sequence, line: str, more: str | None = None, limit: int = 20, **print_kw) -> None:
    """``line.format(item)`` for the first ``limit`` items, then ``more.format(rest)`` (the count left out)."""
    for x in items[:limit]:
        console.print(line.format(x), **print_kw)
    if more and len(items) > limit:
        console.print(more.format(len(items) - limit))


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1, **table_kw) -> None:
    """A table of strings; the first ``left`` columns left-aligned, the others right-aligned."""
    t = Table(title=title, **table_kw)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


class ConsoleLog(logging.Handler):
    """Library log records (warning and above) as one stderr line each: ``warning: …``; errors as
    ``error: …``, or with ``errors="warning"`` as warnings, or with ``errors=None`` dropped (the
    command reports those itself)."""

    def __init__(self, errors: str | None = "error") -> None:
        super().__init__(logging.WARNING)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        tag = "warning" if record.levelno < logging.ERROR else self.errors
        if tag is not None:
            color = "red" if tag == "error" else "yellow"
            err_console.print(f"[{color}]{tag}:[/] {record.getMessage()}", highlight=False, soft_wrap=True)


@contextmanager
def log_to_console(*loggers: str, errors: str | None = "error"):
    """:class:`ConsoleLog` on ``loggers`` for the duration of a block."""
    handler = ConsoleLog(errors)
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)


def usage_message(e: Exception) -> str:
    """One line for a usage error of the command-line framework: a pydantic conversion message
    ("Input should be a valid integer, unable to parse ...") becomes "'abc' is not a valid integer"."""
    msg = e.format_message() if hasattr(e, "format_message") else str(e)
    cause = e.__cause__
    if cause is not None and hasattr(cause, "errors"):  # pydantic.ValidationError behind typer.BadParameter
        err = cause.errors()[0]
        detail = re.sub(r"^Value error, ", "", err.get("msg", ""))
        m = re.match(r"Input should be (a valid \w+|greater than .*|less than .*?)(,|$)", detail)
        if m:
            detail = f"{err.get('input')!r} is not {m.group(1)}"
        param = getattr(e, "param", None)
        msg = f"invalid value for {param.opts[0] if param is not None and param.opts else 'an option'}: {detail}"
    msg = " ".join(msg.split())
    ctx = getattr(e, "ctx", None)
    return f"{msg} See '{ctx.command_path} --help'." if ctx is not None else msg


# click's UsageError (BadParameter, MissingParameter, NoSuchOption, ...), under whichever click typer uses
UsageError = typer.BadParameter.__base__


@contextmanager
def _one_line_usage_errors():
    try:
        yield
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `rcnn` alone: the help, as the framework prints it
            raise
        raise fail(usage_message(e), 2) from None


class RcnnGroup(TyperGroup):
    """The ``rcnn`` command group: workflow panels and order, one-line usage errors."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name, cmd in self.commands.items():
            cmd.rich_help_panel = _ORDER[name][1] if name in _ORDER else "Other"

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: _ORDER.get(n, (len(_ORDER), ""))[0])

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    name="rcnn",
    cls=RcnnGroup,
    help="R-CNN: region proposals → CNN features → per-class SVMs → NMS → VOC AP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"rcnn {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass
def load_model(path: Path, load: Callable[[Path], Any] | None = None) -> Any:
    """The model file ``path`` read by ``load`` (default :meth:`rcnn.detect.RCNNModel.load`), or exit
    (code 2) with the loader's one-line error (every model loader raises a ``ValueError``)."""
    from rcnn.detect import RCNNModel

    with exits(ValueError):
        return (load or RCNNModel.load)(path)


def open_dataset(path: Path, split: str | None, load: Callable[[Path, str | None], Any] | None = None):
    """The dataset at ``path`` read by ``load`` (default :func:`rcnn.data.load_dataset`), or exit (code 2)
    with one clear error line."""
    from rcnn.data import load_dataset

    with exits(FileNotFoundError, ValueError):  # rcnn.data.AnnotationError is a ValueError
        return (load or load_dataset)(path, split)
