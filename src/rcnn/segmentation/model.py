"""Region scoring by support vector regression and O2P-style pasting (paper §4).

Per class, a linear SVR (scikit-learn ``LinearSVR``) predicts each region's mask IoU with
that class's ground truth (the best IoU over the class's instances), from cached region
features. At test time each region takes its best class and score; regions scoring above a
threshold (chosen on a validation split) are pasted in increasing score order, so the best
region is painted last and wins every pixel it covers; pixels no region claims are
background. This is the O2P inference the paper plugs its features into.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rcnn.cache import atomic_write, file_sha256, read_safetensors
from rcnn.data import Dataset, ImageReadError, ImageRecord, load_image
from rcnn.progress import ProgressFn, tracked
from rcnn.segmentation.features import (
    STRATEGIES,
    RegionFeatureConfig,
    cached_features,
    region_features,
)
from rcnn.segmentation.masks import MaskError, class_label_map, class_masks
from rcnn.segmentation.metrics import SegmentationEvaluator
from rcnn.segmentation.regions import MaskProposalConfig, RegionMasks, get_mask_proposals, mask_proposals
from rcnn.sources import TARGET_NORM

#: what :func:`prepare_image` may compute on a feature-cache miss: everything, the ground-truth
#: masks' features only, or nothing (read what is cached, e.g. to re-run an experiment as it was)
EXTRACT = ("all", "gt", "none")
THRESHOLDS = tuple(np.round(np.arange(-0.2, 1.0001, 0.025), 3).tolist())


# ------------------------------------------------------------------------ per image


@dataclass
class ImageRegions:
    """One image's regions, their features and targets.

    ``feats``: {"full"|"fg": {tap: (N,D) float16}} for the N = len(regions) + n_gt rows
    (proposal regions first, then ground-truth masks when requested); ``targets`` (N,C)
    float32 IoU with each class's ground truth; ``label_map`` (H,W) uint8 or None.
    """

    record: ImageRecord
    regions: RegionMasks
    feats: dict[str, dict[str, np.ndarray]]
    targets: np.ndarray | None
    n_gt: int = 0
    label_map: np.ndarray | None = None


def class_targets(iou: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,C) best IoU per class from (N,G) IoU with G ground-truth masks of ``gt_labels``."""
    out = np.zeros((iou.shape[0], num_classes), np.float32)
    for c in range(num_classes):
        sel = gt_labels == c
        if sel.any():
            out[:, c] = iou[:, sel].max(1)
    return out


def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    af = a.reshape(len(a), -1).astype(np.float32)
    bf = b.reshape(len(b), -1).astype(np.float32)
    inter = af @ bf.T
    union = af.sum(1)[:, None] + bf.sum(1)[None] - inter
    return inter / np.maximum(union, 1)


class FeatureCacheMiss(RuntimeError):
    """:func:`prepare_image` met features its ``extract`` setting does not let it compute."""


def prepare_image(
    record: ImageRecord,
    num_classes: int,
    mask_config: MaskProposalConfig,
    feat_config: RegionFeatureConfig,
    max_regions: int | None = None,
    with_gt: bool = False,
    with_truth: bool = True,
    extract: str = "all",
    extracted: list[dict] | None = None,
) -> ImageRegions:
    """Regions (cached), their features for every tap (cached) and, with ``with_truth``,
    IoU targets and the ground-truth label map. Raises ``MaskError`` / ``ImageReadError``.

    ``extract`` (one of :data:`EXTRACT`): which features may be computed on a cache miss; a miss
    beyond it raises :class:`FeatureCacheMiss`. ``extracted``: a list that gets
    ``{"kind": "regions"|"gt", "masks": n, "seconds": s}`` for each computation."""
    if extract not in EXTRACT:
        raise ValueError(f"extract must be one of {EXTRACT}, not {extract!r}")
    path = Path(record.path)
    image = load_image(path)
    if image.shape[:2] != (record.height, record.width):
        from dataclasses import replace

        record = replace(record, width=image.shape[1], height=image.shape[0])
    regions = get_mask_proposals(path, mask_config)
    if regions.shape != image.shape[:2]:
        raise MaskError(f"{path}: cached regions are {regions.shape} but the image is {image.shape[:2]}")
    if max_regions is not None and max_regions < len(regions):
        regions = regions.subset(np.arange(max_regions))
    sha = file_sha256(path)

    def compute(kind: str, masks, boxes):  # called by cached_features on a miss only
        def run():
            m = masks()
            if extract == "none" or (extract == "gt" and kind != "gt"):
                raise FeatureCacheMiss(f"{path}: feature cache miss ({kind}, {len(m)} masks) and extract={extract!r}")
            t0 = time.perf_counter()
            out = region_features(image, m, boxes, feat_config)
            if extracted is not None:
                extracted.append({"kind": kind, "masks": len(m), "seconds": time.perf_counter() - t0})
            return out

        return run

    feats = cached_features((sha, mask_config.key(), len(regions), "regions"),
                            compute("regions", regions.masks, regions.boxes), feat_config)
    targets, label_map, n_gt = None, None, 0
    if with_truth:
        gt_masks, gt_labels = class_masks(record, num_classes)
        label_map = class_label_map(record, num_classes)
        iou = regions.iou(gt_masks)
        targets = class_targets(iou, gt_labels, num_classes)
        if with_gt and len(gt_masks):
            mask_sha = file_sha256(record.mask_path) if record.mask_path else ""
            ids = [] if record.mask_ids is None else [int(i) for i in record.mask_ids]
            gfeats = cached_features((sha, mask_sha, ids, "gt"), compute("gt", lambda: gt_masks, None), feat_config)
            feats = {s: {t: np.concatenate([feats[s][t], gfeats[s][t]]) for t in feats[s]} for s in feats}
            targets = np.concatenate([targets, class_targets(_mask_iou(gt_masks, gt_masks), gt_labels, num_classes)])
            n_gt = len(gt_masks)
    return ImageRegions(record, regions, feats, targets, n_gt, label_map)


