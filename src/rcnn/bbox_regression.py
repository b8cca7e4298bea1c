"""Bounding-box regression (R-CNN tech report appendix C; the released code's ``bbox_regression/``).

For each class a linear (ridge) regressor maps the pool5-like feature of a proposal ``P`` to the
offsets of its ground-truth box ``G`` (Fast R-CNN's parametrisation of the same targets)::

    t_x = (G_cx - P_cx) / P_w      t_y = (G_cy - P_cy) / P_h
    t_w = log(G_w / P_w)           t_h = log(G_h / P_h)

Training pairs: every region (proposals and the ground-truth boxes themselves, as in the released
feature cache) whose best IoU with a ground-truth box is > 0.6, assigned to that box's class
(released ``rcnn_train_bbox_regressor.m``: ``min_overlap = 0.6``). Features are scaled to mean L2
norm 20 like the SVM features (``rcnn_scale_features``); ridge penalty ``λ = 1000`` (released
code). Differences, on purpose: the intercept is not penalised (targets and features are
centred, scikit-learn's convention); the released code's target whitening is omitted because for
a ridge with one λ it does not change the predictions; its robust re-fit (dropping the worst
quantile) is not done. Samples per class are capped (reservoir sampling, seeded) so memory stays
bounded; the dual (kernel) form is solved when there are fewer samples than feature dimensions.

Optional, not the default: ``lam`` may be a list of candidates, and each class then takes the one
with the lowest held-out squared error of its targets in a K-fold cross-validation *grouped by
image* (overlapping proposals of one object are near-duplicates, so they must not straddle folds).
The released λ = 1000 was set for AlexNet pool5 on VOC; other features and datasets may want
another, and choosing it on the test set would be cheating.

At detection the regressor is applied to every scored region, per class, after scoring and
before NMS (released ``rcnn_test.m`` with ``bbox_reg``), so NMS runs on the refined boxes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.linalg import solve

from rcnn.boxes import box_area, box_iou, clip_boxes
from rcnn.data import ImageRecord
from rcnn.progress import ProgressFn, report
from rcnn.sources import (
    TARGET_NORM,
    FeatureSource,
    block_norms,
    block_scale,
    scale_from_json,
    scale_to_json,
    source_blocks,
)

#: released rcnn_train_bbox_regressor.m: lambda = 1000, min_overlap = 0.6
LAMBDA = 1000.0
MIN_IOU = 0.6
MAX_PER_CLASS = 6000  # bound on training samples per class (memory: 6000 × D float32)
#: exp() guard on predicted log-size offsets (Detectron's BBOX_XFORM_CLIP = log(1000/16))
MAX_LOG_SCALE = float(np.log(1000.0 / 16))


def box_targets(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Regression targets ``(N,4)`` = (dx, dy, log dw, log dh) from boxes ``P`` to ``G`` (both (N,4) xyxy pixel edges)."""
    p = np.asarray(proposals, np.float64).reshape(-1, 4)
    g = np.asarray(gt, np.float64).reshape(-1, 4)
    pw, ph = np.maximum(p[:, 2] - p[:, 0], 1e-6), np.maximum(p[:, 3] - p[:, 1], 1e-6)
    gw, gh = np.maximum(g[:, 2] - g[:, 0], 1e-6), np.maximum(g[:, 3] - g[:, 1], 1e-6)
    pcx, pcy = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    gcx, gcy = g[:, 0] + 0.5 * gw, g[:, 1] + 0.5 * gh
    return np.stack([(gcx - pcx) / pw, (gcy - pcy) / ph, np.log(gw / pw), np.log(gh / ph)], 1).astype(np.float32)


