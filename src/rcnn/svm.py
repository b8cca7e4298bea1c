"""Per-class linear SVMs trained with hard-negative mining (paper §2.3, released ``rcnn_train.m``).

Training data for class ``c`` (paper §2.3):

* positives: the ground-truth boxes of ``c`` that are not ``difficult``, described by features
  computed exactly like the proposals' features;
* negatives: regions (proposals, and ground-truth boxes of *other* classes, as in the released
  code's feature cache) whose IoU with every instance of ``c`` (difficult ones included) is
  ``< 0.3``; regions in the grey zone ``[0.3, 1)`` are ignored.

Features are multiplied by one scalar so that their mean L2 norm is 20 (``rcnn_feature_stats`` /
``rcnn_scale_features``), estimated on a fixed-seed sample of proposals. Joined taps (a source with
``blocks``, e.g. ``pool5+fire5``) get one scalar per block, each block brought to a mean norm of
20/√B, so no tap outweighs another by its raw magnitude (B = 1 is the released rule; the scaling
helpers live in :mod:`rcnn.sources`, shared with box regression).

The solver is liblinear (scikit-learn's ``LinearSVC``, ``-s 3``: L2-regularised L1-loss/hinge,
dual coordinate descent) with the released settings ``-c 1e-3 -w1 2 -B 10``: the bias is an extra
feature of value 10 whose weight is regularised like the others, so the objective is::

    0.5*|w|^2 + 0.5*(b/10)^2 + C * (2 * sum_pos max(0, 1 - s) + sum_neg max(0, 1 + s)),  s = x.w + b

Hard-negative mining follows ``rcnn_train.m``: one pass over the images (paper §2.3: mAP stops
increasing after one pass); the first image contributes all its negatives and every class is
trained on them; afterwards only negatives scoring ``> -1.0001`` are added, a class is retrained
once more than ``retrain_limit`` new negatives were added and at the very end, and after each
retraining cached negatives scoring ``< -1.2`` are evicted. All classes are mined from the same
single read of each image's cached features (one ``(N,D) @ (D,C)`` product per image). The
negative cache of each class is bounded (``max_cache_mb``; the hardest negatives are kept when it
overflows) so training runs out of core on any number of images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from rcnn.boxes import box_iou
from rcnn.data import ImageRecord
from rcnn.progress import ProgressFn, report
from rcnn.sources import TARGET_NORM, FeatureSource, Scale, block_norms, block_scale, source_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SVMConfig:
    """Training settings; every default is the paper's / released code's."""

    C: float = 1e-3  # rcnn_train.m svm_C
    bias_mult: float = 10.0  # rcnn_train.m bias_mult (liblinear -B 10)
    pos_weight: float = 2.0  # rcnn_train.m pos_loss_weight (liblinear -w1 2)
    neg_iou: float = 0.3  # paper §2.3: negatives have IoU < 0.3 with every instance (grid-searched)
    hard_thresh: float = -1.0001  # rcnn_train.m init_cache: hard_thresh
    evict_thresh: float = -1.2  # rcnn_train.m init_cache: evict_thresh
    retrain_limit: int = 2000  # rcnn_train.m init_cache: retrain_limit
    passes: int = 1  # paper §2.3: "mAP stops increasing after only a single pass"
    max_new_neg_per_image: int | None = None  # released code: no cap (hardest kept when set)
    max_cache_mb: float = 512.0  # bound on each class's in-memory negative cache (float32 bytes)
    tol: float = 1e-3  # liblinear stopping tolerance on the dual
    max_iter: int = 5000
    stats_images: int = 200  # rcnn_feature_stats: 200 images x 200 boxes, fixed seed
    stats_boxes: int = 200
    seed: int = 0
    target_norm: float = TARGET_NORM

    def key(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- solver


@dataclass
class Objective:
    """SVM primal objective split as ``rcnn_train.m`` logs it."""

    pos: float
    neg: float
    reg: float

    @property
    def total(self) -> float:
        return self.pos + self.neg + self.reg


def svm_objective(
    w: np.ndarray, b: float, X_pos: np.ndarray, X_neg: np.ndarray, C: float = 1e-3, bias_mult: float = 10.0,
    pos_weight: float = 2.0, scale: Scale | None = None,
) -> Objective:
    """Primal objective of ``(w (D,), b)`` on positives ``(P,D)`` and negatives ``(M,D)`` (with
    ``scale``: unscaled rows, scaled as training scales them, a chunk at a time)."""
    w64 = np.asarray(w, np.float64)

    def margins(X: np.ndarray) -> np.ndarray:
        if not len(X):
            return np.zeros(0)
        if scale is None:
            return np.asarray(X, np.float64) @ w64 + b
        return np.concatenate([scaled_rows([X[i : i + 4096]], scale, np.float64) @ w64 + b
                               for i in range(0, len(X), 4096)])

    zp, zn = margins(X_pos), margins(X_neg)
    return Objective(
        pos=float(C * pos_weight * np.maximum(0, 1 - zp).sum()),
        neg=float(C * np.maximum(0, 1 + zn).sum()),
        reg=float(0.5 * w64 @ w64 + 0.5 * (b / bias_mult) ** 2),
    )


def train_svm(
    X_pos: np.ndarray, X_neg: np.ndarray, C: float = 1e-3, bias_mult: float = 10.0, pos_weight: float = 2.0,
    tol: float = 1e-3, max_iter: int = 5000,
) -> tuple[np.ndarray, float]:
    """liblinear ``-s 3 -c C -w1 pos_weight -B bias_mult`` on ``(P,D)`` positives and ``(M,D)`` negatives.

    Returns ``w`` ``(D,)`` float32 and the bias ``b`` (already multiplied by ``bias_mult``, as
    ``rcnn_train.m`` does with ``llm.w(end) * bias_mult``).
    """
    X = np.concatenate([X_pos, X_neg], dtype=np.float64)
    return fit_liblinear(X, len(X_pos), C, bias_mult, pos_weight, tol, max_iter)


def fit_liblinear(
    X, num_pos: int, C: float = 1e-3, bias_mult: float = 10.0, pos_weight: float = 2.0,
    tol: float = 1e-3, max_iter: int = 5000,
) -> tuple[np.ndarray, float]:
    """:func:`train_svm` on ``X`` ``(P+M, D)`` float64 (dense or CSR) whose first ``num_pos`` rows are
    the positives (the layout liblinear reads, built once by the caller without a float32 copy beside it)."""
    from sklearn.svm import LinearSVC

    y = np.concatenate([np.ones(num_pos), -np.ones(X.shape[0] - num_pos)])
    # fit_intercept + intercept_scaling = liblinear's -B: a constant feature whose weight is
    # regularised like the rest (sklearn docs), i.e. exactly the released bias_mult trick.
    clf = LinearSVC(
        C=C, loss="hinge", dual=True, class_weight={1: pos_weight, -1: 1.0}, fit_intercept=True,
        intercept_scaling=bias_mult, tol=tol, max_iter=max_iter, random_state=0,
    )
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(X, y)
    if any(issubclass(c.category, ConvergenceWarning) for c in caught):
        log.warning("liblinear did not converge in %d iterations (tol %g)", max_iter, tol)
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


def solve_dual_reference(
    X_pos: np.ndarray, X_neg: np.ndarray, C: float = 1e-3, bias_mult: float = 10.0, pos_weight: float = 2.0,
    maxiter: int = 20000,
) -> tuple[np.ndarray, float]:
    """An independent solver for the same SVM, used to verify liblinear (tests, benchmark).

    Solves the dual box-constrained QP ``min 0.5 a'Qa - sum(a), 0 <= a_i <= C_i`` with
    ``Q_ij = y_i y_j [x_i, B].[x_j, B]`` by L-BFGS-B (scipy), then ``[w, b/B] = sum a_i y_i [x_i, B]``.
    """
    from scipy.optimize import minimize

    X = np.concatenate([X_pos, X_neg]).astype(np.float64)
    Xa = np.concatenate([X, np.full((len(X), 1), bias_mult)], axis=1)
    y = np.concatenate([np.ones(len(X_pos)), -np.ones(len(X_neg))])
    Ci = np.where(y > 0, C * pos_weight, C)
    Z = Xa * y[:, None]

    def f(a: np.ndarray) -> tuple[float, np.ndarray]:
        v = Z.T @ a
        return 0.5 * v @ v - a.sum(), Z @ v - 1.0

    res = minimize(f, np.zeros(len(y)), jac=True, method="L-BFGS-B", bounds=list(zip(np.zeros(len(y)), Ci, strict=True)),
                   options={"maxiter": maxiter, "ftol": 1e-14, "gtol": 1e-10})
    wa = Z.T @ res.x
    return wa[:-1].astype(np.float32), float(wa[-1] * bias_mult)


# ------------------------------------------------------------------ feature scaling


def feature_stats(
    records: Sequence[ImageRecord], source: FeatureSource, n_images: int = 200, boxes_per_image: int = 200, seed: int = 0,
    blocks: Sequence[int] | None = None,
) -> float | np.ndarray:
    """Mean L2 norm of proposal features on a fixed-seed sample (released ``rcnn_feature_stats``:
    up to 200 random images x 200 random boxes each); with ``blocks``, a ``(B,)`` array of each
    block's mean norm."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(records))[: min(n_images, len(records))]
    norms = []
    subset = getattr(source, "pools_boxes", False)  # pool only the sampled boxes (shared mode)
    for i in sorted(idx):
        if subset:
            boxes = source.region_boxes(records[i])
            if len(boxes) == 0:
                continue
            sel = rng.permutation(len(boxes))[: min(boxes_per_image, len(boxes))]
            norms.append(block_norms(source.box_features(records[i], boxes[np.sort(sel)]), blocks))
            continue
        _, feats = source.regions(records[i])
        if len(feats) == 0:
            continue
        sel = rng.permutation(len(feats))[: min(boxes_per_image, len(feats))]
        norms.append(block_norms(feats[np.sort(sel)], blocks))
    if not norms:
        raise ValueError("no proposal features to estimate the feature scale from (all images have no proposals)")
    mean_norm = np.concatenate(norms).mean(0)
    if not np.all(np.isfinite(mean_norm)) or np.any(mean_norm <= 0):
        raise ValueError(f"feature norms are degenerate (mean {mean_norm.tolist()}); the features (or a block of "
                         "them) are all zero or not finite")
    return mean_norm if blocks else float(mean_norm[0])


