"""The library's one ``rich`` progress bar (every stage uses it, so they all look alike)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``12.5 img/s``."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"– {self.unit}/s")


def progress_bar(
    *extra: ProgressColumn | str, console: Console | None = None, disable: bool = False, transient: bool = False
) -> Progress:
    """Description, bar, done/total, ``extra`` columns (a string becomes a ``TextColumn``, e.g.
    ``"{task.fields[info]}"``, whose field must then be given to ``add_task``), elapsed time, ETA."""
    cols = [c if isinstance(c, ProgressColumn) else TextColumn(c) for c in extra]
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *cols,
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=disable, transient=transient,
    )
