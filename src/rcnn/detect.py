"""The R-CNN detector: the model file, training it, detection and the detections it outputs.

Detection (paper §2.2): proposals → features → scores of every class as one matrix product
→ greedy per-class NMS at IoU 0.3 → at most ``max_per_class`` boxes per class and image
(the released ``rcnn_test.m`` keeps 100) and optionally an overall ``top_k``.

A model file (``.rcnn``) is one ``safetensors`` file: tensors ``W`` ``(D,C)``, ``b`` ``(C,)``,
``trained`` ``(C,)`` and a JSON document in the safetensors header metadata (key ``"rcnn"``)
with the format version, classes, backbone name and weights hash, layer, mode, feature and
proposal settings, feature scale, NMS threshold and the training record.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rcnn.backbones import FINETUNED_META_KEY, FT_TAP, get_backbone, read_finetuned_meta
from rcnn.bbox_regression import BoxRegressor
from rcnn.boxes import NMS_IOU, batched_nms, box_area
from rcnn.cache import atomic_write, settings_hash
from rcnn.data import Dataset, ImageReadError, ImageRecord, load_image
from rcnn.features import FeatureConfig
from rcnn.progress import ProgressFn, report
from rcnn.proposals import ProposalConfig
from rcnn.scoring import TopK, score_topk
from rcnn.sources import (
    HOG_BACKBONE,
    CNNFeatures,
    FeatureSource,
    HOGFeatures,
    HOGOptions,
    MirrorAugmented,
    hog_features,
    scale_from_json,
    scale_to_json,
)
from rcnn.svm import SVMConfig, TrainResult, score_regions, train_detector

log = logging.getLogger(__name__)

#: Bump when the model file layout changes; ``RCNNModel.load`` refuses other versions.
FORMAT_VERSION = 1
#: Released ``rcnn_test.m``: ``max_per_image = 100`` boxes per class and image.
MAX_PER_CLASS = 100
#: iterative localisation (``relocalize``): each class's best this-many candidates are re-scored
RELOCALIZE_TOP = 200
#: Detection scores every region for every class while ``N × C`` is at most this (64 MB of
#: float32); with more classes only the best ``PRE_NMS_FACTOR × max_per_class`` regions per class
#: reach NMS (rcnn.scoring keeps them on the fly), so memory stays bounded for 100k classes.
FULL_SCORES_MAX = 1 << 24
PRE_NMS_FACTOR = 3


class ModelError(ValueError):
    """A model file that cannot be used here (one line naming the file and the problem)."""


# ------------------------------------------------------------------------ model file


@dataclass
class RCNNModel:
    """Per-class linear SVMs over one kind of region feature.

    ``W`` ``(D,C)`` float32 and ``b`` ``(C,)`` act on features multiplied by ``feature_scale``
    (a scalar; per dimension for joined taps, :func:`rcnn.sources.block_scale`);
    ``trained[c]`` is False for classes that had no positives (never detected)."""

    classes: list[str]
    W: np.ndarray
    b: np.ndarray
    trained: np.ndarray
    feature_scale: float | np.ndarray
    backbone: str
    weights_hash: str
    layer: str
    mode: str
    feature_options: dict = field(default_factory=dict)
    proposal_options: dict = field(default_factory=dict)
    nms_iou: float = NMS_IOU  # paper §2.2
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    bbox_reg: BoxRegressor | None = None  # box regression (tech report appendix C), applied before NMS

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Scores ``(N,C)`` of raw (unscaled) features ``(N,D)``: one matrix product (§2.2)."""
        f = np.asarray(feats, np.float32)
        if f.ndim != 2 or (len(f) and f.shape[1] != self.W.shape[0]):
            raise ModelError(f"features have shape {f.shape}, the model expects (N, {self.W.shape[0]})")
        return score_regions(f * np.float32(self.feature_scale), self.W, self.b)

    def score_topk(self, feats: np.ndarray, k: int | None = None, threshold: float | None = None,
                   block_classes: int | None = None) -> TopK:
        """Per-class top-``k`` regions of raw features ``(N,D)`` without the ``(N,C)`` matrix
        (:func:`rcnn.scoring.score_topk`: blocked product, bounded memory for any number of classes)."""
        f = np.asarray(feats, np.float32)
        if f.ndim != 2 or (len(f) and f.shape[1] != self.W.shape[0]):
            raise ModelError(f"features have shape {f.shape}, the model expects (N, {self.W.shape[0]})")
        extra = {} if block_classes is None else {"block_classes": block_classes}
        return score_topk(f * np.float32(self.feature_scale), self.W, self.b, k=k, threshold=threshold, **extra)

    def candidates_per_class(self, num_regions: int, max_per_class: int | None = MAX_PER_CLASS) -> int | None:
        """How many top regions per class go to NMS: all of them (``None``, exactly the paper's
        procedure) while the ``N × C`` scores fit in :data:`FULL_SCORES_MAX`; beyond that (thousands
        of classes) the best ``PRE_NMS_FACTOR × max_per_class``, which bounds memory."""
        if num_regions * len(self.classes) <= FULL_SCORES_MAX:
            return None
        return PRE_NMS_FACTOR * (max_per_class or MAX_PER_CLASS)

    def metadata(self) -> dict:
        return {
            "format": "rcnn-model", "format_version": self.format_version, "classes": list(self.classes),
            "backbone": self.backbone, "weights_hash": self.weights_hash, "layer": self.layer, "mode": self.mode,
            "feature_options": self.feature_options, "proposal_options": self.proposal_options,
            "feature_scale": scale_to_json(self.feature_scale), "nms_iou": self.nms_iou, "training": self.training,
        }

    def save(self, path: str | Path) -> Path:
        """Write the model atomically (one safetensors file with JSON metadata)."""
        tensors = {"W": np.ascontiguousarray(self.W, np.float32), "b": np.ascontiguousarray(self.b, np.float32),
                   "trained": np.ascontiguousarray(self.trained.astype(np.uint8))}
        meta = {"rcnn": json.dumps(self.metadata(), default=_json_default)}
        if self.bbox_reg is not None:  # box regression (rcnn.bbox_regression) travels in the same file
            tensors.update(self.bbox_reg.tensors())
            meta["bbox_reg"] = json.dumps(self.bbox_reg.metadata(), default=_json_default)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> RCNNModel:
        """Read a model file; raises :class:`ModelError` (one line) if it is not a usable model."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("rcnn", "null"))
                reg_meta = json.loads((f.metadata() or {}).get("bbox_reg", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ModelError(f"{path}: not an rcnn model file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(meta, dict) or meta.get("format") != "rcnn-model":
            raise ModelError(f"{path}: safetensors file without rcnn model metadata")
        v = meta.get("format_version")
        if v != FORMAT_VERSION:
            raise ModelError(f"{path}: model format version {v}, this rcnn reads version {FORMAT_VERSION}; retrain with `rcnn train`")
        W, b = tensors.get("W"), tensors.get("b")
        C = len(meta["classes"])
        if W is None or b is None or W.ndim != 2 or W.shape[1] != C or b.shape != (C,):
            raise ModelError(f"{path}: weights do not match the {C} classes in its metadata")
        trained = tensors.get("trained", np.ones(C, np.uint8)).astype(bool)
        bbox_reg = None
        if reg_meta is not None:
            try:
                bbox_reg = BoxRegressor.from_file(reg_meta, tensors)
            except (ValueError, KeyError) as e:
                raise ModelError(f"{path}: bad box regressor ({e})") from None
        return cls(classes=list(meta["classes"]), W=W.astype(np.float32), b=b.astype(np.float32), trained=trained,
                   feature_scale=scale_from_json(meta["feature_scale"]), backbone=meta["backbone"], weights_hash=meta["weights_hash"],
                   layer=meta["layer"], mode=meta["mode"], feature_options=meta.get("feature_options", {}),
                   proposal_options=meta.get("proposal_options", {}), nms_iou=float(meta.get("nms_iou", NMS_IOU)),
                   training=meta.get("training", {}), format_version=v, bbox_reg=bbox_reg)

    # -- the settings objects the model was trained with
    def proposal_config(self) -> ProposalConfig:
        opts = dict(self.proposal_options)
        if "ks" in opts:
            opts["ks"] = tuple(opts["ks"])
        return ProposalConfig(**{k: v for k, v in opts.items() if k in {f.name for f in fields(ProposalConfig)}})

    def feature_source(self, dataset_root: str | Path | None = None, backbone=None, flip: bool | None = None) -> FeatureSource:
        """The feature source this model was trained on, checked against the installed backbone.
        ``flip``: override test-time flip averaging (:class:`rcnn.features.FeatureConfig`; CNN only)."""
        if self.backbone == HOG_BACKBONE:
            if flip:
                raise ModelError("flip averaging needs CNN features, not HOG")
            return HOGFeatures(self.proposal_config(), dataset_root, **self.feature_options)
        opts = self.feature_options if flip is None else {**self.feature_options, "flip": flip}
        src = CNNFeatures.from_options(self.proposal_config(), opts, dataset_root, backbone=backbone)
        check_backbone(self, src.backbone)
        return src


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def check_backbone(model: RCNNModel, backbone) -> None:
    """Raise :class:`ModelError` if ``backbone`` is not the network the model was trained on."""
    if backbone.name != model.backbone:
        raise ModelError(f"model was trained on backbone {model.backbone!r}, not {backbone.name!r}")
    if backbone.weights_hash != model.weights_hash:
        raise ModelError(
            f"model was trained with {model.backbone} weights {model.weights_hash[:12]}…, but the installed weights are "
            f"{backbone.weights_hash[:12]}…; pass the same --weights or retrain"
        )



def softmax_model(net_path: str | Path, proposal_config: ProposalConfig, feature_config: FeatureConfig | None = None,
                  ) -> RCNNModel:
    """A detector that scores regions with a fine-tuned network's softmax (:mod:`rcnn.finetune`)
    instead of SVMs: features = the :data:`rcnn.backbones.FT_TAP` log-probabilities, ``W`` selects
    the N object columns (score = log p(class | region), a monotone map of the probability)."""
    meta = read_finetuned_meta(net_path)
    if meta is None:
        raise ValueError(f"{net_path}: not a fine-tuned network (no {FINETUNED_META_KEY} header)")
    classes = meta["classes"][1:]
    fc = replace(feature_config or FeatureConfig(), backbone=meta["base"], weights=str(net_path), layer=FT_TAP,
                 with_gt=True)
    if meta.get("tap") == "pool5":  # the softmax reads the pool5 grid it was trained on
        fc = replace(fc, grid=int(meta.get("grid", fc.grid)))
    bb = get_backbone(fc.backbone, fc.weights)
    n = len(classes)
    W = np.zeros((n + 1, n), np.float32)
    W[np.arange(1, n + 1), np.arange(n)] = 1.0
    d = asdict(fc)
    d.pop("batch_size", None)
    return RCNNModel(classes=list(classes), W=W, b=np.zeros(n, np.float32), trained=np.ones(n, bool), feature_scale=1.0,
                     backbone=fc.backbone, weights_hash=bb.weights_hash, layer=FT_TAP, mode=fc.mode, feature_options=d,
                     proposal_options=asdict(proposal_config),
                     training={"scorer": "fine-tuned softmax", "net": str(net_path), "iterations": meta.get("iterations")})


# ------------------------------------------------------------------------- training


def fit(
    dataset: Dataset, source: FeatureSource, svm: SVMConfig = SVMConfig(), progress: ProgressFn | None = None,
    records: Sequence[ImageRecord] | None = None,
) -> tuple[RCNNModel, TrainResult]:
    """Train the per-class SVMs on ``dataset`` (or a subset ``records``) and wrap them as a model."""
    recs = list(dataset.records if records is None else records)
    res = train_detector(source.augment(recs) if isinstance(source, MirrorAugmented) else recs, dataset.classes, source,
                         svm, progress)
    model = RCNNModel(
        classes=list(dataset.classes), W=res.W, b=res.b, trained=res.trained, feature_scale=res.feature_scale,
        backbone=source.name, weights_hash=source.weights_hash, layer=source.layer, mode=source.mode,
        feature_options=source.options(),
        proposal_options=asdict(source.proposal_config) if source.proposal_config is not None else {},
        training={
            "dataset": str(Path(dataset.root).resolve()), "split": dataset.split, "images": len(recs),
            "image_ids_hash": settings_hash([r.image_id for r in recs]), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "svm": svm.key(), "mean_feature_norm": np.asarray(res.mean_norm).tolist(), "num_pos": dict(zip(dataset.classes, res.num_pos, strict=True)),
            "seconds": round(res.seconds, 2), "warnings": res.warnings,
            **({"augment": "mirror"} if isinstance(source, MirrorAugmented) else {}),
            "objective": {c: [round(h["objective"], 6) for h in hist] for c, hist in zip(dataset.classes, res.history, strict=True)},
            "final_cache": {c: (hist[-1]["num_neg_after_evict"] if hist else 0) for c, hist in zip(dataset.classes, res.history, strict=True)},
        },
    )
    return model, res


# ------------------------------------------------------------------------ detection


def postprocess(
    boxes: np.ndarray, scores: np.ndarray, nms_iou: float = NMS_IOU, threshold: float | None = None,
    top_k: int | None = None, max_per_class: int | None = MAX_PER_CLASS, active: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regions ``(N,4)`` with scores ``(N,C)`` (or a :class:`rcnn.scoring.TopK` of per-class
    candidates) → detections ``(boxes (K,4), scores (K,), labels (K,))``.

    Keeps scores ``> threshold`` (all if None), greedy NMS per class at ``nms_iou`` (paper §2.2),
    at most ``max_per_class`` per class, then the ``top_k`` best overall; sorted by score.
    ``active`` (C,) bool masks out classes the model cannot detect. ``boxes`` may also be
    per-class ``(N,C,4)`` (after box regression): each class's detections then use its own boxes."""
    boxes = np.asarray(boxes, np.float32)
    per_class = boxes.ndim == 3
    boxes = boxes if per_class else boxes.reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    valid = box_area(boxes.reshape(-1, 4)).reshape(boxes.shape[:-1]) > 0  # (N,) or (N,C)
    if isinstance(scores, TopK):  # per-class candidates from rcnn.scoring.score_topk
        C = scores.indices.shape[0]
        ri, ci, sv = scores.flat()
        keep = (valid[ri, ci] if per_class else valid[ri]) & np.isfinite(sv)
        if active is not None:
            keep &= np.asarray(active, bool)[ci]
        if threshold is not None:
            keep &= sv > threshold
        order = np.lexsort((ci[keep], ri[keep]))  # region-major, as np.nonzero on the full matrix
        ri, ci, sv = ri[keep][order], ci[keep][order], sv[keep][order]
    else:
        scores = np.asarray(scores, np.float32)
        scores = scores.reshape(len(boxes), -1) if scores.ndim != 2 else scores
        C = scores.shape[1]
        mask = valid.copy() if per_class else np.broadcast_to(valid[:, None], scores.shape).copy()
        if active is not None:
            mask &= np.asarray(active, bool)[None, :]
        if threshold is not None:
            mask &= scores > threshold
        mask &= np.isfinite(scores)
        ri, ci = np.nonzero(mask)
        sv = scores[ri, ci]
    if len(ri) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    b, s, lab = (boxes[ri, ci] if per_class else boxes[ri]), sv, ci.astype(np.int64)
    keep = np.asarray(batched_nms(b, s, lab, nms_iou), np.int64)  # sorted by decreasing score
    b, s, lab = b[keep], s[keep], lab[keep]
    if max_per_class is not None:
        rank = np.zeros(len(lab), np.int64)
        seen = np.zeros(C, np.int64)
        for i, c in enumerate(lab):
            rank[i] = seen[c]
            seen[c] += 1
        sel = rank < max_per_class
        b, s, lab = b[sel], s[sel], lab[sel]
    if top_k is not None:
        b, s, lab = b[:top_k], s[:top_k], lab[:top_k]
    return b, s, lab


