"""Class-agnostic box tightness: a ridge regressor from a region's CNN feature to its IoU with the object it overlaps most.

Why: a classifier scoring regions (the zero-training detector, :mod:`rcnn.demo`) gives a loose box
around an object, the object's tight box and a part of it nearly the same probability, so the
box that survives NMS is often not the object's. R-CNN's SVMs learn to reject such boxes from hard
negatives (IoU < 0.3, paper §2.3) and its box regressors (appendix C) move them; a classifier
cannot. This scorer learns *localisation quality* without classes: trained on any detection data
(here Penn-Fudan people and BCCD blood cells), its target for a region is the IoU with the
ground-truth box it overlaps most, whatever that object's class. The spatial layout of a pool5
grid says whether an object is cut by the box's border (a part) or sits in a margin of background
(a loose box) — which is not specific to people or cells.

Training regions: the ground-truth boxes (IoU 1) and the proposals whose best IoU is at least
``min_overlap`` (default 0.1: regions *touching* an object; the classifier already separates
objects from background, what it cannot do is rank the boxes of one object). The samples are
balanced over IoU bins (a reservoir per bin, seeded) so that tight boxes are not outnumbered by
loose ones; features are scaled to mean L2 norm 20 as for the SVMs; ridge with an unpenalised
intercept (:func:`rcnn.bbox_regression.ridge_fit`, the dual form below D samples).

A scorer file is one safetensors file: ``w`` ``(D,)``, ``b`` ``(1,)`` and JSON metadata (layer,
feature settings, feature scale, λ, training record).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcnn.bbox_regression import ridge_fit
from rcnn.boxes import box_area, box_iou
from rcnn.cache import atomic_write, read_safetensors
from rcnn.sources import TARGET_NORM, block_norms, block_scale, scale_from_json, scale_to_json, source_blocks

#: training regions: IoU with their best ground truth at least this (regions touching an object)
MIN_OVERLAP = 0.1
#: IoU bins of the balanced sample (upper edges; the last bin holds the ground-truth boxes' IoU 1)
IOU_BINS = (0.3, 0.5, 0.7, 0.9, 1.0001)
#: samples kept per bin (memory: 5 × 1600 × D float16; the dual ridge system is 8000²)
PER_BIN = 1600
LAMBDA = 1000.0
FORMAT = "rcnn-tightness"


@dataclass
class TightnessScorer:
    """``predict(feats)`` → predicted IoU ``(N,)`` of each region with its object, clipped to [0, 1].

    ``w`` ``(D,)`` and ``b`` act on features multiplied by ``feature_scale``; ``feature_options``
    is the :class:`rcnn.features.FeatureConfig` (as a dict) of the ``layer`` features it reads."""

    w: np.ndarray
    b: float
    feature_scale: float | np.ndarray
    layer: str
    feature_options: dict = field(default_factory=dict)
    lam: float = LAMBDA
    min_overlap: float = MIN_OVERLAP
    training: dict = field(default_factory=dict)

    def predict(self, feats: np.ndarray) -> np.ndarray:
        f = np.asarray(feats, np.float32)
        if f.ndim != 2 or f.shape[1] != len(self.w):
            raise ValueError(f"tightness scorer expects (N, {len(self.w)}) {self.layer} features, got {f.shape}")
        return np.clip((f * np.float32(self.feature_scale)) @ self.w + np.float32(self.b), 0.0, 1.0).astype(np.float32)

    def feature_config(self):
        """The :class:`rcnn.features.FeatureConfig` of the features it reads."""
        from dataclasses import fields

        from rcnn.features import FeatureConfig

        names = {f.name for f in fields(FeatureConfig)}
        opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.feature_options.items() if k in names}
        return FeatureConfig(**opts)

    def metadata(self) -> dict:
        return {"format": FORMAT, "layer": self.layer, "feature_options": self.feature_options,
                "feature_scale": scale_to_json(self.feature_scale), "lambda": self.lam,
                "min_overlap": self.min_overlap, "training": self.training}

    def save(self, path: str | Path) -> Path:
        """Write atomically (safetensors, float32 weights + JSON metadata)."""
        from safetensors.numpy import save_file


        tensors = {"w": np.ascontiguousarray(self.w, np.float32), "b": np.array([self.b], np.float32)}
        meta = {"rcnn": json.dumps(self.metadata(), default=_json_default)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> TightnessScorer:
        """Read a scorer file; ``ValueError`` (one line naming the file) if it is not one."""
        meta, (w, b) = read_safetensors(path, ("w", "b"), "a tightness scorer")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or w.ndim != 1 or b.shape != (1,):
            raise ValueError(f"{path}: not a tightness scorer file")
        return cls(w=w.astype(np.float32), b=float(b[0]), feature_scale=scale_from_json(meta["feature_scale"]),
                   layer=meta["layer"], feature_options=meta.get("feature_options", {}),
                   lam=float(meta.get("lambda", LAMBDA)), min_overlap=float(meta.get("min_overlap", MIN_OVERLAP)),
                   training=meta.get("training", {}))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | tuple):
        return list(np.asarray(o).tolist())
    return str(o)


def region_overlaps(record, boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` IoU of each box with the ground-truth box of ``record`` it overlaps most, any class
    (0 when the image has no usable ground truth)."""
    gt = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    gt = gt[box_area(gt) > 0]
    if len(gt) == 0 or len(boxes) == 0:
        return np.zeros(len(boxes), np.float32)
    return np.asarray(box_iou(np.asarray(boxes, np.float32), gt)).max(1).astype(np.float32)


