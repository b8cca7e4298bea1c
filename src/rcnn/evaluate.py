"""Detection scores: PASCAL VOC AP exactly as the official devkit computes it, and COCO's metrics.

Per class: detections sorted by decreasing score (stable sort); each is matched to the
ground truth box of its image with the highest IoU (VOC's "+1 pixel" IoU, which equals
plain IoU in this library's pixel-edge coordinates, see :mod:`rcnn.boxes`); a match with
``ovmax >= 0.5`` is a TP if that object is not difficult and not yet detected, a FP if it
was already detected (duplicates are FPs), and neither if the object is difficult;
everything else is a FP. ``voc07`` is the 11-point interpolated AP of VOC2007, ``voc2010``
the area under the monotone PR envelope used from VOC2010 on. :func:`coco_metrics` adds
the COCO numbers (mAP@[.5:.95], AP50, AP75, APs/APm/APl) computed by pycocotools.

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
from rcnn.cache import safe_filename
from rcnn.data import Dataset, ImageRecord
from rcnn.detect import Detections, RCNNModel

METRICS = ("voc07", "voc2010")


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


# -------------------------------------------------------------------- COCO metrics


@dataclass(frozen=True)
class CocoMetrics:
    """COCO box metrics from ``pycocotools.cocoeval.COCOeval``: AP averaged over IoU
    0.50:0.05:0.95 (``ap``, "mAP@[.5:.95]"), at IoU 0.50 and 0.75, and for small (area <
    32² px), medium and large (> 96² px) objects; 101-point interpolated, the 100 best
    detections per image and class (COCOeval's maxDets), averaged over the classes with
    ground truth. NaN where undefined (no ground truth of that size). Difficult objects
    are crowd regions (ignored)."""

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    images: int
    detections: int

    def as_dict(self) -> dict:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {"mAP@[.5:.95]": num(self.ap), "AP50": num(self.ap50), "AP75": num(self.ap75),
                "APs": num(self.ap_small), "APm": num(self.ap_medium), "APl": num(self.ap_large),
                "images": self.images, "detections": self.detections, "evaluator": "pycocotools COCOeval (bbox)"}

    def line(self) -> str:
        """One line: ``COCO mAP@[.5:.95] 0.512 · AP50 0.801 · AP75 0.560 · APs – · APm 0.43 · APl 0.61``."""
        def f(x: float) -> str:
            return "–" if math.isnan(x) else f"{x:.3f}"

        return (f"COCO mAP@[.5:.95] {f(self.ap)} · AP50 {f(self.ap50)} · AP75 {f(self.ap75)} · "
                f"APs {f(self.ap_small)} · APm {f(self.ap_medium)} · APl {f(self.ap_large)}")


def coco_metrics(dataset: Dataset, dets: Detections, det_classes: Sequence[str] | None = None) -> CocoMetrics:
    """COCO mAP@[.5:.95], AP50, AP75, APs/APm/APl of ``dets`` against ``dataset`` with
    pycocotools, the ground truth built in memory. Boxes (pixel-edge xyxy) become COCO
    ``[x, y, w, h]`` and areas ``w * h`` (there are no masks). Difficult objects become
    ``iscrowd=1`` so that, as in VOC, detecting them neither helps nor hurts (COCO matches a
    crowd by the fraction of the detection inside it, where VOC uses IoU >= 0.5).

    Labels of ``dets`` index ``dataset.classes``, or ``det_classes`` when given (matched by
    name; then only the dataset classes among ``det_classes`` are averaged). Detections on
    images not in ``dataset`` are ignored. pycocotools' progress prints are swallowed.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    index = {r.image_id: n for n, r in enumerate(dataset.records, start=1)}
    images = [{"id": n, "width": r.width, "height": r.height} for n, r in enumerate(dataset.records, start=1)]
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(dataset.classes)]
    gt_anns = []
    for n, r in enumerate(dataset.records, start=1):
        for b, lab, d in zip(xyxy_to_xywh(r.boxes).tolist(), r.labels.tolist(), r.difficult.tolist(), strict=True):
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": n, "category_id": int(lab) + 1, "bbox": b,
                            "area": b[2] * b[3], "iscrowd": int(d)})
    labels = np.asarray(dets.labels, np.int64)
    if det_classes is not None:
        own = {c: i for i, c in enumerate(dataset.classes)}
        remap = np.array([own.get(c, -1) for c in det_classes], np.int64)
        ok = (labels >= 0) & (labels < len(remap))
        mapped = np.full(len(labels), -1, np.int64)
        mapped[ok] = remap[labels[ok]]
        labels = mapped
        cat_ids = [own[c] + 1 for c in dict.fromkeys(det_classes) if c in own]
    else:
        cat_ids = [c["id"] for c in cats]
    keep = np.nonzero((labels >= 0) & (labels < len(dataset.classes)) &
                      np.array([str(i) in index for i in dets.image_ids], bool))[0]
    xywh = xyxy_to_xywh(np.asarray(dets.boxes, np.float32).reshape(-1, 4)).tolist()
    dt_anns = [{"id": k + 1, "image_id": index[str(dets.image_ids[i])], "category_id": int(labels[i]) + 1,
                "bbox": xywh[i], "area": xywh[i][2] * xywh[i][3], "score": float(dets.scores[i]), "iscrowd": 0}
               for k, i in enumerate(keep)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": cats}
        dt.dataset = {"images": images, "annotations": dt_anns, "categories": cats}
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.catIds = cat_ids
        if cat_ids and images:
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats = [float(s) for s in ev.stats[:6]]
        else:
            stats = [-1.0] * 6
    s = [math.nan if v < 0 else v for v in stats]  # COCOeval's -1: no ground truth in that range
    return CocoMetrics(*s, images=len(images), detections=len(dt_anns))


# ------------------------------------------------------------------ file formats


def evaluate_model(
    model: RCNNModel, dataset: Dataset, dets: Detections, metric: str = "voc07"
) -> tuple[EvalResult, list[str]]:
    """VOC AP of ``dets`` (labels index ``model.classes``) against ``dataset``, matching classes
    by name. A dataset class the model lacks, or one it could not train, has an undefined AP
    (NaN, left out of the mAP); a dataset class without positives is undefined too. Returns the
    result and the warnings."""
    warnings = []
    index = {c: i for i, c in enumerate(dataset.classes)}
    remap = np.array([index.get(c, -1) for c in model.classes], np.int64)
    extra = [c for c in model.classes if c not in index]
    if extra:
        more = f" and {len(extra) - 10} more" if len(extra) > 10 else ""  # a 100k-class model: one short line
        warnings.append(f"model classes not in the dataset (ignored): {extra[:10]}{more}")
    if len(dets):
        lab = remap[dets.labels]
        sel = lab >= 0
        dets = Detections(dets.image_ids[sel], dets.boxes[sel], dets.scores[sel], lab[sel])
    result = evaluate_detections(dataset, dets, metric)
    for k, c in enumerate(result.classes):
        if c.name not in model.classes:
            warnings.append(f"dataset class {c.name!r} is not in the model: AP undefined")
            result.classes[k] = ClassResult(c.name, math.nan, c.npos, 0, c.recall, c.precision, c.tp, c.fp)
        elif not model.trained[model.classes.index(c.name)]:
            warnings.append(f"class {c.name!r} had no training positives, the model cannot detect it: AP undefined")
            result.classes[k] = ClassResult(c.name, math.nan, c.npos, 0, c.recall, c.precision, c.tp, c.fp)
        elif c.npos == 0:
            warnings.append(f"class {c.name!r} has no (non-difficult) positives in this split: AP undefined")
    return result, warnings


def pr_axes(ax, title: str) -> None:
    """Precision–recall axes (matplotlib ``Axes``): both in [0, 1], labelled, titled, light grid."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def save_pr_curves(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """One precision–recall curve PNG per class with a defined AP (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in result.classes:
        if math.isnan(c.ap):
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot(c.recall, c.precision, lw=1.5)
        pr_axes(ax, f"{c.name}: AP {c.ap:.3f} ({result.metric}, {c.npos} objects)")
        fig.tight_layout()
        p = out_dir / f"pr_{safe_filename(c.name)}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


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