# -------------------------------------------------------------------- hard negatives


def negative_overlaps(boxes: np.ndarray, record: ImageRecord, num_classes: int) -> np.ndarray:
    """``(N, C)`` max IoU of each region with any instance (difficult included) of each class."""
    ov = np.zeros((len(boxes), num_classes), np.float32)
    if len(boxes) and len(record.boxes):
        iou = box_iou(np.asarray(boxes, np.float32), record.boxes.astype(np.float32))
        for c in range(num_classes):
            m = record.labels == c
            if m.any():
                ov[:, c] = iou[:, m].max(axis=1)
    return ov


def scaled_rows(parts: Sequence[np.ndarray], scale: Scale, dtype=np.float32, chunk: int = 1024) -> np.ndarray:
    """Rows of ``parts`` (each ``(n_i, D)`` unscaled features, any float dtype) stacked and multiplied
    by ``scale`` in float32 — the values training sees — as one ``(sum n_i, D)`` array of ``dtype``.
    Built chunk by chunk, so a float64 copy for liblinear never has a float32 twin beside it."""
    D = next((p.shape[1] for p in parts if p.ndim == 2), 0)
    out = np.empty((sum(len(p) for p in parts), D), dtype)
    i = 0
    for p in parts:
        for s in range(0, len(p), chunk):
            block = p[s : s + chunk]
            out[i : i + len(block)] = np.asarray(block, np.float32) * scale
            i += len(block)
    return out