def relocalize(
    model: RCNNModel, image: np.ndarray, source: FeatureSource, boxes: np.ndarray, cand: TopK, rounds: int = 1,
    top: int = RELOCALIZE_TOP,
) -> tuple[np.ndarray, TopK]:
    """Iterative localisation (Gidaris & Komodakis 2015; not in the R-CNN paper, whose detections
    keep the proposal's score for the regressed box): each class's ``top`` best candidates in
    ``cand`` take their regressed box (``boxes`` ``(N,C,4)``, per class), which is *re-scored* and
    regressed again, ``rounds`` times; a detection's score is then the score of the box that was
    regressed last, as for the proposals. The new boxes' features are extracted from ``image``
    (not cached). Returns ``(boxes (M,4), TopK over those M boxes)`` for :func:`postprocess`."""
    reg = model.bbox_reg
    if reg is None:
        raise ModelError("iterative localisation needs a box regressor in the model (rcnn bbox-reg)")
    pos = cand.indices[:, :top]
    ci, slot = np.nonzero(pos >= 0)
    own = np.arange(len(ci))
    cur = np.asarray(boxes, np.float32)[pos[ci, slot], ci]  # (M,4): each candidate's box for its class
    scores = cand.scores[ci, slot]
    reg_src = regression_source(model, source)
    # the scoring and regression taps differ only by layer (e.g. softmax + pool5): one forward pass
    one_pass = {**reg_src.options(), "layer": source.layer} == source.options()
    h, w = image.shape[:2]
    for _ in range(int(rounds) if len(cur) else 0):
        if one_pass:
            out = source.extract(image, cur, list(dict.fromkeys([source.layer, reg_src.layer])))
            feats, reg_feats = out[source.layer], out[reg_src.layer]
        else:
            feats = source.extract(image, cur)
            reg_feats = reg_src.extract(image, cur)
        scores = model.score(feats)[own, ci]
        cur = reg.refine(cur, reg_feats, w, h)[own, ci]
    idx = np.full(pos.shape, -1, np.int64)
    sc = np.full(pos.shape, -np.inf, np.float32)
    idx[ci, slot], sc[ci, slot] = own, scores
    order = np.argsort(-sc, axis=1, kind="stable")  # TopK rows are sorted by decreasing score
    return cur, TopK(np.take_along_axis(idx, order, 1), np.take_along_axis(sc, order, 1))


