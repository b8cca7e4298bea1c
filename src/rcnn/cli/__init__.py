"""Command-line interface: a thin layer over the library (``rcnn --help``).

Each stage registers its commands on the shared ``app`` in its own module.
"""

from __future__ import annotations

from rcnn.cli import analysis as _analysis  # noqa: F401
from rcnn.cli import dataset as _dataset  # noqa: F401  (registers commands)
from rcnn.cli import dedup as _dedup  # noqa: F401
from rcnn.cli import demo as _demo  # noqa: F401
from rcnn.cli import detect as _detect  # noqa: F401
from rcnn.cli import features as _features  # noqa: F401
from rcnn.cli import finetune as _finetune  # noqa: F401
from rcnn.cli import proposals as _proposals  # noqa: F401
from rcnn.cli import segmentation as _segmentation  # noqa: F401
from rcnn.cli import zoo as _zoo  # noqa: F401
from rcnn.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