def scaled_csr(parts: Sequence[np.ndarray], scale: Scale, chunk: int = 1024):
    """:func:`scaled_rows` as a float64 CSR matrix: liblinear copies its input into (index, value)
    pairs of the non-zeros anyway, and ReLU features are mostly zeros (~27 % of pool5+fire5 non-zero),
    so a sparse input needs ~40 % less memory than a dense float64 one and trains the same weights
    bit for bit. The arrays are sized by a first count of the non-zeros and filled a chunk of rows at
    a time, so no second copy of the matrix exists while it is built."""
    import scipy.sparse as sp

    D = next((p.shape[1] for p in parts if p.ndim == 2), 0)
    n = sum(len(p) for p in parts)
    # the scale is positive and finite per dimension (feature_stats checks the norms), so a scaled
    # value is zero exactly where the stored one is: count without scaling twice
    nnz = sum(int(np.count_nonzero(p)) for p in parts)
    data, indices = np.empty(nnz, np.float64), np.empty(nnz, np.int32)
    indptr = np.zeros(n + 1, np.int64)
    row = k = 0
    for p in parts:
        for i in range(0, len(p), chunk):
            dense = scaled_rows([p[i : i + chunk]], scale, np.float64)
            r, c = np.nonzero(dense)  # row-major: CSR order
            data[k : k + len(r)], indices[k : k + len(r)] = dense[r, c], c
            indptr[row + 1 : row + len(dense) + 1] = k + np.cumsum(np.bincount(r, minlength=len(dense)))
            row, k = row + len(dense), k + len(r)
    return sp.csr_matrix((data, indices, indptr), shape=(n, D))


