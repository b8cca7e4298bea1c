"""Learned ranking of mask proposals (CPMC's ranking stage, paper §4).

CPMC does not keep its figure-ground segments in generation order: it describes each one
with mid-level cues (size, position, shape, boundary contrast, colour contrast with the
rest of the image) and ranks them by a regressor trained to predict the segment's best
overlap with a ground-truth object. This module does the same for our candidates:

* :class:`SegmentStats` — per-label statistics of one label map (areas, centroids, boxes,
  colour histograms, gradient energy, neighbour boundaries with their contrast);
* :func:`describe` — ``(R,F)`` descriptors of ``R`` regions given as ``(R,n)`` bool
  membership over the map's labels (vectorised: a region's cue is a sum over its labels);
* :class:`ForestRanker` — scikit-learn's ``RandomForestRegressor`` trained on
  (descriptor, best IoU) pairs, exported to plain arrays (``.npz``, no pickle) and
  evaluated with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

FEATURES = (
    "log_area", "box_w", "box_h", "log_aspect", "fill", "cx", "cy", "box_cx", "box_cy",
    "touch_left", "touch_right", "touch_top", "touch_bottom", "perimeter_ratio", "boundary_grad",
    "interior_grad", "grad_contrast", "colour_contrast", "colour_spread", "level", "is_pair",
)


@dataclass
class SegmentStats:
    """Statistics of an ``(h,w)`` label map with labels ``0..n-1`` over an RGB image."""

    shape: tuple[int, int]
    area: np.ndarray  # (n,) pixels
    sx: np.ndarray  # (n,) sum of x (pixel centres)
    sy: np.ndarray
    box: np.ndarray  # (n,4) pixel-edge xyxy
    hist: np.ndarray  # (n,B) colour histogram counts (Lab, 4x4x4 bins... see from_labels)
    grad: np.ndarray  # (n,) summed gradient magnitude
    pair_i: np.ndarray  # (P,) neighbouring label pairs
    pair_j: np.ndarray
    pair_len: np.ndarray  # (P,) boundary length in pixel edges
    pair_grad: np.ndarray  # (P,) summed gradient along that boundary

    @classmethod
    def from_labels(cls, image: np.ndarray, labels: np.ndarray, bins: int = 6) -> SegmentStats:
        h, w = labels.shape
        n = int(labels.max()) + 1
        flat = labels.ravel().astype(np.int64)
        area = np.bincount(flat, minlength=n).astype(np.float64)
        yy, xx = np.mgrid[0:h, 0:w]
        sx = np.bincount(flat, weights=xx.ravel() + 0.5, minlength=n)
        sy = np.bincount(flat, weights=yy.ravel() + 0.5, minlength=n)
        box = np.tile(np.array([np.inf, np.inf, -np.inf, -np.inf]), (n, 1))
        for i, sl in enumerate(ndimage.find_objects(labels.astype(np.int32) + 1, max_label=n)):
            if sl is not None:
                box[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2Lab)
        q = (lab.astype(np.int64) * bins) // 256
        code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
        hist = np.bincount(flat * bins**3 + code.ravel(), minlength=n * bins**3).reshape(n, bins**3).astype(np.float32)
        blur = cv2.GaussianBlur(lab.astype(np.float32), (0, 0), 1.0)
        gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)
        g = np.sqrt((gx * gx + gy * gy).sum(2))
        grad = np.bincount(flat, weights=g.ravel(), minlength=n)
        a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()]).astype(np.int64)
        b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()]).astype(np.int64)
        ge = np.concatenate([np.maximum(g[:, :-1], g[:, 1:]).ravel(), np.maximum(g[:-1, :], g[1:, :]).ravel()])
        d = a != b
        pc = np.minimum(a[d], b[d]) * n + np.maximum(a[d], b[d])
        u, inv = np.unique(pc, return_inverse=True)
        return cls((h, w), area, sx, sy, box, hist, grad, u // n, u % n,
                   np.bincount(inv).astype(np.float64), np.bincount(inv, weights=ge[d]))

    @property
    def n(self) -> int:
        return int(self.area.shape[0])


def describe(members: np.ndarray, st: SegmentStats, level: np.ndarray | None = None,
             is_pair: np.ndarray | None = None) -> np.ndarray:
    """``(R,F)`` float32 descriptors (:data:`FEATURES`) of regions ``members`` (R,n) bool.

    ``level``: (R,) position in its hierarchy in [0,1] (0 = top); ``is_pair``: (R,) 1 for
    the union of two regions. Both default to 0.
    """
    m = np.asarray(members, bool)
    R = m.shape[0]
    h, w = st.shape
    npx = float(h * w)
    mf = m.astype(np.float32)
    area = mf @ st.area.astype(np.float32)
    safe = np.maximum(area, 1.0)
    x1 = np.where(m, st.box[:, 0], np.inf).min(1)
    y1 = np.where(m, st.box[:, 1], np.inf).min(1)
    x2 = np.where(m, st.box[:, 2], -np.inf).max(1)
    y2 = np.where(m, st.box[:, 3], -np.inf).max(1)
    bw, bh = np.maximum(x2 - x1, 1), np.maximum(y2 - y1, 1)
    cx = (mf @ st.sx.astype(np.float32)) / safe / w
    cy = (mf @ st.sy.astype(np.float32)) / safe / h
    # boundary of the region = neighbour pairs with exactly one side inside
    cut = (m[:, st.pair_i] != m[:, st.pair_j]).astype(np.float32)
    blen = cut @ st.pair_len.astype(np.float32)
    bgrad = (cut @ st.pair_grad.astype(np.float32)) / np.maximum(blen, 1)
    igrad = (mf @ st.grad.astype(np.float32)) / safe
    # colour contrast: 1 - histogram intersection of the region with the rest of the image
    hin = mf @ st.hist
    hout = st.hist.sum(0)[None] - hin
    pin = hin / np.maximum(hin.sum(1, keepdims=True), 1)
    pout = hout / np.maximum(hout.sum(1, keepdims=True), 1)
    ccontrast = 1.0 - np.minimum(pin, pout).sum(1)
    spread = (pin > 0.01).sum(1) / st.hist.shape[1]
    out = np.stack([
        np.log(safe / npx), bw / w, bh / h, np.log(bh / bw), area / (bw * bh), cx, cy,
        (x1 + x2) / 2 / w, (y1 + y2) / 2 / h,
        x1 <= 0.5, x2 >= w - 0.5, y1 <= 0.5, y2 >= h - 0.5,
        blen / np.sqrt(safe), bgrad, igrad, bgrad / np.maximum(igrad, 1e-3), ccontrast, spread,
        np.zeros(R) if level is None else level, np.zeros(R) if is_pair is None else is_pair,
    ], 1)
    return np.nan_to_num(out.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


class ForestRanker:
    """A regression forest as plain arrays; ``predict`` averages the trees' leaf values.

    Arrays (one row per node, trees concatenated): ``left``/``right`` child index (-1 at a
    leaf, global indices), ``feature``, ``threshold``, ``value``; ``roots`` (T,).
    """

    def __init__(self, left, right, feature, threshold, value, roots, features=FEATURES):
        self.left, self.right = np.asarray(left, np.int64), np.asarray(right, np.int64)
        self.feature, self.threshold = np.asarray(feature, np.int64), np.asarray(threshold, np.float64)
        self.value, self.roots = np.asarray(value, np.float64), np.asarray(roots, np.int64)
        self.features = tuple(features)

    @classmethod
    def from_sklearn(cls, forest) -> ForestRanker:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("left", "right", "feature", "threshold", "value")}
        roots, off = [], 0
        for est in forest.estimators_:
            t = est.tree_
            roots.append(off)
            leaf = t.children_left < 0
            parts["left"].append(np.where(leaf, -1, t.children_left + off))
            parts["right"].append(np.where(leaf, -1, t.children_right + off))
            parts["feature"].append(np.where(leaf, 0, t.feature))
            parts["threshold"].append(t.threshold)
            parts["value"].append(t.value.reshape(t.node_count, -1)[:, 0])
            off += t.node_count
        return cls(*(np.concatenate(parts[k]) for k in ("left", "right", "feature", "threshold", "value")), roots)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(R,) predicted best IoU of rows ``X`` (R,F)."""
        X = np.asarray(X, np.float64)
        if X.shape[1] != len(self.features):
            raise ValueError(f"ranker expects {len(self.features)} features, got {X.shape[1]}")
        out = np.zeros(len(X))
        rows = np.arange(len(X))
        for r in self.roots:
            node = np.full(len(X), r)
            while True:
                inner = self.left[node] >= 0
                if not inner.any():
                    break
                ni = node[inner]
                go_left = X[rows[inner], self.feature[ni]] <= self.threshold[ni]
                node[inner] = np.where(go_left, self.left[ni], self.right[ni])
            out += self.value[node]
        return out / len(self.roots)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, left=self.left.astype(np.int32), right=self.right.astype(np.int32),
                            feature=self.feature.astype(np.int16), threshold=self.threshold.astype(np.float32),
                            value=self.value.astype(np.float32), roots=self.roots.astype(np.int32),
                            features=np.array(self.features))

    @classmethod
    def load(cls, path: str | Path) -> ForestRanker:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["left"], z["right"], z["feature"], z["threshold"], z["value"], z["roots"],
                       [str(f) for f in z["features"]])


def train_ranker(X: np.ndarray, y: np.ndarray, n_trees: int = 40, max_depth: int = 12, seed: int = 0) -> ForestRanker:
    """Fit a ``RandomForestRegressor`` on descriptors ``X`` (R,F) and best IoUs ``y`` (R,)."""
    from sklearn.ensemble import RandomForestRegressor

    rf = RandomForestRegressor(n_estimators=n_trees, max_depth=max_depth, min_samples_leaf=5,
                               max_features=0.5, n_jobs=1, random_state=seed)
    rf.fit(np.asarray(X, np.float32), np.asarray(y, np.float32))
    return ForestRanker.from_sklearn(rf)
