"""The zero-training ``imagenet`` detector and the ``rcnn demo`` runner.

R-CNN's test-time pipeline (paper §2.2) with the pretrained backbone's own 1000-way
ImageNet classifier standing in for the per-class SVMs, so it runs with no training data:

1. selective-search proposals (:func:`rcnn.proposals.selective_search`, fast mode);
2. the ``logits`` tap of the backbone for every region (:func:`rcnn.features.extract_features`;
   *shared* mode by default: the trunk runs once per image and each region is RoI-pooled,
   ~2000 regions in about a second on 2 cores; ``mode="warp"`` is the paper's per-region warp);
3. softmax → a :class:`Vocabulary` of readable object names, each a *group* of ImageNet
   classes, scored by the **sum** of its classes' probabilities (the 118 dog breeds share
   their mass instead of each looking unsure; one confident wrong class on a texture
   rarely reaches a group's threshold by itself);
4. background when a group's score is below ``threshold``;
5. per-class greedy NMS at IoU 0.3 (paper §2.2);
6. cross-class suppression (class-agnostic NMS) so one object gets one label.

This demonstrates the pipeline with a *classifier*; it is not a trained detector
(``rcnn train`` trains one). ImageNet has no "person" class, so people are not detected.

Public API: :func:`load_vocabulary`, :class:`Vocabulary`, :class:`DemoConfig`,
:func:`group_detections` (steps 3-6 on given probabilities, pure numpy),
:class:`ImagenetDetector` (``detect(image) -> DetectionResult``), :func:`sample_images`,
:func:`folder_images`, :func:`run_demo` (writes PNGs + ``detections.json`` + ``index.html``).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import html
import itertools
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from rcnn.boxes import batched_nms
from rcnn.cache import save_json
from rcnn.data import ImageReadError, load_image
from rcnn.visualize import draw_detections, make_public, save_png

VOCABULARY_PATH = Path(__file__).resolve().parent / "resources" / "vocabulary.json"
VOC_MAPPING_PATH = Path(__file__).resolve().parent / "resources" / "voc_mapping.json"
NUM_IMAGENET_CLASSES = 1000


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used (one line naming the file and the problem)."""


# ----------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """Readable object names, each a group of ImageNet class indices (logit order)."""

    names: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]  # members[g] = ImageNet indices of group g
    source: str = "builtin"
    num_classes: int = NUM_IMAGENET_CLASSES

    def __len__(self) -> int:
        return len(self.names)

    def matrix(self) -> np.ndarray:
        """``(num_classes, G)`` float32 0/1 membership matrix."""
        m = np.zeros((self.num_classes, len(self.names)), np.float32)
        for g, ids in enumerate(self.members):
            m[list(ids), g] = 1.0
        return m

    def group_scores(self, probs: np.ndarray) -> np.ndarray:
        """``(N, num_classes)`` class probabilities → ``(N, G)`` summed group probabilities."""
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"expected (N, {self.num_classes}) probabilities, got {probs.shape}")
        return probs @ self.matrix()