def _scaled_scores(X: np.ndarray, scale: Scale, w: np.ndarray, bias: float, chunk: int = 4096) -> np.ndarray:
    """``(N,)`` float32 scores ``(X * scale) @ w + bias`` of unscaled rows ``X`` ``(N, D)``, chunk by chunk."""
    return np.concatenate([scaled_rows([X[s : s + chunk]], scale) @ w + bias for s in range(0, len(X), chunk)]
                          or [np.zeros(0, np.float32)])


@dataclass
class _ClassCache:
    """One class's training regions, stored *unscaled* in the source's dtype (float16 for CNN
    features: half the memory of the scaled float32 rows, and the same values once scaled)."""

    X_pos: np.ndarray
    X_neg: np.ndarray  # (M, D) unscaled, the source's dtype
    keys: np.ndarray  # (M, 2) int64 (image index, row)
    pending_X: list = field(default_factory=list)
    pending_keys: list = field(default_factory=list)
    num_added: int = 0
    key_set: set = field(default_factory=set)
    history: list = field(default_factory=list)
    evicted_for_bound: int = 0

    def flush(self) -> None:
        if self.pending_X:
            self.X_neg = np.concatenate([self.X_neg, *self.pending_X])
            self.keys = np.concatenate([self.keys, *self.pending_keys])
            self.pending_X, self.pending_keys = [], []

    @property
    def size(self) -> int:
        return len(self.X_neg) + sum(len(x) for x in self.pending_X)


@dataclass
class TrainResult:
    """Weights ``W`` ``(D,C)`` float32 and biases ``b`` ``(C,)`` for *scaled* features
    (``feats * feature_scale``); ``trained[c]`` is False for classes without positives."""

    W: np.ndarray
    b: np.ndarray
    feature_scale: Scale  # a scalar, or per dimension for joined taps (blocks)
    mean_norm: float | np.ndarray  # per block for joined taps
    trained: np.ndarray
    num_pos: list[int]
    history: list[list[dict]]  # per class: one dict per retraining (objective terms, cache size, ...)
    images: int
    seconds: float
    warnings: list[str]


