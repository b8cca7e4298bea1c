"""PASCAL VOC average precision, exactly as the official devkit computes it.

Per class: detections sorted by decreasing score (stable sort); each is matched to the
ground truth box of its image with the highest IoU (VOC's "+1 pixel" IoU, which equals
plain IoU in this library's pixel-edge coordinates, see :mod:`rcnn.boxes`); a match with
``ovmax >= 0.5`` is a TP if that object is not difficult and not yet detected, a FP if it
was already detected (duplicates are FPs), and neither if the object is difficult;
everything else is a FP. ``voc07`` is the 11-point interpolated AP of VOC2007, ``voc2010``
the area under the monotone PR envelope used from VOC2010 on.

The evaluator follows detectron2's ``reset / process / evaluate`` shape.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcnn.boxes import box_iou, voc_to_xyxy, xywh_to_xyxy, xyxy_to_voc, xyxy_to_xywh
from rcnn.data import Dataset, ImageRecord

METRICS = ("voc07", "voc2010")


@dataclass
class Detections:
    """A flat set of detections: ``image_ids`` (N,) str, ``boxes`` (N,4) float32 xyxy,
    ``scores`` (N,) float32, ``labels`` (N,) int64 class indices."""

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.array([], dtype=object), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.image_ids.astype(object) for p in parts]),
            np.concatenate([p.boxes for p in parts]).astype(np.float32),
            np.concatenate([p.scores for p in parts]).astype(np.float32),
            np.concatenate([p.labels for p in parts]).astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class ClassResult:
    """AP of one class with its PR curve. ``ap`` is NaN when the class has no
    non-difficult ground truth (undefined, not 0)."""

    name: str
    ap: float
    npos: int
    num_dets: int
    recall: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)
    tp: np.ndarray = field(repr=False)  # (num_dets,) bool, in score order
    fp: np.ndarray = field(repr=False)


@dataclass
class EvalResult:
    metric: str
    iou_threshold: float
    classes: list[ClassResult]

    @property
    def mean_ap(self) -> float:
        """mAP over classes whose AP is defined (NaN if none is)."""
        aps = [c.ap for c in self.classes if not math.isnan(c.ap)]
        return float(np.mean(aps)) if aps else float("nan")

    def as_dict(self) -> dict:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {
            "metric": self.metric,
            "iou_threshold": self.iou_threshold,
            "mAP": num(self.mean_ap),
            "classes": {c.name: {"ap": num(c.ap), "npos": c.npos, "num_dets": c.num_dets} for c in self.classes},
        }


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """AP from a PR curve (arrays in detection order). ``voc07``: mean over recall
    thresholds 0, 0.1, ..., 1 of the max precision at recall >= t; ``voc2010``: area
    under the monotonically decreasing precision envelope."""
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if metric == "voc07":
        ap = 0.0
        for t in np.linspace(0, 1, 11):  # VOC2007 devkit: t = 0:0.1:1
            p = precision[recall >= t]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    if metric == "voc2010":
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
        return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def evaluate_class(
    gt: dict[str, tuple[np.ndarray, np.ndarray]],
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    metric: str = "voc07",
    iou_threshold: float = 0.5,
    name: str = "",
) -> ClassResult:
    """VOC AP of one class. ``gt`` maps image id -> (boxes (G,4), difficult (G,) bool)
    of this class; detections are given flat."""
    npos = int(sum(int((~d).sum()) for _, d in gt.values()))
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    detected = {k: np.zeros(len(v[0]), bool) for k, v in gt.items()}
    tp = np.zeros(len(order), bool)
    fp = np.zeros(len(order), bool)
    for d, i in enumerate(order):
        g = gt.get(str(image_ids[i]))
        if g is None or len(g[0]) == 0:
            fp[d] = True
            continue
        ov = box_iou(boxes[i : i + 1].astype(np.float32), g[0])[0]
        j = int(np.argmax(ov))
        if ov[j] >= iou_threshold:
            if not g[1][j]:
                if not detected[str(image_ids[i])][j]:
                    tp[d] = True
                    detected[str(image_ids[i])][j] = True
                else:
                    fp[d] = True  # duplicate detection
        else:
            fp[d] = True
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos if npos > 0 else np.zeros(len(order))
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    ap = voc_ap(rec, prec, metric) if npos > 0 else float("nan")
    return ClassResult(name, ap, npos, len(order), rec, prec, tp, fp)


class VOCEvaluator:
    """Accumulates detections image by image and computes per-class VOC AP.

    >>> ev = VOCEvaluator(dataset.classes, dataset.records)
    >>> ev.process("000004", boxes, scores, labels)
    >>> result = ev.evaluate()
    """

    def __init__(self, classes: Sequence[str], records: Iterable[ImageRecord], metric: str = "voc07", iou_threshold: float = 0.5):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        self.classes = list(classes)
        self.records = list(records)
        self.metric = metric
        self.iou_threshold = iou_threshold
        self.reset()

    def reset(self) -> None:
        self._parts: list[Detections] = []

    def process(self, image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        n = len(scores)
        self._parts.append(Detections(np.array([str(image_id)] * n, dtype=object), np.asarray(boxes, np.float32).reshape(-1, 4),
                                      np.asarray(scores, np.float32), np.asarray(labels, np.int64)))

    def process_all(self, dets: Detections) -> None:
        self._parts.append(dets)

    def evaluate(self) -> EvalResult:
        dets = Detections.concat(self._parts)
        known = {r.image_id for r in self.records}
        results = []
        for c, name in enumerate(self.classes):
            gt = {r.image_id: (r.boxes[r.labels == c], r.difficult[r.labels == c]) for r in self.records}
            sel = (dets.labels == c) & np.array([i in known for i in dets.image_ids], bool)
            results.append(evaluate_class(gt, dets.image_ids[sel], dets.boxes[sel], dets.scores[sel], self.metric, self.iou_threshold, name))
        return EvalResult(self.metric, self.iou_threshold, results)


def evaluate_detections(dataset: Dataset, dets: Detections, metric: str = "voc07") -> EvalResult:
    """Per-class VOC AP of ``dets`` against ``dataset``."""
    ev = VOCEvaluator(dataset.classes, dataset.records, metric)
    ev.process_all(dets)
    return ev.evaluate()


# ------------------------------------------------------------------ file formats


def category_ids(dataset: Dataset) -> list[int]:
    """COCO category id of each class: the file's own ids for COCO data, else 1..N."""
    ids = getattr(dataset, "category_ids", None)
    return list(ids) if ids else list(range(1, len(dataset.classes) + 1))