def apply_deltas(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Inverse of :func:`box_targets`: boxes ``(N,4)`` moved by ``deltas`` ``(N,4)`` or ``(N,C,4)`` → same shape as deltas."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    d = np.asarray(deltas, np.float64)
    squeeze = d.ndim == 2
    if squeeze:
        d = d[:, None, :]
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h
    ncx = cx[:, None] + d[..., 0] * w[:, None]
    ncy = cy[:, None] + d[..., 1] * h[:, None]
    nw = w[:, None] * np.exp(np.minimum(d[..., 2], MAX_LOG_SCALE))
    nh = h[:, None] * np.exp(np.minimum(d[..., 3], MAX_LOG_SCALE))
    out = np.stack([ncx - 0.5 * nw, ncy - 0.5 * nh, ncx + 0.5 * nw, ncy + 0.5 * nh], -1).astype(np.float32)
    return out[:, 0] if squeeze else out


def ridge_fit(X: np.ndarray, Y: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept: ``(W (D,K), b (K,))`` minimising
    ``|X W + b - Y|² + lam |W|²``. Solved in the dual when N < D (an N×N system)."""
    X = np.asarray(X, np.float32)
    Y = np.asarray(Y, np.float64)
    xm = X.mean(0, dtype=np.float64).astype(np.float32)
    ym = Y.mean(0)
    Xc = X - xm
    Yc = Y - ym
    n, d = Xc.shape
    if n < d:
        K = (Xc @ Xc.T).astype(np.float64)
        K[np.diag_indices(n)] += lam
        alpha = solve(K, Yc, assume_a="pos")
        W = (Xc.T.astype(np.float64) @ alpha)
    else:
        A = (Xc.T @ Xc).astype(np.float64)
        A[np.diag_indices(d)] += lam
        W = solve(A, Xc.T.astype(np.float64) @ Yc, assume_a="pos")
    b = ym - xm.astype(np.float64) @ W
    return W.astype(np.float32), b.astype(np.float32)


@dataclass
class BoxRegressor:
    """Per-class box regressors over one kind of region feature (stored inside a model file).

    ``W`` ``(C,D,4)`` and ``b`` ``(C,4)`` act on features multiplied by ``feature_scale``;
    ``feature_options`` is the :class:`rcnn.features.FeatureConfig` (as a dict) of those features."""

    classes: list[str]
    W: np.ndarray
    b: np.ndarray
    trained: np.ndarray
    feature_scale: float | np.ndarray  # per dimension for joined taps (rcnn.sources.block_scale)
    layer: str
    feature_options: dict = field(default_factory=dict)
    lam: float | list[float] = LAMBDA  # per class when chosen by cross-validation
    min_iou: float = MIN_IOU
    training: dict = field(default_factory=dict)

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """Offsets ``(N,C,4)`` for raw features ``(N,D)`` (zeros for untrained classes)."""
        f = np.asarray(feats, np.float32) * np.float32(self.feature_scale)
        C, D, _ = self.W.shape
        if f.ndim != 2 or f.shape[1] != D:
            raise ValueError(f"box regressor expects (N, {D}) {self.layer} features, got {f.shape}")
        out = (f @ self.W.transpose(1, 0, 2).reshape(D, C * 4)).reshape(len(f), C, 4) + self.b[None]
        out[:, ~self.trained] = 0.0
        return out

    def refine(self, boxes: np.ndarray, feats: np.ndarray, width: int, height: int) -> np.ndarray:
        """Per-class refined boxes ``(N,C,4)``, clipped to the ``width`` × ``height`` image."""
        out = apply_deltas(boxes, self.predict(feats))
        return np.asarray(clip_boxes(out.reshape(-1, 4), width, height), np.float32).reshape(out.shape)

    # -- features: ``source`` reads this regressor's features (its ``feature_options``), e.g.
    #    :func:`rcnn.detect.regression_source` of the model's scoring source
    def refine_record(self, record: ImageRecord, boxes: np.ndarray, source: FeatureSource) -> np.ndarray:
        """Refined boxes ``(N,C,4)`` of a dataset image's cached proposals ``boxes`` (features from the cache)."""
        rb, feats = source.regions(record)
        if len(rb) != len(boxes) or not np.allclose(rb, boxes, atol=0.01):
            raise ValueError(f"{record.path}: box-regression features are not of the scored proposals")
        return self.refine(boxes, feats, record.width, record.height)

    def refine_image(self, image: np.ndarray, boxes: np.ndarray, source: FeatureSource) -> np.ndarray:
        """Refined boxes ``(N,C,4)`` for a new image (features extracted now)."""
        feats = source.extract(image, boxes)
        return self.refine(boxes, feats, image.shape[1], image.shape[0])

    # -- storage (inside the RCNNModel safetensors file)
    def tensors(self, prefix: str = "bbox_reg.") -> dict[str, np.ndarray]:
        return {prefix + "W": np.ascontiguousarray(self.W, np.float32), prefix + "b": np.ascontiguousarray(self.b, np.float32),
                prefix + "trained": self.trained.astype(np.uint8)}

    def metadata(self) -> dict:
        return {"classes": list(self.classes), "feature_scale": scale_to_json(self.feature_scale), "layer": self.layer,
                "feature_options": self.feature_options, "lambda": self.lam, "min_iou": self.min_iou, "training": self.training}

    @classmethod
    def from_file(cls, meta: dict, tensors: dict[str, np.ndarray], prefix: str = "bbox_reg.") -> BoxRegressor:
        W, b = tensors.get(prefix + "W"), tensors.get(prefix + "b")
        C = len(meta["classes"])
        if W is None or b is None or W.ndim != 3 or W.shape[0] != C or W.shape[2] != 4 or b.shape != (C, 4):
            raise ValueError(f"box regressor tensors do not match its {C} classes")
        return cls(classes=list(meta["classes"]), W=W.astype(np.float32), b=b.astype(np.float32),
                   trained=tensors.get(prefix + "trained", np.ones(C, np.uint8)).astype(bool),
                   feature_scale=scale_from_json(meta["feature_scale"]), layer=meta["layer"],
                   feature_options=meta.get("feature_options", {}), lam=_lam(meta.get("lambda", LAMBDA)),
                   min_iou=float(meta.get("min_iou", MIN_IOU)), training=meta.get("training", {}))


def _lam(v) -> float | list[float]:
    return [float(x) for x in v] if isinstance(v, list) else float(v)


class _Reservoir:
    """Uniform sample of at most ``cap`` rows from a stream (Algorithm R, seeded), with each row's group (image)."""

    def __init__(self, cap: int, rng: np.random.Generator):
        self.cap, self.rng, self.seen = cap, rng, 0
        self.X: np.ndarray | None = None
        self.Y: np.ndarray | None = None
        self.G: np.ndarray | None = None

    def add(self, X: np.ndarray, Y: np.ndarray, group: int = 0) -> None:
        for i in range(len(X)):
            if self.X is None:
                self.X = np.empty((self.cap, X.shape[1]), np.float16)
                self.Y = np.empty((self.cap, 4), np.float32)
                self.G = np.empty(self.cap, np.int64)
            if self.seen < self.cap:
                j = self.seen
            else:
                j = int(self.rng.integers(self.seen + 1))
                if j >= self.cap:
                    self.seen += 1
                    continue
            self.X[j], self.Y[j], self.G[j] = X[i], Y[i], group
            self.seen += 1

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.seen, self.cap)
        if self.X is None:
            return np.zeros((0, 0), np.float32), np.zeros((0, 4), np.float32)
        return self.X[:n], self.Y[:n]

    def groups(self) -> np.ndarray:
        return np.zeros(0, np.int64) if self.G is None else self.G[: min(self.seen, self.cap)]


def cv_lambda(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, lams: Sequence[float], folds: int = 3,
              block: int = 2048) -> tuple[float, list[float]]:
    """The λ of ``lams`` with the lowest mean held-out squared error ``|X W + b - Y|²`` over
    ``folds`` folds grouped by ``groups`` (image index mod ``folds``); returns ``(λ, errors)``.

    Primal form from per-fold sufficient statistics (ΣxxT, ΣxyT, Σx, Σy: one pass over X), so
    each (fold, λ) costs one D×D Cholesky solve; needs ``D`` small enough for a D×D matrix."""
    X = np.asarray(X, np.float32)
    Y = np.asarray(Y, np.float64)
    fold = np.asarray(groups) % folds
    d = X.shape[1]
    stats = []
    for k in range(folds):
        m = fold == k
        A = np.zeros((d, d), np.float64)
        for s in range(0, int(m.sum()), block):  # float32 blocks, float64 accumulation
            xb = X[m][s:s + block]
            A += (xb.T @ xb).astype(np.float64)
        stats.append((int(m.sum()), A, X[m].T.astype(np.float64) @ Y[m], X[m].sum(0, dtype=np.float64), Y[m].sum(0)))
    errs = np.zeros(len(lams))
    counted = 0
    for k in range(folds):
        n_te = stats[k][0]
        n = sum(st[0] for j, st in enumerate(stats) if j != k)
        if n_te == 0 or n < 2:
            continue
        A = sum(st[1] for j, st in enumerate(stats) if j != k)
        B = sum(st[2] for j, st in enumerate(stats) if j != k)
        sx = sum(st[3] for j, st in enumerate(stats) if j != k)
        sy = sum(st[4] for j, st in enumerate(stats) if j != k)
        xm, ym = sx / n, sy / n
        Ac = A - n * np.outer(xm, xm)  # centred (unpenalised intercept, as ridge_fit)
        Bc = B - n * np.outer(xm, ym)
        Xte = X[fold == k].astype(np.float64) - xm
        for li, lam in enumerate(lams):
            Ar = Ac.copy()
            Ar[np.diag_indices(d)] += lam
            W = solve(Ar, Bc, assume_a="pos")
            errs[li] += float(np.square(Xte @ W + ym - Y[fold == k]).sum())
        counted += n_te
    errs /= max(counted, 1)
    return float(lams[int(np.argmin(errs))]), [round(float(e), 6) for e in errs]


def training_pairs(record: ImageRecord, boxes: np.ndarray, min_iou: float = MIN_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of ``boxes`` usable for regression, their class and their targets ``(M,4)``."""
    gt = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    lab = np.asarray(record.labels, np.int64).reshape(-1)
    ok = box_area(gt) > 0
    gt, lab = gt[ok], lab[ok]
    if len(gt) == 0 or len(boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    iou = box_iou(np.asarray(boxes, np.float32), gt)
    best = iou.argmax(1)
    sel = np.flatnonzero((iou.max(1) > min_iou) & (box_area(np.asarray(boxes, np.float32)) > 0))
    return sel, lab[best[sel]], box_targets(boxes[sel], gt[best[sel]])


def train_box_regressor(
    records: Sequence[ImageRecord],
    classes: Sequence[str],
    source: FeatureSource,
    lam: float | Sequence[float] = LAMBDA,
    min_iou: float = MIN_IOU,
    max_per_class: int = MAX_PER_CLASS,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cv_folds: int = 3,
) -> BoxRegressor:
    """Fit one ridge regressor per class on ``source``'s features (a :class:`rcnn.sources.CNNFeatures`,
    pool5 layer by default for R-CNN) of the regions of ``records`` (proposals and ground truth).

    ``lam``: the ridge penalty (released code: 1000), or a list of candidates from which each class
    picks its own by ``cv_folds``-fold cross-validation grouped by image (:func:`cv_lambda`)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    res = [_Reservoir(max_per_class, rng) for _ in classes]
    for i, r in enumerate(records):
        if getattr(source, "pools_boxes", False):  # shared mode: pool only the regions that train a regressor
            allb = np.concatenate([np.asarray(r.boxes, np.float32).reshape(-1, 4), source.region_boxes(r)])
            sel, lab, tgt = training_pairs(r, allb, min_iou)
            feats, rows = source.box_features(r, allb[sel]), np.arange(len(sel))
        else:
            allb, feats = source.labelled_regions(r)
            sel, lab, tgt = training_pairs(r, allb, min_iou)
            rows = sel
        for c in np.unique(lab):
            m = lab == c
            res[c].add(feats[rows[m]], tgt[m], i)
        report(progress, "box-regression samples", i + 1, len(records))
    # one feature scale for all classes: mean L2 norm of the sampled features → 20 (per block for joined taps)
    samples = [x.data()[0] for x in res if x.seen]
    blocks = source_blocks(source)
    norms = np.concatenate([block_norms(x, blocks) for x in samples]) if samples else np.ones((1, len(blocks or [1])))
    scale = block_scale(np.maximum(norms.mean(0), 1e-12), blocks, TARGET_NORM)
    D = int(samples[0].shape[1]) if samples else source.dim
    C = len(classes)
    W = np.zeros((C, D, 4), np.float32)
    b = np.zeros((C, 4), np.float32)
    trained = np.zeros(C, bool)
    counts = []
    lams = [float(x) for x in np.atleast_1d(np.asarray(lam, np.float64))]
    chosen = [lams[0]] * C
    cv: dict[str, list[float]] = {}
    for c, rs in enumerate(res):
        X, Y = rs.data()
        counts.append({"seen": rs.seen, "used": len(X)})
        if len(X) < 2:
            continue
        Xs = X.astype(np.float32) * np.float32(scale)
        if len(lams) > 1:
            chosen[c], cv[classes[c]] = cv_lambda(Xs, Y, rs.groups(), lams, cv_folds)
        W[c], b[c] = ridge_fit(Xs, Y, chosen[c])
        trained[c] = True
    lam_out: float | list[float] = lams[0] if len(lams) == 1 else chosen
    return BoxRegressor(classes=list(classes), W=W, b=b, trained=trained, feature_scale=scale, layer=source.layer,
                        feature_options=source.options(), lam=lam_out, min_iou=min_iou,
                        training={"images": len(records), "samples": dict(zip(classes, counts, strict=True)),
                                  "seconds": round(time.perf_counter() - t0, 1), "max_per_class": max_per_class,
                                  **({"lambda_candidates": lams, "cv_folds": cv_folds, "cv_error": cv} if cv else {})})


def attach(model: Any, regressor: BoxRegressor) -> Any:
    """Store ``regressor`` in ``model`` (an :class:`rcnn.detect.RCNNModel`), checking classes and network."""
    if list(regressor.classes) != list(model.classes):
        raise ValueError(f"regressor classes {regressor.classes} differ from the model's {model.classes}")
    model.bbox_reg = regressor
    return model


__all__ = ["LAMBDA", "MIN_IOU", "BoxRegressor", "apply_deltas", "attach", "box_targets", "cv_lambda", "ridge_fit",
           "train_box_regressor",
           "training_pairs"]