def _mining_info(classes: Sequence[str], caches: list[_ClassCache], shown: int = 8) -> str:
    """Negative-cache sizes and last objectives of the first ``shown`` classes, for a progress line."""
    cs = list(zip(classes, caches, strict=True))[:shown]
    more = " …" if len(classes) > shown else ""
    objs = ("–" if not cc.history else f"{cc.history[-1]['objective']:.3g}" for _, cc in cs)
    return "cache " + " ".join(f"{c}:{cc.size}" for c, cc in cs) + more + " · obj " + " ".join(objs) + more


def _feature_scale(records: list[ImageRecord], source: FeatureSource, config: SVMConfig,
                   progress: ProgressFn | None) -> tuple[float | np.ndarray, Scale]:
    """Step 1: the mean feature norm(s) of a fixed-seed sample and the scale bringing them to
    ``config.target_norm`` (``rcnn_feature_stats``)."""
    report(progress, "feature scale", 0, 1)
    blocks = source_blocks(source)
    mean_norm = feature_stats(records, source, config.stats_images, config.stats_boxes, config.seed, blocks)
    scale = block_scale(mean_norm, blocks, config.target_norm)
    report(progress, "feature scale", 1, 1)
    return mean_norm, scale


def _positives(records: list[ImageRecord], source: FeatureSource, num_classes: int,
               progress: ProgressFn | None) -> tuple[list[np.ndarray], int]:
    """Step 2: per class the unscaled features ``(P_c, D)`` of its non-difficult ground-truth boxes,
    computed like the proposals' (released code: get_positive_pool5_features before mining), and ``D``."""
    pos: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    D = None
    for i, r in enumerate(records):
        keep = ~r.difficult.astype(bool)
        if keep.any():
            f = np.asarray(source.gt_features(r))
            D = f.shape[1]
            for c in range(num_classes):
                m = keep & (r.labels == c)
                if m.any():
                    pos[c].append(f[m])
        report(progress, "positives", i + 1, len(records))
    if D is None:
        _, f = source.regions(records[0])
        D = f.shape[1]
    return [np.concatenate(p) if p else np.zeros((0, D), np.float16) for p in pos], D