def _read_json(path: str | Path | None, default: Path, default_name: str) -> tuple[str, object]:
    """``(where, document)`` of the JSON file ``path`` (``None``: the built-in ``default``, named
    ``default_name`` in messages); :class:`VocabularyError` (one line) when unreadable or not JSON."""
    src = Path(path) if path is not None else default
    where = str(src) if path is not None else default_name
    try:
        return where, json.loads(src.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VocabularyError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VocabularyError(f"{where}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise VocabularyError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_vocabulary(path: str | Path | None = None, categories: Sequence[str] | None = None) -> Vocabulary:
    """Read a vocabulary JSON file (default: the built-in ``resources/vocabulary.json``).

    Accepted forms: ``{"groups": [{"name": "cat", "imagenet_ids": [281, ...]}, ...]}``
    (``"imagenet_names"`` or ``"classes"`` may replace ``"imagenet_ids"``; ``"classes"``
    may mix indices and names), or a plain mapping ``{"cat": ["tabby", "tiger cat"], ...}``.
    Names are matched case-insensitively against ``categories`` (default: the 1000
    ImageNet names in logit order). Raises :class:`VocabularyError` (one line) on any problem.
    """
    where, doc = _read_json(path, VOCABULARY_PATH, "built-in vocabulary")

    if isinstance(doc, dict) and "groups" in doc:
        raw = doc["groups"]
    elif isinstance(doc, dict):
        raw = [{"name": k, "classes": v} for k, v in doc.items()]
    else:
        raw = doc
    if not isinstance(raw, list) or not raw:
        raise VocabularyError(
            f"{where}: expected a non-empty list of groups or a {{name: [classes]}} mapping"
        )

    lookup: dict[str, int] | None = None

    def resolve(item: object, gname: str) -> int:
        nonlocal lookup
        if isinstance(item, bool):
            raise VocabularyError(f"{where}: group {gname!r}: {item!r} is not an ImageNet class")
        if isinstance(item, int):
            if not 0 <= item < NUM_IMAGENET_CLASSES:
                raise VocabularyError(
                    f"{where}: group {gname!r}: class index {item} outside 0..{NUM_IMAGENET_CLASSES - 1}"
                )
            return item
        if isinstance(item, str):
            if lookup is None:
                cats = list(categories) if categories is not None else _imagenet_categories()
                lookup = {c.lower(): i for i, c in enumerate(cats)}
            key = item.strip().lower()
            if key not in lookup:
                near = difflib.get_close_matches(key, list(lookup), n=3)
                hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
                raise VocabularyError(f"{where}: group {gname!r}: unknown ImageNet class name {item!r}{hint}")
            return lookup[key]
        raise VocabularyError(f"{where}: group {gname!r}: {item!r} is neither a class index nor a class name")

    names: list[str] = []
    members: list[tuple[int, ...]] = []
    for k, g in enumerate(raw):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not g["name"].strip():
            raise VocabularyError(f'{where}: group #{k + 1} needs a non-empty string "name"')
        name = g["name"].strip()
        # ids are authoritative (names differ between model zoos); names are for reading
        items = g.get("imagenet_ids", g.get("classes", g.get("imagenet_names")))
        if not isinstance(items, list) or not items:
            raise VocabularyError(
                f'{where}: group {name!r} needs a non-empty list "imagenet_ids" (or "classes")'
            )
        if name in names:
            raise VocabularyError(f"{where}: group name {name!r} appears twice")
        ids = tuple(dict.fromkeys(resolve(i, name) for i in items))
        names.append(name)
        members.append(ids)
    return Vocabulary(tuple(names), tuple(members), source=where)


def _imagenet_categories() -> list[str]:
    from rcnn.backbones import imagenet_categories

    return imagenet_categories()


@dataclass(frozen=True)
class ClassMapping:
    """A versioned renaming of detector names to a dataset's class names (``pairs``: name → class)."""

    version: int
    pairs: dict[str, str]
    target: str = ""
    source: str = "builtin"

    def label_map(self, names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
        """``(len(names),)`` int64: each detector name's index in ``classes``, -1 when unmapped."""
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index.get(self.pairs.get(n, ""), -1) for n in names], np.int64)


def load_class_mapping(path: str | Path | None = None) -> ClassMapping:
    """Read a class-mapping JSON (default: the built-in ``resources/voc_mapping.json``, detector
    names → PASCAL VOC 2007 classes): ``{"version": int, "pairs": {name: class}, "target": str}``.
    Raises :class:`VocabularyError` (one line) on any problem."""
    where, doc = _read_json(path, VOC_MAPPING_PATH, "built-in VOC mapping")
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), int) or isinstance(doc.get("version"), bool):
        raise VocabularyError(f'{where}: needs an integer "version"')
    pairs = doc.get("pairs")
    if not isinstance(pairs, dict) or not pairs or not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
        raise VocabularyError(f'{where}: "pairs" must be a non-empty {{name: class}} mapping of strings')
    return ClassMapping(doc["version"], dict(pairs), str(doc.get("target", "")), where)


