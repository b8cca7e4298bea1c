"""The detections an analysis reads: a model file run over a split, or a detections file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcnn.data import Dataset
from rcnn.detect import DetectStats, RCNNModel, detect_dataset
from rcnn.evaluate import Detections, read_detections
from rcnn.progress import ProgressFn


def is_model(path: Path) -> bool:
    """Whether ``path`` is read as a model: detections are COCO .json or comp4 .txt files (or a
    folder of them); any other file is a model (``rcnn train`` writes .rcnn) and
    :meth:`RCNNModel.load` names the file if it is not one."""
    return path.is_file() and path.suffix.lower() not in (".json", ".txt")


def named(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` → ``(NAME, PATH)``; a plain path (also one containing ``=`` that exists) is
    named by its stem."""
    if "=" in spec and not Path(spec).exists():
        name, p = spec.split("=", 1)
        return name, Path(p)
    return Path(spec).stem, Path(spec)


def detections_of(path: Path, ds: Dataset, stats: DetectStats | None = None, progress: ProgressFn | None = None,
                  ) -> tuple[Detections, RCNNModel | None]:
    """Detections of a model file (run over ``ds`` from the caches; ``stats`` collects the images
    it could not read) with the model, or read from a COCO results JSON / comp4 file(s) with
    None. Labels index ``ds.classes`` (a model's classes the dataset lacks are dropped).
    ``FileNotFoundError`` / ``ValueError`` (one line) for a missing or unusable file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model or detections file")
    if not is_model(path):
        return read_detections(path, ds), None
    model = RCNNModel.load(path)
    dets = detect_dataset(model, ds, progress=progress, stats=stats)
    index = {c: i for i, c in enumerate(ds.classes)}
    remap = np.array([index.get(c, -1) for c in model.classes], np.int64)
    if len(dets):
        lab = remap[dets.labels]
        keep = lab >= 0
        dets = Detections(dets.image_ids[keep], dets.boxes[keep], dets.scores[keep], lab[keep])
    return dets, model