class _Bins:
    """A seeded reservoir of at most ``cap`` rows per IoU bin."""

    def __init__(self, cap: int, rng: np.random.Generator):
        self.cap, self.rng = cap, rng
        self.rows: list[list[tuple[np.ndarray, float]]] = [[] for _ in IOU_BINS]
        self.seen = [0] * len(IOU_BINS)

    def add(self, feats: np.ndarray, ious: np.ndarray) -> None:
        bins = np.searchsorted(np.asarray(IOU_BINS), ious, side="right")
        for f, y, k in zip(feats, ious, bins, strict=True):
            k = min(int(k), len(IOU_BINS) - 1)
            self.seen[k] += 1
            if len(self.rows[k]) < self.cap:
                self.rows[k].append((np.asarray(f, np.float16), float(y)))
            else:
                j = int(self.rng.integers(self.seen[k]))
                if j < self.cap:
                    self.rows[k][j] = (np.asarray(f, np.float16), float(y))

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for b in self.rows for r in b]
        if not rows:
            return np.zeros((0, 0), np.float16), np.zeros(0, np.float32)
        return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows], np.float32)


def sample_regions(
    parts: Sequence[tuple[Sequence, object]], min_overlap: float = MIN_OVERLAP, per_bin: int = PER_BIN, seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The balanced training sample: ``parts`` = ``[(records, source), ...]`` (each a dataset's image
    records and its :class:`rcnn.detect.CNNFeatures`, all of one layer and feature setting).
    Returns features ``(M, D)`` float16, targets ``(M,)`` (IoU) and counts per bin."""
    rng = np.random.default_rng(seed)
    bins = _Bins(per_bin, rng)
    total = sum(len(recs) for recs, _ in parts)
    done = 0
    for recs, source in parts:
        for r in recs:
            boxes, feats = source.regions(r)
            gtf = source.gt_features(r)
            gt = np.asarray(r.boxes, np.float32).reshape(-1, 4)
            ok = box_area(gt) > 0
            ious = region_overlaps(r, boxes)
            sel = ious >= min_overlap
            if ok.any():
                bins.add(np.asarray(gtf, np.float32)[ok], np.ones(int(ok.sum()), np.float32))
            bins.add(np.asarray(feats)[sel], ious[sel])
            done += 1
            if progress:
                progress(done, total)
    X, y = bins.data()
    counts = {f"<{e:.1f}" if e < 1 else "gt/≥0.9": {"seen": s, "kept": len(b)}
              for e, s, b in zip(IOU_BINS, bins.seen, bins.rows, strict=True)}
    return X, y, counts


def fit_tightness(X: np.ndarray, y: np.ndarray, source, lam: float = LAMBDA, min_overlap: float = MIN_OVERLAP,
                  training: dict | None = None) -> TightnessScorer:
    """Ridge ``IoU ≈ w·(scale·x) + b`` on a sample from :func:`sample_regions`; ``source`` (the
    features' :class:`rcnn.detect.CNNFeatures`) gives the layer, settings and blocks."""
    t0 = time.perf_counter()
    X = np.asarray(X, np.float32)
    if len(X) < 2:
        raise ValueError("tightness needs at least 2 training regions")
    blocks = source_blocks(source)
    scale = block_scale(np.maximum(block_norms(X, blocks).mean(0), 1e-12), blocks, TARGET_NORM)
    W, b = ridge_fit(X * np.float32(scale), np.asarray(y, np.float64).reshape(-1, 1), lam)
    opts = source.options() if hasattr(source, "options") else {}
    rec = {**(training or {}), "samples": len(X), "seconds": round(time.perf_counter() - t0, 1)}
    return TightnessScorer(w=W[:, 0], b=float(b[0]), feature_scale=scale, layer=source.layer, feature_options=opts,
                           lam=float(lam), min_overlap=min_overlap, training=rec)


__all__ = ["IOU_BINS", "LAMBDA", "MIN_OVERLAP", "TightnessScorer", "fit_tightness", "region_overlaps", "sample_regions"]
