"""The command line's progress bars: the library's :class:`rcnn.progress.Step` reports drawn with ``rich``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rcnn.cli.app import console
from rcnn.progress import ProgressFn, Step


@contextmanager
def show_progress(transient: bool = False) -> Iterator[ProgressFn]:
    """A :data:`rcnn.progress.ProgressFn` drawing one bar per task while the block runs: description,
    bar, done/total, the task's ``info`` field, elapsed time, ETA (on the CLI's console)."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=console, transient=transient) as bar:
        tasks: dict[str, int] = {}

        def show(step: Step) -> None:
            if step.task not in tasks:
                tasks[step.task] = bar.add_task(step.task, total=step.total, info="")
            bar.update(tasks[step.task], completed=step.done, total=step.total, info=step.info)

        yield show
