"""The PASCAL VOC segmentation measure.

Per class (background included): IoU = TP / (TP + FP + FN), accumulated over *all pixels
of the split* (not averaged per image); pixels labelled 255 in the ground truth (VOC's
void boundary band) are ignored. The score is the mean over classes. A class that never
occurs in the ground truth nor in the predictions has an undefined IoU (NaN) and is left
out of the mean, as the devkit leaves out classes without pixels.
"""

from __future__ import annotations

import numpy as np

from rcnn.segmentation.masks import VOID


class SegmentationEvaluator:
    """Accumulates a confusion matrix over images (``reset / process / evaluate``).

    ``num_classes`` counts background: labels are 0 (background) .. num_classes-1.
    """

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError("num_classes counts background and must be >= 2")
        self.n = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.n, self.n), np.int64)  # rows: truth, cols: prediction

    def process(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: ``gt`` (H,W) uint8 with 255 = void, ``pred`` (H,W) integer labels."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"prediction is {pred.shape[::-1]} but ground truth is {gt.shape[::-1]}")
        valid = gt != VOID
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        if (g >= self.n).any() or (p >= self.n).any() or (p < 0).any():
            raise ValueError(f"labels must be in 0..{self.n - 1} (or 255 void in the ground truth)")
        self.confusion += np.bincount(g * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def iou(self) -> np.ndarray:
        """(num_classes,) float64 per-class IoU (NaN where the class has no pixels at all)."""
        tp = np.diag(self.confusion).astype(np.float64)
        denom = self.confusion.sum(0) + self.confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def evaluate(self, class_names: list[str] | None = None) -> dict:
        """``{"iou": {name: IoU}, "mean_iou": mean over defined classes, "pixel_accuracy": ...}``."""
        iou = self.iou()
        names = class_names or [str(i) for i in range(self.n)]
        total = self.confusion.sum()
        return {
            "iou": {names[i]: (None if np.isnan(v) else float(v)) for i, v in enumerate(iou)},
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "pixel_accuracy": float(np.trace(self.confusion) / total) if total else float("nan"),
            "pixels": int(total),
        }


def mean_iou(confusion: np.ndarray) -> float:
    """VOC mean IoU of a (C,C) confusion matrix (rows truth, columns prediction); classes
    without any pixel are left out."""
    c = np.asarray(confusion, np.float64)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1) - tp
    ok = denom > 0
    return float((tp[ok] / denom[ok]).mean()) if ok.any() else float("nan")


def image_confusions(gts: list[np.ndarray], preds: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(N,C,C) int64 confusion matrix of each (ground truth, prediction) pair of label maps."""
    out = []
    for g, p in zip(gts, preds, strict=True):
        ev = SegmentationEvaluator(num_classes)
        ev.process(g, p)
        out.append(ev.confusion)
    return np.stack(out) if out else np.zeros((0, num_classes, num_classes), np.int64)


def paired_bootstrap(conf_a: np.ndarray, conf_b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """How sure is "method a beats method b" on this set of images? ``conf_a`` / ``conf_b``:
    (N,C,C) per-image confusions of the two methods on the *same* N images. Images are
    resampled with replacement (the same draw for both, so the comparison is paired) and the
    VOC mean IoU recomputed over each draw. Returns the difference on the full set
    (``a - b``), its 95 % percentile interval, and the fraction of draws where a > b."""
    conf_a, conf_b = np.asarray(conf_a), np.asarray(conf_b)
    if conf_a.shape != conf_b.shape or conf_a.ndim != 3 or len(conf_a) == 0:
        raise ValueError(f"need two (N,C,C) confusion stacks of the same images, got {conf_a.shape} and {conf_b.shape}")
    rng = np.random.default_rng(seed)
    n = len(conf_a)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        diffs[i] = mean_iou(conf_a[idx].sum(0)) - mean_iou(conf_b[idx].sum(0))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": mean_iou(conf_a.sum(0)) - mean_iou(conf_b.sum(0)), "ci95": [float(lo), float(hi)],
            "p_a_better": float((diffs > 0).mean()), "images": n, "draws": n_boot}


def segmentation_iou(gts: list[np.ndarray], preds: list[np.ndarray], num_classes: int) -> dict:
    """VOC measure over a list of (ground truth, prediction) label maps."""
    ev = SegmentationEvaluator(num_classes)
    for g, p in zip(gts, preds, strict=True):
        ev.process(g, p)
    return ev.evaluate()