def write_coco_results(dets: Detections, cat_ids: Sequence[int], path: str | Path, image_id_map: dict | None = None) -> Path:
    """COCO results JSON: ``[{image_id, category_id, bbox [x,y,w,h], score}]``.
    ``image_id_map`` maps our string ids to the COCO ids (ints) when they differ."""
    xywh = xyxy_to_xywh(dets.boxes)
    out = []
    for i in range(len(dets)):
        iid = str(dets.image_ids[i])
        out.append({
            "image_id": image_id_map[iid] if image_id_map else (int(iid) if iid.isdigit() else iid),
            "category_id": int(cat_ids[int(dets.labels[i])]),
            "bbox": [round(float(v), 2) for v in xywh[i]],
            "score": round(float(dets.scores[i]), 6),
        })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return path


def read_coco_results(path: str | Path, dataset: Dataset) -> Detections:
    """Read a COCO results JSON against ``dataset`` (image ids matched as strings or,
    for numeric VOC-style ids, as integers)."""
    try:
        rows = json.loads(Path(path).read_text())
        if not isinstance(rows, list):
            raise TypeError("top level is not a list")
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO results file ({e})") from None
    cat_index = {cid: i for i, cid in enumerate(category_ids(dataset))}
    by_int = {int(r.image_id): r.image_id for r in dataset.records if r.image_id.isdigit()}
    ids, boxes, scores, labels = [], [], [], []
    for k, r in enumerate(rows):
        try:
            iid = r["image_id"]
            iid = by_int.get(iid, str(iid)) if isinstance(iid, int) else str(iid)
            cat = cat_index[r["category_id"]]
            ids.append(iid)
            boxes.append(r["bbox"])
            scores.append(float(r["score"]))
            labels.append(cat)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: result {k} is malformed or has an unknown category ({e})") from None
    if not ids:
        return Detections.empty()
    return Detections(np.array(ids, dtype=object), xywh_to_xyxy(np.array(boxes, np.float32)), np.array(scores, np.float32), np.array(labels, np.int64))