def _image_regions(source: FeatureSource, r: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
    """An image's candidate negatives: boxes ``(N, 4)`` float32 and unscaled features ``(N, D)`` of its
    ground-truth boxes (negatives for the other classes) followed by its proposals."""
    boxes, raw = source.regions(r)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    raw = np.asarray(raw)
    if len(r.boxes):
        gtf = np.asarray(source.gt_features(r))
        boxes = np.concatenate([r.boxes.astype(np.float32), boxes])
        raw = np.concatenate([gtf, raw]) if len(raw) else gtf
    return boxes, raw


def _mine_image(source: FeatureSource, r: ImageRecord, i: int, scale: Scale, W: np.ndarray, b: np.ndarray,
                caches: list[_ClassCache], trained: np.ndarray, first_time: bool, config: SVMConfig) -> bool:
    """Step 3, one image ``i`` of a mining pass: queue each trained class's new negatives from one read of
    the image's regions, scored by all classes in one matrix product (§2.2; none before the first
    training). False when the image has no regions."""
    boxes, raw = _image_regions(source, r)
    if not len(boxes):
        return False
    ov = negative_overlaps(boxes, r, len(caches))
    z = np.asarray(raw, np.float32) * scale @ W + b if not first_time else None
    for c in np.nonzero(trained)[0]:
        idx = _new_negatives(ov[:, c] < config.neg_iou, z, c, i, caches[c], config)
        if len(idx):
            _add_negatives(caches[c], raw, idx, i, config)
    return True


def _new_negatives(cand: np.ndarray, z: np.ndarray | None, c: int, i: int, cache: _ClassCache,
                   config: SVMConfig) -> np.ndarray:
    """Step 3 for one class and image ``i``: the rows to add to the class's negative cache among
    the candidates ``cand`` ``(N,)`` bool (IoU below ``neg_iou``); ``z`` ``(N, C)``: the current scores
    (``None`` before the first training: every candidate, sampled down to ``max_new_neg_per_image``)."""
    if z is not None:
        cand &= z[:, c] > config.hard_thresh
    idx = np.nonzero(cand)[0]
    if config.passes > 1 and len(idx):
        idx = np.array([j for j in idx if (i, int(j)) not in cache.key_set], np.int64)
    if config.max_new_neg_per_image is not None and len(idx) > config.max_new_neg_per_image:
        if z is not None:
            idx = idx[np.argsort(-z[idx, c], kind="stable")[: config.max_new_neg_per_image]]
        else:
            rng = np.random.default_rng((config.seed, i, int(c)))
            idx = np.sort(rng.permutation(idx)[: config.max_new_neg_per_image])
    return idx


def _add_negatives(cache: _ClassCache, raw: np.ndarray, idx: np.ndarray, i: int, config: SVMConfig) -> None:
    """Queue rows ``idx`` of image ``i``'s features ``raw`` in the class's cache (added at its next retraining)."""
    cache.pending_X.append(raw[idx])
    k = np.stack([np.full(len(idx), i, np.int64), idx.astype(np.int64)], axis=1)
    cache.pending_keys.append(k)
    if config.passes > 1:
        cache.key_set.update(map(tuple, k))
    cache.num_added += len(idx)


def _retrain(cache: _ClassCache, scale: Scale, config: SVMConfig, max_neg: int,
             image_index: int) -> tuple[np.ndarray, float, Objective] | None:
    """Step 4: retrain one class on its cache, record the objective in ``cache.history`` and evict
    easy negatives; ``(w (D,), bias, objective)``, or ``None`` without positives or negatives."""
    cache.flush()
    if len(cache.X_neg) == 0 or len(cache.X_pos) == 0:
        return None
    ts = time.perf_counter()
    w, bias = fit_liblinear(scaled_csr([cache.X_pos, cache.X_neg], scale), len(cache.X_pos), config.C,
                            config.bias_mult, config.pos_weight, config.tol, config.max_iter)
    obj = svm_objective(w, bias, cache.X_pos, cache.X_neg, config.C, config.bias_mult, config.pos_weight, scale)
    cache.num_added = 0
    zp = _scaled_scores(cache.X_pos, scale, w, bias)
    zn = _scaled_scores(cache.X_neg, scale, w, bias)
    entry = {
        "image": image_index + 1, "objective": obj.total, "pos_loss": obj.pos, "neg_loss": obj.neg, "reg_loss": obj.reg,
        "num_pos": len(cache.X_pos), "num_neg": len(cache.X_neg),
        "pos_sv": int((zp < 1 + 1e-6).sum()), "neg_sv": int((zn > -1 - 1e-6).sum()), "seconds": time.perf_counter() - ts,
    }
    _evict(cache, zn, config.evict_thresh, max_neg)
    entry["num_neg_after_evict"] = len(cache.X_neg)
    cache.history.append(entry)
    return w, bias, obj


def _evict(cache: _ClassCache, zn: np.ndarray, evict_thresh: float, max_neg: int) -> None:
    """Drop the cached negatives scoring ``zn < evict_thresh`` (rcnn_train.m), and beyond ``max_neg``
    all but the hardest (the bounded cache of out-of-core training)."""
    keep = zn >= evict_thresh
    if keep.sum() > max_neg:
        order = np.argsort(-zn, kind="stable")[:max_neg]
        keep = np.zeros_like(keep)
        keep[order] = True
        cache.evicted_for_bound += int((zn >= evict_thresh).sum() - max_neg)
    for k in map(tuple, cache.keys[~keep]):
        cache.key_set.discard(k)
    cache.X_neg, cache.keys = cache.X_neg[keep], cache.keys[keep]


def _final_warnings(classes: Sequence[str], caches: list[_ClassCache], trained: np.ndarray, max_neg: int,
                    config: SVMConfig) -> list[str]:
    """Warnings after mining (a class whose cache bound dropped negatives); a class that found no
    negatives is marked untrained in ``trained``."""
    warn = []
    for c in np.nonzero(trained)[0]:
        if caches[c].evicted_for_bound:
            msg = (f"class {classes[c]!r}: negative cache bound ({max_neg} regions, {config.max_cache_mb} MB) dropped "
                   f"{caches[c].evicted_for_bound} hard-ish negatives")
            log.warning(msg)
            warn.append(msg)
        if not caches[c].history:
            warn.append(f"class {classes[c]!r}: no negatives found, SVM not trained")
            trained[c] = False
    return warn


def train_detector(
    records: Sequence[ImageRecord], classes: Sequence[str], source: FeatureSource, config: SVMConfig = SVMConfig(),
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train one linear SVM per class with hard-negative mining (paper §2.3); see module docs.
    ``progress`` hears of the feature scale, the positives and each mined image (cache sizes, objectives)."""
    t0 = time.perf_counter()
    C = len(classes)
    records = list(records)
    if not records:
        raise ValueError("no training images")
    warn: list[str] = []
    mean_norm, scale = _feature_scale(records, source, config, progress)
    X_pos, D = _positives(records, source, C, progress)
    trained = np.array([len(x) > 0 for x in X_pos])
    for c in np.nonzero(~trained)[0]:
        msg = f"class {classes[c]!r} has no (non-difficult) positives in the training images: skipped, it will never be detected"
        log.warning(msg)
        warn.append(msg)

    caches = [_ClassCache(X_pos[c], np.zeros((0, D), X_pos[c].dtype), np.zeros((0, 2), np.int64)) for c in range(C)]
    max_neg = max(1, int(config.max_cache_mb * 1e6 / (4 * D)))
    W = np.zeros((D, C), np.float32)
    b = np.zeros(C, np.float32)

    def retrain(c: int, image_index: int) -> None:
        fit = _retrain(caches[c], scale, config, max_neg, image_index)
        if fit is not None:
            W[:, c], b[c], obj = fit
            log.info("%s retrain %d: obj %.4f = %.4f (pos) + %.4f (neg) + %.4f (reg); cache %d -> %d negatives",
                     classes[c], len(caches[c].history), obj.total, obj.pos, obj.neg, obj.reg,
                     caches[c].history[-1]["num_neg"], len(caches[c].X_neg))

    # 3. hard-negative mining passes, all classes from one read of each image's features
    first_time = True
    n = len(records)
    for epoch in range(config.passes):
        for i, r in enumerate(records):
            found = _mine_image(source, r, i, scale, W, b, caches, trained, first_time, config)
            last = epoch == config.passes - 1 and i == n - 1
            # 4. retrain a class after the first image, once retrain_limit new negatives came, at the end,
            #    and early when its cache outgrows the bound (retraining evicts)
            for c in np.nonzero(trained)[0]:
                cc = caches[c]
                if (first_time or cc.num_added > config.retrain_limit or last
                        or cc.size > max_neg + config.retrain_limit):
                    retrain(int(c), i)
            if found:
                first_time = False
            if progress is not None:
                report(progress, "hard-negative mining", epoch * n + i + 1, config.passes * n, _mining_info(classes, caches))
    warn += _final_warnings(classes, caches, trained, max_neg, config)
    return TrainResult(W, b, scale, mean_norm, trained, [len(x) for x in X_pos], [cc.history for cc in caches], n,
                       time.perf_counter() - t0, warn)


def score_regions(feats: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Scores ``(N,C)`` of all regions for all classes as one matrix product (paper §2.2):
    ``feats (N,D) @ W (D,C) + b (C,)``, in float32."""
    f = np.asarray(feats, np.float32).reshape(len(feats), -1)
    return f @ np.asarray(W, np.float32) + np.asarray(b, np.float32)
