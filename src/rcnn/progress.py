"""Progress reports: the one callback type long-running library functions accept.

The library draws nothing. A function that loops over images takes ``progress`` (a
:data:`ProgressFn`, or ``None`` for silence) and calls it after each item with a :class:`Step`;
the command line draws the steps as ``rich`` bars (:mod:`rcnn.cli.progress`), other callers can
log them or ignore them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """``done`` of ``total`` items of ``task`` are finished. ``task`` names the stage (one bar per
    distinct task, e.g. ``"proposals (rcnn-fast)"``); ``info`` is a short status (rates, losses)."""

    task: str
    done: int
    total: int
    info: str = ""


#: What ``progress=`` accepts: called from the calling thread after each item.
ProgressFn = Callable[[Step], None]


def report(progress: ProgressFn | None, task: str, done: int, total: int, info: str = "") -> None:
    """Call ``progress`` (when given) with one :class:`Step`."""
    if progress is not None:
        progress(Step(task, done, total, info))


def tracked(items: Iterable[T], progress: ProgressFn | None, task: str) -> Iterator[T]:
    """Yield ``items``, reporting a :class:`Step` of ``task`` after each one has been handled."""
    items = list(items)
    report(progress, task, 0, len(items))
    for i, x in enumerate(items):
        yield x
        report(progress, task, i + 1, len(items))


__all__ = ["ProgressFn", "Step", "report", "tracked"]