# ----------------------------------------------------------------------------- grouping + suppression


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the ``imagenet`` detector.

    ``threshold``: a group below this summed probability is background.
    ``nms_iou``: per-class greedy NMS (paper §2.2: 0.3). ``cross_class_iou``: after it,
    a box overlapping a higher-scoring box of *any* group by more than this is dropped.
    ``max_detections``: per image, highest scores first. ``max_side``: images are shrunk
    so their longer side is at most this many pixels before proposals and features
    (boxes are mapped back), which bounds the time on large photos. ``mode``: "shared"
    (fast, default) or "warp" (the paper's per-region warp, §2.1). ``contain``: part
    suppression (:func:`suppress_parts`; 0 = off). ``cross_class_iou`` applies among the
    vocabulary's names, and among each head's (:func:`select_detections`). ``tightness``: with a tightness scorer
    (:mod:`rcnn.tightness`), each vocabulary score is multiplied by the region's predicted IoU
    with its object to this power before the decision (0 = off). ``vote_iou``: box voting after
    the per-name NMS (:func:`vote_boxes`; 0 = off).
    """

    backbone: str = "efficientnet_lite0"
    mode: str = "shared"  # shared conv map + RoI pooling: ~10x faster than warping 2000 regions
    threshold: float = 0.5
    nms_iou: float = 0.3  # paper §2.2
    cross_class_iou: float = 0.5
    max_detections: int = 10
    max_side: int = 640
    min_box_size: float = 16.0
    min_box_frac: float = 0.01
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5)
    contain: float = 0.7
    batch_size: int = 256
    tightness: float = 0.0  # vocabulary scores × predicted IoU ** tightness (needs a tightness scorer)
    vote_iou: float = 0.0  # box voting after NMS (vote_boxes); 0 = off

    def __post_init__(self) -> None:
        if self.mode not in ("shared", "warp"):
            raise ValueError(f"mode must be 'shared' or 'warp', not {self.mode!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.nms_iou <= 1.0 or not 0.0 < self.cross_class_iou <= 1.0:
            raise ValueError("IoU thresholds must be in (0, 1]")
        if self.tightness < 0:
            raise ValueError(f"tightness must be >= 0, got {self.tightness}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits (float64 internally for stability) → float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def group_detections(
    boxes: np.ndarray, probs: np.ndarray, vocabulary: Vocabulary, config: DemoConfig | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 3-6: region class probabilities → final detections.

    ``boxes`` (N,4) xyxy, ``probs`` (N,1000) softmax probabilities. Every (region, group)
    pair whose summed probability reaches ``threshold`` is a candidate (as R-CNN scores
    every class for every region); per-class NMS; then class-agnostic NMS at
    ``cross_class_iou``; at most ``max_detections``. Returns ``boxes (K,4) float32``,
    ``scores (K,) float32`` (decreasing), ``labels (K,) int64`` (vocabulary indices).
    """
    scores = vocabulary.group_scores(probs)
    return select_detections(boxes, scores, config)


def select_detections(
    boxes: np.ndarray, scores: np.ndarray, config: DemoConfig | None = None, class_boxes: np.ndarray | None = None,
    families: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 4-6 on per-name scores: ``boxes`` (N,4) xyxy, ``scores`` (N,G) in 0..1, ``class_boxes``
    (N,G,4) or None (a name's own refined box of each region, e.g. after box regression).

    Every (region, name) pair scoring at least ``threshold`` is a candidate; per-name NMS at
    ``nms_iou``; part suppression (``contain``); NMS across names at ``cross_class_iou``; at most
    ``max_detections``. ``families`` (G,) int: only names of one family compete across names
    (default: all one family). The vocabulary's names are one family — alternatives of one softmax,
    one label per object — and each head another: a person and the uniform, tie or hat they wear
    share a box legitimately. Returns ``boxes (K,4) float32``, ``scores (K,) float32`` (decreasing),
    ``labels (K,) int64`` (name indices)."""
    config = config or DemoConfig()
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} score rows")
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    if len(boxes) == 0:
        return empty
    ri, gi = np.nonzero(scores >= config.threshold)
    if len(ri) == 0:
        return empty
    cb = boxes[ri] if class_boxes is None else np.asarray(class_boxes, np.float32)[ri, gi]
    cs, cl = scores[ri, gi].astype(np.float32), gi.astype(np.int64)
    keep = batched_nms(cb, cs, cl, config.nms_iou)  # paper §2.2: greedy NMS per class
    if config.vote_iou > 0:
        voted = vote_boxes(cb[keep], cl[keep], cb, cs, cl, config.vote_iou)
        cb, cs, cl = voted, cs[keep], cl[keep]
    else:
        cb, cs, cl = cb[keep], cs[keep], cl[keep]
    if config.contain > 0:
        keep = suppress_parts(cb, cs, cl, config.contain)
        cb, cs, cl = cb[keep], cs[keep], cl[keep]
    fam = np.zeros(len(cl), np.int64) if families is None else np.asarray(families, np.int64)[cl]
    keep = np.asarray(batched_nms(cb, cs, fam, config.cross_class_iou), np.int64)  # one object, one label
    keep = keep[np.argsort(-cs[keep], kind="stable")][: config.max_detections]
    return cb[keep], cs[keep], cl[keep]


def vote_boxes(kept: np.ndarray, kept_labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
               iou: float = 0.5) -> np.ndarray:
    """Box voting (Gidaris & Komodakis 2015, not in R-CNN): each kept box ``(K,4)`` becomes the
    score-weighted mean of the candidates ``(N,4)`` of its class overlapping it by IoU ≥ ``iou``
    (itself included). Returns ``(K,4)`` float32."""
    from rcnn.boxes import box_iou

    kept = np.asarray(kept, np.float32).reshape(-1, 4)
    if len(kept) == 0:
        return kept
    ov = np.asarray(box_iou(kept, np.asarray(boxes, np.float32)))
    w = (ov >= iou) & (np.asarray(kept_labels)[:, None] == np.asarray(labels)[None, :])
    w = w * np.asarray(scores, np.float64)[None, :]
    out = (w @ np.asarray(boxes, np.float64)) / np.maximum(w.sum(1, keepdims=True), 1e-12)
    return np.where(w.sum(1, keepdims=True) > 0, out, kept).astype(np.float32)


def suppress_parts(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, contain: float = 0.7
) -> np.ndarray:
    """Greedy, per class: drop a box when more than ``contain`` of its area lies inside a
    higher-scoring kept box of the same class. Indices ``(K,)`` kept, by decreasing score.

    Why: a classifier fires on object *parts* (a patch of tabby fur is "tabby"); R-CNN's
    SVMs learn to reject parts from hard negatives (IoU < 0.3, paper §2.3), a classifier
    cannot, and NMS at IoU 0.3 keeps a small part inside a whole-object box (low IoU).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores), kind="stable")
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    kept: list[int] = []
    for j in order:
        same = [i for i in kept if labels[i] == labels[j]]
        if same:
            k = boxes[same]
            iw = np.clip(np.minimum(k[:, 2], boxes[j, 2]) - np.maximum(k[:, 0], boxes[j, 0]), 0, None)
            ih = np.clip(np.minimum(k[:, 3], boxes[j, 3]) - np.maximum(k[:, 1], boxes[j, 1]), 0, None)
            if (iw * ih).max() > contain * max(float(area[j]), 1e-9):
                continue
        kept.append(int(j))
    return np.asarray(kept, dtype=np.int64)


# ----------------------------------------------------------------------------- detector


@dataclass
class DetectionResult:
    """Detections on one image: ``boxes`` (K,4) pixel-edge xyxy in the input image's
    pixels, ``scores`` (K,), ``labels`` (K,) indices into ``class_names``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    num_proposals: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return [
            (self.class_names[int(lab)], float(s))
            for lab, s in zip(self.labels[:k], self.scores[:k], strict=True)
        ]


def platt(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    """Platt scaling: SVM scores → probabilities ``1 / (1 + exp(-(a·s + b)))`` (float32, same shape)."""
    z = np.clip(a * np.asarray(scores, np.float64) + b, -60.0, 60.0)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt's calibration of SVM ``scores`` (N,) against 0/1 ``labels`` (N,): ``(a, b)`` of the
    logistic regression ``P(y=1|s) = 1/(1+exp(-(a s + b)))``, fitted by maximum likelihood with
    Platt's smoothed targets ``(N₊+1)/(N₊+2)`` and ``1/(N₋+2)`` (they keep it finite when the
    classes separate). Fit it on held-out scores, never on the SVM's own training regions."""
    from scipy.optimize import minimize

    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, bool).reshape(-1)
    if len(s) != len(y) or not y.any() or y.all():
        raise ValueError("Platt scaling needs scores with both positive and negative labels")
    npos, nneg = int(y.sum()), int((~y).sum())
    t = np.where(y, (npos + 1.0) / (npos + 2.0), 1.0 / (nneg + 2.0))

    def loss(p: np.ndarray) -> tuple[float, np.ndarray]:
        z = p[0] * s + p[1]
        # log(1+exp(z)) - t z, stable for either sign of z
        ll = np.logaddexp(0.0, z) - t * z
        g = 1.0 / (1.0 + np.exp(-z)) - t
        return float(ll.sum()), np.array([float((g * s).sum()), float(g.sum())])

    a0 = 1.0 / max(float(s.std()), 1e-6)
    res = minimize(loss, np.array([a0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


class ModelHead:
    """More names for the zero-training detector: a trained R-CNN model (:class:`rcnn.detect.RCNNModel`,
    e.g. the packaged person SVM) scoring the detector's *own* proposals, its SVM scores turned into
    probabilities by Platt scaling (``platt_ab``, fitted on held-out data) so one threshold serves the
    vocabulary's summed softmax probabilities and these. Its box regressor (if any) refines each
    region's box for its classes. The model's network runs once per image over the shared
    proposals, computing the SVM tap and the regressor's tap in the same pass. ``precision``
    overrides the model's CNN arithmetic (``"fp32"``/``"bf16"``; None: as trained).
    """

    def __init__(self, model, platt_ab: tuple[float, float], bbox_reg: bool = True, precision: str | None = None):
        self.model = model
        self.platt_ab = (float(platt_ab[0]), float(platt_ab[1]))
        self.source = model.feature_source()
        if precision is not None and precision != self.source.feature_config.precision:
            # a speed knob: bf16 autocast is slower than fp32 on CPUs without native bf16, and the
            # features agree within ~1% (the SVM was trained on float16-stored features anyway)
            from rcnn.detect import CNNFeatures

            src = self.source
            self.source = CNNFeatures(src.proposal_config, replace(src.feature_config, precision=precision),
                                      backbone=src.backbone)
        self.bbox_reg = bbox_reg and model.bbox_reg is not None
        self.active = np.flatnonzero(np.asarray(model.trained, bool))
        self.names = [model.classes[i] for i in self.active]

    def describe(self) -> str:
        """One line: the model's network, layer and calibration."""
        m = self.model
        return (f"{m.backbone} {m.layer} SVM{' + box regression' if self.bbox_reg else ''}, "
                f"Platt a={self.platt_ab[0]:.4g} b={self.platt_ab[1]:.4g}")

    def same_features(self, feature_config) -> bool:
        """Whether ``feature_config`` (a :class:`rcnn.features.FeatureConfig`) differs from this head's
        features only by layer: its tap can then come from this head's forward pass."""
        mine = self.source.feature_config
        return replace(feature_config, layer=mine.layer, with_gt=False, precision=mine.precision) == replace(mine, with_gt=False)

    def score(self, image: np.ndarray, boxes: np.ndarray, extra_taps: Sequence[str] = ()
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Calibrated probabilities ``(N,C)`` of the trained classes for ``boxes`` (N,4) of ``image``,
        each class's box of every region ``(N,C,4)`` (regressed when the model has a regressor), and
        ``{tap: (N,D)}`` of the ``extra_taps`` computed in the same forward pass."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        layer = self.model.layer
        taps = [layer]
        reg_layer = self.model.bbox_reg.layer if self.bbox_reg else None
        if reg_layer is not None:
            if not self.same_features(self.source.with_options(self.model.bbox_reg.feature_options).feature_config):
                raise ValueError("the model's box regressor reads other features than its SVMs: not supported here")
            taps.append(reg_layer)
        out = self.source.extract(image, boxes, list(dict.fromkeys([*taps, *extra_taps])))
        probs = platt(self.model.score(out[layer])[:, self.active], *self.platt_ab)
        extras = {t: out[t] for t in extra_taps}
        if reg_layer is None:
            return probs, np.repeat(boxes[:, None, :], len(self.active), axis=1), extras
        h, w = image.shape[:2]
        refined = self.model.bbox_reg.refine(boxes, out[reg_layer], w, h)[:, self.active]
        return probs, refined, extras


@dataclass
class Proposals:
    """Selective-search boxes of one image: ``image`` the (possibly shrunk) RGB image they are in,
    ``boxes`` (N,4) xyxy in its pixels, ``size`` the original image's (width, height)."""

    image: np.ndarray
    boxes: np.ndarray
    size: tuple[int, int]
    seconds: float = 0.0


@dataclass
class RegionScores:
    """Every region of one image with each name's score, before the decision.

    ``boxes`` (N,4) xyxy in the input image's pixels; ``scores`` (N,G) float32 in 0..1 (G names);
    ``class_boxes`` (N,G,4) or None: a name's own (refined) box of each region; ``image_size``
    (width, height); ``seconds`` per stage so far; ``tightness`` (N,) or None: each region's
    predicted IoU with its object (:class:`rcnn.tightness.TightnessScorer`)."""

    boxes: np.ndarray
    scores: np.ndarray
    class_boxes: np.ndarray | None
    image_size: tuple[int, int]
    num_proposals: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    tightness: np.ndarray | None = None


class ImagenetDetector:
    """The zero-training detector (model name ``imagenet``); ``detect(image)`` like a trained model.

    ``vocabulary``: a :class:`Vocabulary`, a path to a vocabulary JSON, or None (built-in).
    ``heads``: :class:`ModelHead` s adding trained names (e.g. the packaged person SVM,
    :func:`rcnn.zoo.load` ``("imagenet")``) scored over the same proposals; their names follow the
    vocabulary's in ``class_names``. The backbone is loaded once (from installed packages; no download).
    """

    name = "imagenet"

    def __init__(self, vocabulary: Vocabulary | str | Path | None = None, config: DemoConfig | None = None,
                 heads: Sequence[ModelHead] = (), tightness=None):
        from rcnn.backbones import get_backbone

        self.config = config or DemoConfig()
        self.backbone = get_backbone(self.config.backbone)
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = load_vocabulary(vocabulary, categories=self.backbone.categories)
        self.vocabulary = vocabulary
        self.heads = list(heads)
        self.class_names = list(vocabulary.names) + [n for h in self.heads for n in h.names]
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"a head's class name repeats a vocabulary name: {self.class_names[len(vocabulary):]}")
        self.tightness = tightness
        # the tightness scorer reads its tap from a head's forward pass when the features agree
        self._tight_host = None if tightness is None else next(
            (h for h in self.heads if h.same_features(tightness.feature_config())), None)
        self._tight_source = None

    def region_probs(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``(N,1000)`` ImageNet softmax probabilities of each region (``logits`` tap)."""
        from rcnn.features import extract_features

        logits = extract_features(
            image,
            boxes,
            self.backbone,
            layer="logits",
            mode=self.config.mode,
            batch_size=self.config.batch_size,
            scales=self.config.scales,
        )
        return softmax(logits)

    def propose(self, image: np.ndarray) -> Proposals:
        """Step 1 on an ``(H,W,3)`` RGB uint8 image: selective search on the image shrunk to
        ``max_side``, small boxes dropped. Runs no network, so it can run in another thread while
        the previous image's regions are scored (:func:`run_demo` does)."""
        import cv2

        from rcnn.proposals import selective_search

        cfg = self.config
        if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only input
            image = image.copy()
        t0 = time.perf_counter()
        h, w = image.shape[:2]
        scale = min(1.0, cfg.max_side / max(h, w))
        small = image
        if scale < 1.0:
            # shrinking large photos bounds the time; boxes are mapped back in score_regions
            small = cv2.resize(
                image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
            )
        sh, sw = small.shape[:2]
        boxes = selective_search(small)  # paper §2.1: selective search, fast mode
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = (np.minimum(bw, bh) >= cfg.min_box_size) & (bw * bh >= cfg.min_box_frac * sw * sh)
        boxes = boxes[ok] if ok.any() else boxes
        return Proposals(small, boxes, (w, h), time.perf_counter() - t0)

    def score_regions(self, image: np.ndarray | Proposals) -> RegionScores:
        """Steps 1-3: proposals (unless ``image`` is already :meth:`propose` 's result) and each
        name's score per region."""
        from rcnn.backbones import set_threads

        set_threads()
        prop = image if isinstance(image, Proposals) else self.propose(image)
        small, boxes, (w, h) = prop.image, prop.boxes, prop.size
        sh, sw = small.shape[:2]
        t1 = time.perf_counter()
        scores = self.vocabulary.group_scores(self.region_probs(small, boxes))
        t2 = time.perf_counter()
        back = np.array([w / sw, h / sh, w / sw, h / sh], np.float32)
        seconds = {"proposals": prop.seconds, "features": t2 - t1}
        class_boxes, extras = None, {}
        if self.heads:
            # the heads score the same proposals (no second proposal pass); their own network runs once
            parts, pboxes = [scores], [np.repeat(boxes[:, None, :], scores.shape[1], axis=1)]
            for head in self.heads:
                extra = [self.tightness.layer] if head is self._tight_host else []
                hp, hb, ex = head.score(small, boxes, extra)
                parts.append(hp)
                pboxes.append(hb)
                extras.update(ex)
            scores = np.concatenate(parts, axis=1)
            class_boxes = (np.concatenate(pboxes, axis=1) * back).astype(np.float32)
            seconds["heads"] = time.perf_counter() - t2
        tight = None
        if self.tightness is not None:
            t3 = time.perf_counter()
            feats = extras.get(self.tightness.layer) if self._tight_host is not None else None
            if feats is None:
                feats = self._tightness_source().extract(small, boxes)
            tight = self.tightness.predict(feats)
            seconds["tightness"] = time.perf_counter() - t3
        return RegionScores((boxes * back).astype(np.float32), scores, class_boxes, (w, h), len(boxes), seconds, tight)

    def _tightness_source(self):
        """The tightness scorer's own feature source (used when no head shares its network pass)."""
        if self._tight_source is None:
            from rcnn.detect import CNNFeatures
            from rcnn.proposals import ProposalConfig

            self._tight_source = CNNFeatures(ProposalConfig(), self.tightness.feature_config())
        return self._tight_source

    def decide(self, regions: RegionScores, config: DemoConfig | None = None) -> DetectionResult:
        """Steps 4-6 on scored regions (``config``: this detector's unless given)."""
        t0 = time.perf_counter()
        config = config or self.config
        scores = regions.scores
        if regions.tightness is not None and config.tightness > 0:
            # vocabulary names only: a head's SVM already learned to reject loose boxes and parts
            g = len(self.vocabulary)
            scores = scores.copy()
            scores[:, :g] *= np.power(np.clip(regions.tightness, 1e-6, 1.0), config.tightness)[:, None]
        families = np.zeros(len(self.class_names), np.int64)
        k = len(self.vocabulary)
        for f, head in enumerate(self.heads, 1):
            families[k : k + len(head.names)] = f
            k += len(head.names)
        db, ds, dl = select_detections(regions.boxes, scores, config, regions.class_boxes, families)
        seconds = {**regions.seconds, "postprocess": time.perf_counter() - t0}
        seconds["total"] = sum(seconds.values())
        return DetectionResult(db, ds, dl, self.class_names, num_proposals=regions.num_proposals, seconds=seconds)

    def detect(self, image: np.ndarray) -> DetectionResult:
        """Detect vocabulary objects in an ``(H,W,3)`` RGB uint8 image."""
        return self.decide(self.score_regions(image))

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self.detect(image)
        return r.boxes, r.scores, r.labels


# ----------------------------------------------------------------------------- inputs


@dataclass
class ImageSource:
    """One input image: ``name`` (output file stem), ``origin`` (where it came from),
    ``load()`` → (H,W,3) RGB uint8 (may raise :class:`ImageReadError`)."""

    name: str
    origin: str
    load: Callable[[], np.ndarray]


def sample_images() -> list[ImageSource]:
    """Real photos shipped inside installed packages (offline): scikit-image and matplotlib."""
    from skimage import data as skdata

    out = [
        ImageSource(
            n, f"skimage.data.{n}()", (lambda n=n: np.ascontiguousarray(getattr(skdata, n)()[..., :3]))
        )
        for n in ("chelsea", "coffee", "rocket", "astronaut")
    ]
    try:
        import matplotlib.cbook as cbook

        p = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        if p.is_file():
            out.append(
                ImageSource(
                    "grace_hopper", "matplotlib sample_data/grace_hopper.jpg", lambda p=p: load_image(p)
                )
            )
    except (OSError, ValueError):  # matplotlib without sample data: four photos are enough
        pass
    return out


def folder_images(folder: str | Path) -> list[ImageSource]:
    """Every non-hidden file directly inside ``folder`` (or ``folder`` itself if a file), by name.

    Non-images are not filtered here: loading them raises :class:`ImageReadError`, which
    :func:`run_demo` reports as a one-line warning and skips.
    """
    folder = Path(folder)
    files = (
        [folder]
        if folder.is_file()
        else sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    )
    return [ImageSource(p.stem, str(p), (lambda p=p: load_image(p))) for p in files]


def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove a file can be written there; raises ``OSError`` (one line) if not."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OSError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".rcnn-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OSError(f"{out}: cannot write there ({e.strerror or e})") from None
    return out


def demo_inputs(images: str | Path | None, vocabulary: str | Path | None, out_dir: str | Path,
                ) -> tuple[list[ImageSource], Vocabulary | None]:
    """``rcnn demo``'s inputs, checked before any slow work and before ``out_dir`` is created (a
    refused run leaves nothing behind): the photos of ``images`` (a folder or one file; None:
    :func:`sample_images`) and the vocabulary file (None: the built-in one), then
    :func:`check_writable` of ``out_dir``. ``ValueError`` (one line) for any problem."""
    if images is not None:
        if not Path(images).exists():
            raise ValueError(f"{images}: no such file or folder")
        sources = folder_images(images)
        if not sources:
            raise ValueError(f"{images}: folder is empty, no images to run on")
    else:
        sources = sample_images()
    vocab = load_vocabulary(vocabulary) if vocabulary is not None else None
    try:
        check_writable(out_dir)
    except OSError as e:
        raise ValueError(f"output folder {e}") from None
    return sources, vocab


# ----------------------------------------------------------------------------- outputs


@dataclass
class ImageReport:
    name: str
    origin: str
    file_name: str  # annotated PNG, relative to the output folder
    width: int
    height: int
    result: DetectionResult


@dataclass
class DemoReport:
    out_dir: Path
    images: list[ImageReport]
    skipped: list[str]  # one-line reasons
    json_path: Path
    html_path: Path


def _safe_stem(name: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"
    cand, k = stem, 2
    while cand.lower() in used:
        cand, k = f"{stem}-{k}", k + 1
    used.add(cand.lower())
    return cand


def coco_document(reports: Sequence[ImageReport], vocabulary: Vocabulary, config: DemoConfig,
                  heads: Sequence[ModelHead] = ()) -> dict:
    """The ``detections.json`` document (COCO layout; ``bbox`` = [x, y, w, h] pixels, 0-based).
    Categories: the vocabulary's names (with their ImageNet ids), then each head's names."""
    from rcnn._version import __version__


    anns = []
    for i, r in enumerate(reports, 1):
        res = r.result
        for b, s, lab in zip(res.boxes, res.scores, res.labels, strict=True):
            x1, y1, x2, y2 = (float(v) for v in b)
            anns.append({
                "id": len(anns) + 1, "image_id": i, "category_id": int(lab) + 1,
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2), "score": round(float(s), 4), "iscrowd": 0,
            })  # fmt: skip
    return {
        "info": {
            "description": "rcnn demo: zero-training 'imagenet' detector (ImageNet classifier over selective-search regions)",
            "version": __version__,
            "date_created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "vocabulary": vocabulary.source,
            "config": asdict(config),
        },
        "images": [
            {
                "id": i,
                "file_name": r.file_name,
                "source": r.origin,
                "width": r.width,
                "height": r.height,
                "num_proposals": r.result.num_proposals,
                "seconds": round(r.result.seconds.get("total", 0.0), 3),
            }
            for i, r in enumerate(reports, 1)
        ],
        "categories": [
            {"id": g + 1, "name": n, "imagenet_ids": list(vocabulary.members[g])}
            for g, n in enumerate(vocabulary.names)
        ]
        + [
            {"id": len(vocabulary.names) + k + 1, "name": n, "head": h.describe()}
            for k, (h, n) in enumerate((h, n) for h in heads for n in h.names)
        ],
        "annotations": anns,
    }


def write_html(path: Path, reports: Sequence[ImageReport], skipped: Sequence[str]) -> Path:
    """A self-contained ``index.html`` showing the annotated images side by side."""
    cards = []
    for r in reports:
        rows = (
            "".join(
                f"<li>{html.escape(n)} <b>{s:.2f}</b></li>" for n, s in r.result.top(len(r.result.scores))
            )
            or "<li><i>no detections</i></li>"
        )
        cards.append(
            f'<figure><a href="{html.escape(r.file_name)}"><img src="{html.escape(r.file_name)}" '
            f'alt="{html.escape(r.name)}"></a><figcaption><b>{html.escape(r.name)}</b> '
            f"<small>({html.escape(r.origin)}, {r.width}×{r.height}, "
            f"{r.result.seconds.get('total', 0):.1f} s)</small><ul>{rows}</ul></figcaption></figure>"
        )
    skipped_html = ""
    if skipped:
        items = "".join(f"<li>{html.escape(s)}</li>" for s in skipped)
        skipped_html = f"<h2>Skipped files</h2><ul>{items}</ul>"
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rcnn demo</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}}
.grid{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{margin:0;background:#fff;border:1px solid #ddd;padding:.5em;max-width:480px}}
img{{max-width:100%;height:auto;display:block}}
ul{{margin:.3em 0;padding-left:1.2em}}
</style></head><body>
<h1>rcnn demo</h1>
<p>Zero-training detector: selective-search regions scored by an ImageNet classifier, classes grouped into
readable names. It demonstrates the R-CNN pipeline; a real detector is trained with <code>rcnn train</code>.
Detections: <a href="detections.json">detections.json</a> (COCO layout).</p>
<div class="grid">
{"".join(cards)}
</div>
{skipped_html}
</body></html>
"""
    from rcnn.cache import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(doc, encoding="utf-8"))
    make_public(path)
    return path


def contact_sheet(images: Sequence[np.ndarray], height: int = 240, gap: int = 4, columns: int | None = None) -> np.ndarray:
    """The annotated images side by side, each resized to ``height`` px: (H, W, 3) uint8.
    ``columns``: at most this many per row, rows stacked top to bottom (default: one row)."""
    from PIL import Image

    tiles = [Image.fromarray(im).resize((max(1, round(im.shape[1] * height / im.shape[0])), height), Image.LANCZOS)
             for im in images]  # fmt: skip
    per_row = max(1, columns or len(tiles) or 1)
    rows = [tiles[i : i + per_row] for i in range(0, len(tiles), per_row)] or [[]]
    width = max(sum(t.width for t in r) + gap * max(len(r) - 1, 0) for r in rows)
    sheet = Image.new("RGB", (max(width, 1), height * len(rows) + gap * (len(rows) - 1)), (255, 255, 255))
    for k, r in enumerate(rows):
        x = 0
        for t in r:
            sheet.paste(t, (x, k * (height + gap)))
            x += t.width + gap
    return np.asarray(sheet)


def run_demo(
    sources: Iterable[ImageSource],
    out_dir: str | Path,
    detector: ImagenetDetector | None = None,
    on_image: Callable[[ImageReport], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> DemoReport:
    """Detect on each source and write ``OUT/<name>.png``, ``OUT/detections.json``, ``OUT/index.html``
    and ``OUT/summary.png`` (every annotated image side by side, 240 px high, 256 colours).

    Unreadable sources are skipped (``on_skip(one_line_reason)``), never fatal. The JSON
    and HTML are rewritten after every image, so an interrupted run leaves valid outputs.
    """
    out = check_writable(out_dir)
    detector = detector or ImagenetDetector()
    reports: list[ImageReport] = []
    skipped: list[str] = []
    used: set[str] = {"index", "detections", "summary"}
    thumbs: list[np.ndarray] = []
    json_path, html_path = out / "detections.json", out / "index.html"

    def report_image(src: ImageSource, image: np.ndarray, res: DetectionResult) -> None:
        stem = _safe_stem(src.name, used)
        drawn = draw_detections(image, res.boxes, res.labels, res.scores, res.class_names)
        save_png(out / f"{stem}.png", drawn)
        thumbs.append(contact_sheet([drawn]))
        rep = ImageReport(src.name, src.origin, f"{stem}.png", image.shape[1], image.shape[0], res)
        reports.append(rep)
        save_json(json_path, coco_document(reports, detector.vocabulary, detector.config, detector.heads))
        write_html(html_path, reports, skipped)
        if on_image:
            on_image(rep)

    def load_and_propose(src: ImageSource) -> tuple[np.ndarray, Proposals] | str:
        try:
            image = src.load()
        except ImageReadError as e:
            return str(e).splitlines()[0]
        return image, detector.propose(image)

    # the next image's selective search (one core, no network) runs while this image's regions
    # are scored (torch threads): the stages overlap instead of taking turns
    with ThreadPoolExecutor(1) as pool:
        it = iter(sources)
        pending = [(src, pool.submit(load_and_propose, src)) for src in itertools.islice(it, 1)]
        while pending:
            src, fut = pending.pop(0)
            got = fut.result()
            pending += [(nxt, pool.submit(load_and_propose, nxt)) for nxt in itertools.islice(it, 1)]
            if isinstance(got, str):
                skipped.append(got)
                if on_skip:
                    on_skip(got)
                continue
            image, prop = got
            report_image(src, image, detector.decide(detector.score_regions(prop)))
    make_public(save_json(json_path, coco_document(reports, detector.vocabulary, detector.config, detector.heads)))
    write_html(html_path, reports, skipped)
    if thumbs:
        save_png(out / "summary.png", contact_sheet(thumbs), colors=256)
    return DemoReport(out, reports, skipped, json_path, html_path)


__all__ = [
    "VOCABULARY_PATH",
    "VOC_MAPPING_PATH",
    "ClassMapping",
    "DemoConfig",
    "DemoReport",
    "DetectionResult",
    "ImageReport",
    "ImageSource",
    "ImagenetDetector",
    "ModelHead",
    "Proposals",
    "RegionScores",
    "Vocabulary",
    "VocabularyError",
    "check_writable",
    "coco_document",
    "contact_sheet",
    "demo_inputs",
    "fit_platt",
    "folder_images",
    "group_detections",
    "load_class_mapping",
    "load_vocabulary",
    "platt",
    "run_demo",
    "sample_images",
    "select_detections",
    "softmax",
    "suppress_parts",
    "vote_boxes",
    "write_html",
]
