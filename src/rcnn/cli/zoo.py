"""``rcnn models``: the shipped detectors (rcnn.zoo) with their training data, numbers and licences."""

from __future__ import annotations

from rich.table import Table

from rcnn.cli.app import app, console, exits


def _numbers(numbers: dict) -> str:
    """The manifest's headline numbers, one per line (``label value``)."""
    return "\n".join(f"{v['label']} {v['value']}" for v in numbers.values() if isinstance(v, dict) and "label" in v)


@app.command()
def models() -> None:
    """List the shipped detectors: `rcnn detect NAME IMAGE...` runs one, or load it in Python by name."""
    from rcnn import zoo

    with exits(zoo.ZooError):
        entries = zoo.manifest()
    t = Table(title="shipped detectors (rcnn detect NAME IMAGE...)", show_lines=True)
    for col in ("name", "detects", "trained on", "numbers", "licence"):
        t.add_column(col, overflow="fold")
    for m in entries.values():
        classes = ", ".join(m.classes) if len(m.classes) <= 4 else f"{len(m.classes)} names ({', '.join(m.classes[:3])}, ...)"
        t.add_row(m.name, classes, m.trained_on, _numbers(m.numbers) or "-", m.licence)
    console.print(t)