def comp4_name(class_name: str) -> str:
    """The file-name form of a class name in comp4 files: characters other than letters, digits,
    ``-`` and ``.`` become ``_`` (``"tv monitor"`` → ``tv_monitor``), so the files need no quoting."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", class_name)


def write_comp4(dets: Detections, classes: Sequence[str], out_dir: str | Path, split: str = "test",
                skip_empty: bool = False) -> list[Path]:
    """VOC ``comp4_det_<split>_<class>.txt`` files: ``image_id score xmin ymin xmax ymax``
    with 1-based inclusive coordinates, one file per class (the devkit's layout; ``<class>`` is
    :func:`comp4_name` of the class). ``skip_empty``: only classes with detections get a file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    voc = xyxy_to_voc(dets.boxes)
    for c, name in enumerate(classes):
        sel = np.nonzero(dets.labels == c)[0]
        if skip_empty and len(sel) == 0:
            continue
        p = out_dir / f"comp4_det_{split}_{comp4_name(name)}.txt"
        p.write_text("".join(f"{dets.image_ids[i]} {dets.scores[i]:.6f} {voc[i,0]:.1f} {voc[i,1]:.1f} {voc[i,2]:.1f} {voc[i,3]:.1f}\n" for i in sel))
        paths.append(p)
    return paths


def read_comp4(path: str | Path, classes: Sequence[str]) -> Detections:
    """Read ``comp4_det_*_<class>.txt`` files: a directory of them, or one file."""
    path = Path(path)
    files = sorted(path.glob("comp4_det_*_*.txt")) if path.is_dir() else [path]
    index = {c: i for i, c in enumerate(classes)}
    parts = []
    for f in files:
        cls = next((c for c in sorted(classes, key=len, reverse=True)
                    if f.stem.endswith("_" + c) or f.stem.endswith("_" + comp4_name(c))), None)
        if cls is None:
            raise ValueError(f"{f}: file name names no class of {list(classes)}")
        rows = [ln.split() for ln in f.read_text().splitlines() if ln.strip()]
        try:
            arr = np.array([[float(v) for v in r[1:6]] for r in rows], np.float64).reshape(-1, 5)
        except ValueError as e:
            raise ValueError(f"{f}: malformed line ({e})") from None
        if arr.shape[0] and any(len(r) != 6 for r in rows):
            raise ValueError(f"{f}: every line must be 'image_id score xmin ymin xmax ymax'")
        parts.append(Detections(np.array([r[0] for r in rows], dtype=object), voc_to_xyxy(arr[:, 1:5]),
                                arr[:, 0].astype(np.float32), np.full(len(rows), index[cls], np.int64)))
    return Detections.concat(parts)


def read_detections(path: str | Path, dataset: Dataset) -> Detections:
    """COCO results JSON (a ``.json`` file) or VOC comp4 text files (a file or folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such detections file or folder")
    if path.is_file() and path.suffix.lower() == ".json":
        return read_coco_results(path, dataset)
    return read_comp4(path, dataset.classes)


def ground_truth_as_detections(dataset: Dataset) -> Detections:
    """Every ground-truth box as a detection of score 1 (a sanity check: AP 1.0)."""
    parts = [Detections(np.array([r.image_id] * len(r.boxes), dtype=object), r.boxes, np.ones(len(r.boxes), np.float32), r.labels) for r in dataset.records]
    return Detections.concat(parts)


def write_coco_gt(dataset: Dataset, path: str | Path) -> Path:
    """Ground truth as a COCO annotation file (for pycocotools and other COCO tools)."""
    cats = category_ids(dataset)
    images, anns = [], []
    for n, r in enumerate(dataset.records, start=1):
        images.append({"id": n, "file_name": Path(r.path).name, "width": r.width, "height": r.height})
        for b, lab, d in zip(xyxy_to_xywh(r.boxes), r.labels, r.difficult, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": cats[int(lab)], "bbox": [float(v) for v in b],
                         "area": float(b[2] * b[3]), "iscrowd": int(d)})
    doc = {"images": images, "annotations": anns, "categories": [{"id": i, "name": c} for i, c in zip(cats, dataset.classes, strict=True)]}
    Path(path).write_text(json.dumps(doc))
    return Path(path)