def prepare_dataset(
    dataset: Dataset,
    mask_config: MaskProposalConfig,
    feat_config: RegionFeatureConfig,
    max_regions: int | None = None,
    with_gt: bool = False,
    progress: ProgressFn | None = None,
    problems: list[str] | None = None,
) -> list[ImageRegions]:
    """:func:`prepare_image` for every record. Images with a bad mask or image file are
    skipped and their one-line reason appended to ``problems`` (never a crash mid-run)."""
    out = []
    for r in tracked(dataset.records, progress, f"{dataset.split or 'all images'}: regions + features"):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out.append(prepare_image(r, len(dataset.classes), mask_config, feat_config, max_regions, with_gt))
            if problems is not None:
                problems.extend(str(w.message) for w in caught if "void" in str(w.message))
        except (MaskError, ImageReadError) as e:
            if problems is not None:
                problems.append(f"{e} (image skipped)")
    return out


# -------------------------------------------------------------------------- model


def paste(regions: RegionMasks | np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """O2P-style label map: ``scores`` (K,C) per region and class; each region takes its best
    class; regions scoring above ``threshold`` are painted in increasing score order (best
    last). ``regions``: a :class:`RegionMasks` or (K,H,W) bool masks. Returns (H,W) uint8
    (0 = background, c+1 = class c)."""
    scores = np.asarray(scores, np.float32).reshape(len(regions), -1)
    cls = scores.argmax(1)
    best = scores.max(1) if len(scores) else np.zeros(0, np.float32)
    keep = np.flatnonzero(best > threshold)
    keep = keep[np.argsort(best[keep], kind="stable")]
    if isinstance(regions, RegionMasks):
        seg = regions.segments
        # paint per segment (S values), then expand once: same result as painting pixels
        owner = np.zeros(regions.num_segments, np.uint8)
        for k in keep:
            owner[regions.members[k]] = cls[k] + 1
        return owner[seg]
    masks = np.asarray(regions, bool)
    out = np.zeros(masks.shape[1:], np.uint8)
    for k in keep:
        out[masks[k]] = cls[k] + 1
    return out


@dataclass
class SegmentationModel:
    """Per-class linear SVRs on one (strategy, tap) of region features, plus the pasting
    threshold. ``W`` (C,D) float32, ``b`` (C,), ``scales``: the factor each half of the
    features (``full``, ``fg``) is multiplied by before ``W``."""

    classes: list[str]
    strategy: str
    tap: str
    W: np.ndarray
    b: np.ndarray
    scales: dict[str, float]
    threshold: float = 0.0
    mask_config: MaskProposalConfig = field(default_factory=MaskProposalConfig)
    feature_config: RegionFeatureConfig = field(default_factory=RegionFeatureConfig)
    info: dict = field(default_factory=dict)

    def features(self, feats: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        """(N,D) float32 model input: the strategy's halves, each scaled."""
        parts = ["full", "fg"] if self.strategy == "full+fg" else [self.strategy]
        return np.concatenate([feats[p][self.tap].astype(np.float32) * self.scales[p] for p in parts], 1)

    def score(self, feats: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        """(N,C) predicted IoU per region and class."""
        return self.features(feats) @ self.W.T + self.b

    def predict(self, regions: RegionMasks, feats: dict[str, dict[str, np.ndarray]],
                threshold: float | None = None) -> np.ndarray:
        """(H,W) uint8 label map of one image from its regions and their features."""
        n = len(regions)
        s = self.score({k: {self.tap: v[self.tap][:n]} for k, v in feats.items() if self.tap in v})
        return paste(regions, s, self.threshold if threshold is None else threshold)

    # -- storage --------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """safetensors (W, b) with JSON metadata (classes, strategy, tap, scales, threshold, configs)."""
        from safetensors.numpy import save_file

        meta = {
            "format": "rcnn-segmentation-v1",
            "classes": self.classes, "strategy": self.strategy, "tap": self.tap,
            "scales": self.scales, "threshold": self.threshold,
            "mask_config": asdict(self.mask_config), "feature_config": asdict(self.feature_config),
            "info": self.info,
        }
        tensors = {"W": np.ascontiguousarray(self.W, np.float32), "b": np.ascontiguousarray(self.b, np.float32)}
        return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"rcnn": json.dumps(meta, default=str)}))

    @classmethod
    def load(cls, path: str | Path) -> SegmentationModel:
        meta, (W, b) = read_safetensors(path, ("W", "b"), "a segmentation model")
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("format") != "rcnn-segmentation-v1":
            raise ValueError(f"{path}: not an rcnn segmentation model (format {meta.get('format')!r})")
        mc = meta["mask_config"]
        mc = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in mc.items()}
        mc.setdefault("method", "grouping")  # models saved before the ranked method existed
        fc = meta["feature_config"]
        fc["taps"] = tuple(fc["taps"])
        try:
            mask_config = MaskProposalConfig(**mc)
            mask_config.key()  # a ranked model needs its ranker file
        except (TypeError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"{path}: unusable mask proposal settings ({str(e).splitlines()[0]})") from None
        return cls(meta["classes"], meta["strategy"], meta["tap"], W, b, meta["scales"], meta["threshold"],
                   mask_config, RegionFeatureConfig(**fc), meta.get("info", {}))