def regression_source(model: RCNNModel, source: FeatureSource) -> FeatureSource:
    """The features the model's box regressor reads: ``source``'s proposals and network at the
    regressor's settings (its layer; the rest as it was trained, e.g. another RoI grid)."""
    if model.bbox_reg is None:
        raise ModelError("the model has no box regressor (rcnn bbox-reg)")
    return source.with_options(model.bbox_reg.feature_options)


def shares_features(model: RCNNModel, source: FeatureSource) -> bool:
    """Whether the model's box regressor reads exactly the features ``source`` gives its scorer (same
    network, layer and geometry), so the scored features are regressed without a second extraction."""
    fc = getattr(source, "feature_config", None)
    if fc is None or model.bbox_reg is None:
        return False
    try:
        return getattr(regression_source(model, source), "feature_config", None) == fc
    except (TypeError, ValueError):
        return False


def detect_image(
    model: RCNNModel, image: np.ndarray, source: FeatureSource | None = None, threshold: float | None = None,
    top_k: int | None = None, max_per_class: int | None = MAX_PER_CLASS, bbox_reg: bool = True, relocalize_rounds: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detect in one RGB uint8 image: ``(boxes (K,4) xyxy, scores (K,), labels (K,))``.
    An image without proposals gives no detections (and a warning). ``bbox_reg``: refine boxes
    with the model's box regressor (if it has one) after scoring, before NMS.
    ``relocalize_rounds``: rounds of iterative localisation (:func:`relocalize`; 0 = the paper)."""
    source = source or model.feature_source()
    boxes, feats = source.image_regions(image)
    if len(boxes) == 0:
        log.warning("image has no region proposals: no detections")
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    cand = model.score_topk(feats, model.candidates_per_class(len(boxes), max_per_class), threshold)
    if bbox_reg and model.bbox_reg is not None:
        if shares_features(model, source):  # the regressor reads the scored features: no second pass
            boxes = model.bbox_reg.refine(boxes, feats, image.shape[1], image.shape[0])
        else:
            boxes = model.bbox_reg.refine_image(image, boxes, regression_source(model, source))
        if relocalize_rounds:
            boxes, cand = relocalize(model, image, source, boxes, cand, relocalize_rounds)
    return postprocess(boxes, cand, model.nms_iou, threshold, top_k, max_per_class, model.trained)


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
class DetectStats:
    images: int = 0
    seconds: float = 0.0
    no_proposals: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(self.images, 1)


def detect_dataset(
    model: RCNNModel, dataset: Dataset, source: FeatureSource | None = None, threshold: float | None = None,
    top_k: int | None = None, max_per_class: int | None = MAX_PER_CLASS, records: Sequence[ImageRecord] | None = None,
    progress: ProgressFn | None = None, stats: DetectStats | None = None, bbox_reg: bool = True,
    relocalize_rounds: int = 0,
) -> Detections:
    """Detections over a dataset split, reading proposals/features from the caches (computing
    and storing missing ones). Labels index ``model.classes``. ``relocalize_rounds``: see
    :func:`relocalize` (the new boxes' features are computed from the image, not cached)."""
    source = source or model.feature_source(dataset.root)
    reg_src = regression_source(model, source) if bbox_reg and model.bbox_reg is not None else None
    reg_shared = reg_src is not None and shares_features(model, source)
    recs = list(dataset.records if records is None else records)
    stats = stats if stats is not None else DetectStats()
    parts = []
    for i, r in enumerate(recs):
        t0 = time.perf_counter()
        try:
            boxes, feats = source.regions(r)
        except ImageReadError as e:
            stats.failed.append(str(e))
            log.error("%s", e)
            continue
        if len(boxes) == 0:
            stats.no_proposals.append(r.image_id)
            log.warning("%s: no region proposals, no detections", r.path)
        else:
            cand = model.score_topk(feats, model.candidates_per_class(len(boxes), max_per_class), threshold)
            if reg_src is not None:  # after scoring, before NMS (released rcnn_test.m)
                if reg_shared:
                    boxes = model.bbox_reg.refine(boxes, feats, r.width, r.height)
                else:
                    boxes = model.bbox_reg.refine_record(r, boxes, reg_src)
                if relocalize_rounds:
                    boxes, cand = relocalize(model, load_image(r.path), source, boxes, cand, relocalize_rounds)
            b, s, lab = postprocess(boxes, cand, model.nms_iou, threshold, top_k, max_per_class, model.trained)
            parts.append(Detections(np.array([r.image_id] * len(s), dtype=object), b, s, lab))
        stats.images += 1
        stats.seconds += time.perf_counter() - t0
        report(progress, "detect", i + 1, len(recs))
    return Detections.concat(parts)


__all__ = [  # CNNFeatures, HOGFeatures, HOGOptions, MirrorAugmented, hog_features: defined in rcnn.sources
    "FORMAT_VERSION", "HOG_BACKBONE", "MAX_PER_CLASS", "CNNFeatures", "DetectStats", "Detections", "HOGFeatures",
    "HOGOptions", "MirrorAugmented", "ModelError", "RCNNModel", "check_backbone", "detect_dataset", "detect_image",
    "fit", "hog_features", "postprocess", "regression_source", "relocalize", "shares_features", "softmax_model",
]