def _norm_scales(items: Sequence[ImageRegions], strategy: str, tap: str, full_weight: float = 1.0) -> dict[str, float]:
    """Per half, the factor that brings its mean L2 norm to ``TARGET_NORM`` (as the detector's features); in ``full+fg
    the ``full`` half's factor is further multiplied by ``full_weight``."""
    parts = ["full", "fg"] if strategy == "full+fg" else [strategy]
    out = {}
    for p in parts:
        norms = np.concatenate([np.linalg.norm(it.feats[p][tap].astype(np.float32), axis=1) for it in items])
        out[p] = float(TARGET_NORM / max(float(norms.mean()), 1e-6))
    if strategy == "full+fg":
        out["full"] *= full_weight
    return out


def train_segmenter(
    train: Sequence[ImageRegions],
    classes: list[str],
    strategy: str = "full+fg",  # paper Table 3: full+fg is the best strategy
    tap: str = "fc6",  # paper §4: "layer fc6 always outperformed fc7"
    C: float = 0.01,
    epsilon: float = 0.0,
    mask_config: MaskProposalConfig = MaskProposalConfig(),
    feature_config: RegionFeatureConfig = RegionFeatureConfig(),
    full_weight: float = 1.0,  # paper §4 concatenates the two halves as they are (equal norms)
) -> SegmentationModel:
    """Fit one ``LinearSVR`` per class on all rows (regions + ground-truth masks) of ``train``,
    regressing each row's IoU with that class.

    ``full_weight`` (``full+fg`` only; > 0): the ``full`` half's scale relative to the ``fg``
    half, both first brought to mean norm ``TARGET_NORM``. The SVR's L2 penalty then costs
    ``1/full_weight²`` as much per unit of ``full`` weight, i.e. a per-block C; ignored for
    the single-half strategies."""
    from sklearn.svm import LinearSVR

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if not train:
        raise ValueError("no training images")
    if not (np.isfinite(full_weight) and full_weight > 0):
        raise ValueError(f"full_weight must be a positive number, not {full_weight!r}")
    scales = _norm_scales(train, strategy, tap, full_weight)
    model = SegmentationModel(classes, strategy, tap, np.zeros((len(classes), 0), np.float32),
                              np.zeros(len(classes), np.float32), scales, 0.0, mask_config, feature_config)
    X = np.concatenate([model.features(it.feats) for it in train])
    Y = np.concatenate([it.targets for it in train])
    t0 = time.perf_counter()
    W = np.zeros((len(classes), X.shape[1]), np.float32)
    b = np.zeros(len(classes), np.float32)
    for c in range(len(classes)):
        svr = LinearSVR(C=C, epsilon=epsilon, loss="squared_epsilon_insensitive", dual=X.shape[0] < X.shape[1],
                        max_iter=2000, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # liblinear's ConvergenceWarning at max_iter is not fatal
            svr.fit(X, Y[:, c])
        W[c], b[c] = svr.coef_.astype(np.float32), np.float32(svr.intercept_[0])
    model.W, model.b = W, b
    model.info = {"train_rows": int(X.shape[0]), "dim": int(X.shape[1]), "train_seconds": time.perf_counter() - t0,
                  "C": C, "epsilon": epsilon, "full_weight": full_weight if strategy == "full+fg" else None}
    return model


def choose_threshold(model: SegmentationModel, val: Sequence[ImageRegions],
                     thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, dict[float, float]]:
    """The pasting threshold with the best mean IoU (VOC measure) on ``val``; also every
    candidate's mean IoU."""
    n = len(model.classes) + 1
    evs = {t: SegmentationEvaluator(n) for t in thresholds}
    for it in val:
        s = model.score({k: {model.tap: v[model.tap][:len(it.regions)]} for k, v in it.feats.items()})
        for t in thresholds:
            evs[t].process(it.label_map, paste(it.regions, s, t))
    table = {t: float(np.nanmean(ev.iou())) for t, ev in evs.items()}
    best = max(table, key=lambda t: (table[t], -abs(t)))
    return float(best), table


def out_of_fold_items(
    train: Sequence[ImageRegions],
    classes: list[str],
    strategy: str,
    tap: str,
    C: float,
    folds: int = 4,
    **train_kw,
) -> list[ImageRegions]:
    """Each training image with its features replaced by *scores* from a model that did not
    see it (``folds``-fold split by image, ``train_segmenter`` on the other folds): (N,C)
    under ``feats["oof"][tap]``. Used by :func:`choose_threshold` with ``extra`` to pick the
    pasting threshold on train + val instead of val alone (32 images here: noisy)."""
    if folds < 2 or len(train) < folds:
        raise ValueError(f"need at least {folds} training images and folds >= 2")
    out: list[ImageRegions | None] = [None] * len(train)
    fold_of = np.arange(len(train)) % folds
    for f in range(folds):
        m = train_segmenter([it for it, g in zip(train, fold_of, strict=True) if g != f], classes, strategy, tap,
                            C=C, **train_kw)
        for i in np.flatnonzero(fold_of == f):
            it = train[i]
            n = len(it.regions)  # pasting uses the proposal rows, not the GT rows after them
            sc = m.score({k: {tap: v[tap][:n]} for k, v in it.feats.items() if tap in v})
            out[i] = ImageRegions(it.record, it.regions, {"oof": {tap: sc}}, None, 0, it.label_map)
    return out  # type: ignore[return-value]


def _scored_threshold_table(items: Sequence[tuple[RegionMasks, np.ndarray, np.ndarray]], n: int,
                            thresholds: Sequence[float]) -> dict[float, float]:
    evs = {t: SegmentationEvaluator(n) for t in thresholds}
    for regions, s, lm in items:
        for t in thresholds:
            evs[t].process(lm, paste(regions, s, t))
    return {t: float(np.nanmean(ev.iou())) for t, ev in evs.items()}


def choose_threshold_pooled(model: SegmentationModel, val: Sequence[ImageRegions], oof: Sequence[ImageRegions],
                            thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, dict[float, float]]:
    """Like :func:`choose_threshold`, over ``val`` scored by ``model`` *plus* the training
    images' out-of-fold scores (:func:`out_of_fold_items`), one confusion matrix over all."""
    items = [(it.regions, model.score({k: {model.tap: v[model.tap][:len(it.regions)]} for k, v in it.feats.items()}),
              it.label_map) for it in val]
    items += [(it.regions, it.feats["oof"][model.tap], it.label_map) for it in oof]
    table = _scored_threshold_table(items, len(model.classes) + 1, thresholds)
    best = max(table, key=lambda t: (table[t], -abs(t)))
    return float(best), table


def evaluate_segmenter(model: SegmentationModel, items: Sequence[ImageRegions]) -> dict:
    """VOC segmentation measure of ``model`` over prepared ``items`` (their label maps)."""
    ev = SegmentationEvaluator(len(model.classes) + 1)
    for it in items:
        ev.process(it.label_map, model.predict(it.regions, it.feats))
    return ev.evaluate(["background", *model.classes])


def segment_image(model: SegmentationModel, image: np.ndarray) -> np.ndarray:
    """(H,W) uint8 label map of an (H,W,3) RGB uint8 image (regions and features computed,
    not cached: use :func:`prepare_image` for dataset images)."""
    regions = mask_proposals(image, model.mask_config)
    feats = region_features(image, regions.masks(), regions.boxes, model.feature_config)
    return model.predict(regions, feats)
