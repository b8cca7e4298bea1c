"""The R-CNN detector: model file, region feature sources, detection and evaluation.

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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rcnn.boxes import NMS_IOU, batched_nms, box_area
from rcnn.cache import cache_dir, file_sha256, load_npz, save_npz, settings_hash
from rcnn.data import Dataset, ImageRecord, load_image
from rcnn.evaluate import ClassResult, Detections, EvalResult, evaluate_detections
from rcnn.scoring import TopK, score_topk
from rcnn.svm import SVMConfig, TrainResult, scale_from_json, scale_to_json, score_regions, train_detector

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
HOG_BACKBONE = "hog"


class ModelError(ValueError):
    """A model file that cannot be used here (one line naming the file and the problem)."""


# ------------------------------------------------------------------------ model file


@dataclass
class RCNNModel:
    """Per-class linear SVMs over one kind of region feature.

    ``W`` ``(D,C)`` float32 and ``b`` ``(C,)`` act on features multiplied by ``feature_scale``
    (a scalar; per dimension for joined taps, :func:`rcnn.svm.block_scale`);
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
    bbox_reg: Any = None  # rcnn.bbox_regression.BoxRegressor (issue 8), applied before NMS

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
        from safetensors.numpy import save_file

        from rcnn.cache import atomic_write

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
        from safetensors import safe_open

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
            from rcnn.bbox_regression import BoxRegressor

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
    def proposal_config(self):
        from rcnn.proposals import ProposalConfig

        opts = dict(self.proposal_options)
        if "ks" in opts:
            opts["ks"] = tuple(opts["ks"])
        return ProposalConfig(**{k: v for k, v in opts.items() if k in {f.name for f in fields(ProposalConfig)}})

    def feature_source(self, dataset_root: str | Path | None = None, backbone=None, flip: bool | None = None) -> RegionFeatures:
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


# ------------------------------------------------------------------ feature sources


class RegionFeatures:
    """Base of feature sources: ``regions(record)`` and ``gt_features(record)`` (see
    :class:`rcnn.svm.FeatureSource`) plus ``image_regions(image)`` for a new image."""

    name = ""
    layer = ""
    mode = ""
    weights_hash = ""

    def options(self) -> dict:
        return {}

    def cache_mb(self) -> float:
        return 0.0


def _gt_cache_path(kind: str, key: str, root: str | Path | None, record: ImageRecord) -> Path:
    droot = str(Path(root).resolve()) if root is not None else str(Path(record.path).parent.resolve())
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in record.image_id)[:80]
    return cache_dir() / kind / key / settings_hash("dataset", droot) / f"{safe}-{settings_hash(record.image_id, length=8)}.npz"


def _cached_gt(path: Path, record: ImageRecord, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Ground-truth features cached per image, keyed by the image's bytes and its boxes."""
    sha = settings_hash(file_sha256(record.path), np.asarray(record.boxes, np.float32).round(2).tolist())
    z = load_npz(path)
    if z is not None and str(z.get("key", "")) == sha and z["feats"].shape[0] == len(record.boxes):
        return z["feats"]
    feats = compute()
    save_npz(path, feats=np.asarray(feats, np.float16), key=np.array(sha))
    return np.asarray(feats, np.float16)


class CNNFeatures(RegionFeatures):
    """CNN features of proposals through the feature cache (:func:`rcnn.features.get_features`).

    The cache stores each image's ground-truth boxes first (``with_gt``): their features are
    computed exactly like the proposals' (paper §2.3 positives), in the same pass."""

    def __init__(self, proposal_config, feature_config, dataset_root: str | Path | None = None, backbone=None):
        from rcnn.backbones import get_backbone

        self.proposal_config = proposal_config
        self.feature_config = replace(feature_config, with_gt=True)
        self.dataset_root = dataset_root
        self.name = feature_config.backbone
        self.layer = feature_config.layer
        self.mode = feature_config.mode
        self._backbone = backbone
        self._get_backbone = lambda: get_backbone(self.name, feature_config.weights)

    @classmethod
    def from_options(cls, proposal_config, options: dict, dataset_root=None, backbone=None) -> CNNFeatures:
        from rcnn.features import FeatureConfig

        names = {f.name for f in fields(FeatureConfig)}
        opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k in names}
        return cls(proposal_config, FeatureConfig(**opts), dataset_root, backbone)

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = self._get_backbone()
        return self._backbone

    @property
    def weights_hash(self) -> str:  # type: ignore[override]
        return self.backbone.weights_hash

    def options(self) -> dict:
        d = asdict(self.feature_config)
        d.pop("batch_size", None)
        d.pop("device", None)  # where features were computed is not part of the model (rcnn.device)
        return d

    @property
    def dim(self) -> int:
        from rcnn.features import layer_dim

        return layer_dim(self.backbone, self.layer, self.feature_config.grid)

    @property
    def blocks(self) -> tuple[int, ...] | None:
        """Each tap's dimension when the layer joins several (``pool5+fire5``): scaled separately."""
        from rcnn.features import split_layer

        taps = split_layer(self.layer)
        return tuple(self.backbone.dim(t, self.feature_config.grid) for t in taps) if len(taps) > 1 else None

    def _stored(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray, int]:
        from rcnn.features import get_features

        memo = getattr(self, "_memo", None)
        if memo is not None and memo[0] is record:  # regions() then gt_features() of one image: read once
            return memo[1]
        boxes, feats = get_features(record, self.proposal_config, self.feature_config, self.dataset_root)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        n_gt = len(record.boxes)
        if n_gt and (len(boxes) < n_gt or not np.allclose(boxes[:n_gt], record.boxes, atol=0.01)):
            raise ValueError(f"{record.path}: cached features do not start with this image's ground-truth boxes")
        self._memo = (record, (boxes, feats, n_gt))
        return boxes, feats, n_gt

    def regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        boxes, feats, n_gt = self._stored(record)
        return boxes[n_gt:], feats[n_gt:]

    def gt_features(self, record: ImageRecord) -> np.ndarray:
        memo = getattr(self, "_memo", None)
        if self.pools_boxes and not (memo is not None and memo[0] is record):
            return self.box_features(record, record.boxes)  # only the few ground-truth boxes
        _, feats, n_gt = self._stored(record)
        return feats[:n_gt]

    @property
    def pools_boxes(self) -> bool:
        """Shared mode: any box of a dataset image is pooled from its cached trunk maps
        (:meth:`box_features`), so a pass that needs a few boxes need not pool them all."""
        return self.feature_config.mode == "shared"

    def region_boxes(self, record: ImageRecord) -> np.ndarray:
        """The image's proposals ``(N,4)``, in the order :meth:`regions` returns them (no features)."""
        from rcnn.proposals import get_proposals

        return get_proposals(record, self.proposal_config, self.dataset_root).astype(np.float32).reshape(-1, 4)

    def box_features(self, record: ImageRecord, boxes: np.ndarray) -> np.ndarray:
        """``(N, D)`` float16 features of any boxes ``(N,4)`` of a dataset image (shared mode only):
        the values :meth:`regions` gives for the same boxes."""
        from rcnn.features import pooled_features

        if not self.pools_boxes:
            raise ValueError("box_features needs shared mode (warp mode caches the proposals' features only)")
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(b) == 0:
            return np.zeros((0, self.dim), np.float16)
        return pooled_features(record, b, self.feature_config, self.dataset_root).astype(np.float16)

    def extract(self, image: np.ndarray, boxes: np.ndarray, layers: Sequence[str] | None = None):
        """``(N, D)`` float32 features of boxes of a new image (no cache); with ``layers``,
        ``{layer: (N, D)}`` of those taps from one forward pass."""
        from rcnn.features import extract_features

        fc = self.feature_config
        return extract_features(image, boxes, self.backbone, fc.layer if layers is None else list(layers),
                                **fc.extract_options())

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from rcnn.proposals import selective_search

        boxes = selective_search(image, self.proposal_config)
        if len(boxes) == 0:
            return boxes.reshape(0, 4), np.zeros((0, self.dim), np.float32)
        return boxes, self.extract(image, boxes)

    def cache_mb(self) -> float:
        from rcnn.cache import dir_size_mb
        from rcnn.features import feature_dirs

        return sum(dir_size_mb(d) for d in feature_dirs(self.proposal_config, self.feature_config, self.dataset_root or "."))


class MirrorAugmented(RegionFeatures):
    """Training-set augmentation (not in the paper; the released code trains on the images as
    they are): every training image is seen twice, as itself and mirrored. The mirrored view
    (``FeatureConfig(mirror=True)``) keeps the original image's boxes, so positives, negatives
    and IoUs are those of the original; only the features differ. ``augment(records)`` returns
    the records to train on (each followed by its mirrored view); the model it trains scores
    plain features (:meth:`options` are the plain source's)."""

    def __init__(self, source: CNNFeatures):
        self.plain = source
        self.mirror = CNNFeatures(source.proposal_config, replace(source.feature_config, mirror=True),
                                  source.dataset_root, backbone=source._backbone)
        self.name, self.layer, self.mode = source.name, source.layer, source.mode
        self.proposal_config, self.dataset_root = source.proposal_config, source.dataset_root
        self._views: dict[int, ImageRecord] = {}  # id(mirrored copy) -> the copy (kept alive)

    @property
    def weights_hash(self) -> str:  # type: ignore[override]
        return self.plain.weights_hash

    @property
    def feature_config(self):
        return self.plain.feature_config

    def options(self) -> dict:
        return self.plain.options()

    def augment(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        out = []
        for r in records:
            view = replace(r)
            self._views[id(view)] = view
            out += [r, view]
        return out

    def _src(self, record: ImageRecord) -> CNNFeatures:
        return self.mirror if id(record) in self._views else self.plain

    def regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        return self._src(record).regions(record)

    def gt_features(self, record: ImageRecord) -> np.ndarray:
        return self._src(record).gt_features(record)

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.plain.image_regions(image)

    def cache_mb(self) -> float:
        return self.plain.cache_mb() + self.mirror.cache_mb()


def fill_layers(
    record: ImageRecord, proposal_config, feature_config, layers: Sequence[str], dataset_root, compress: bool = True
) -> int:
    """Compute several layers in one forward pass and store each in the feature cache exactly
    where :func:`rcnn.features.get_features` (``with_gt``) looks for it, so pool5/fc6/fc7 rows
    cost one extraction (the released code likewise cached pool5 once and derived fc6/fc7).
    ``compress=False`` stores plain ``.npz`` (same arrays, readable by ``get_features``): zlib on
    a 1000-box pool5 block costs seconds per image on a loaded CPU. Returns the number of
    layers computed (0 when all were cached)."""
    from rcnn.features import _load, _save, extract_features, feature_path, split_layer
    from rcnn.proposals import get_proposals

    taps = dict.fromkeys(t for layer in layers for t in split_layer(layer))  # joined taps are cached tap by tap
    fcs = {t: replace(feature_config, layer=t, with_gt=True) for t in taps}
    sha = file_sha256(record.path)
    todo = [k for k, fc in fcs.items() if _load(feature_path(record, proposal_config, fc, dataset_root), sha) is None]
    if not todo:
        return 0
    boxes = get_proposals(record, proposal_config, dataset_root).astype(np.float32)
    n_gt = len(record.boxes)
    if n_gt:
        boxes = np.concatenate([np.asarray(record.boxes, np.float32).reshape(-1, 4), boxes])
    fc = fcs[todo[0]]
    out = extract_features(load_image(record.path), boxes, fc.backbone_obj(), todo, **fc.extract_options())
    for k in todo:
        path = feature_path(record, proposal_config, fcs[k], dataset_root)
        if compress:
            _save(path, boxes, out[k].astype(np.float16), sha, n_gt)
        else:
            save_npz(path, boxes=boxes, feats=out[k].astype(np.float16), image_sha256=np.array(sha), n_gt=np.array(n_gt, np.int32))
    return len(todo)


@dataclass(frozen=True)
class HOGOptions:
    """HOG baseline (stands in for the paper's DPM HOG row, Table 2): each region warped to
    ``size``² grayscale, then ``skimage.feature.hog`` (Dalal-Triggs 9 orientations, 8x8 cells,
    2x2 blocks, L2-Hys)."""

    size: int = 64
    orientations: int = 9
    pixels_per_cell: int = 8
    cells_per_block: int = 2


def hog_features(image: np.ndarray, boxes: np.ndarray, opts: HOGOptions = HOGOptions()) -> np.ndarray:
    """``(N, D)`` float32 HOG descriptors of the ``(N,4)`` boxes of an RGB uint8 image (tight warp)."""
    import cv2
    from skimage.feature import hog

    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    out = []
    s = opts.size
    for x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 4):
        # tight box warp (paper §2.1) with sub-pixel precision: an affine map of the box onto s x s
        bw, bh = max(float(x2 - x1), 1e-3), max(float(y2 - y1), 1e-3)
        M = np.array([[s / bw, 0, -x1 * s / bw], [0, s / bh, -y1 * s / bh]], np.float32)
        crop = cv2.warpAffine(gray, M, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out.append(hog(crop, orientations=opts.orientations, pixels_per_cell=(opts.pixels_per_cell,) * 2,
                       cells_per_block=(opts.cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True))
    del h, w
    if not out:
        n = opts.size // opts.pixels_per_cell - opts.cells_per_block + 1
        return np.zeros((0, n * n * opts.cells_per_block**2 * opts.orientations), np.float32)
    return np.asarray(out, np.float32)


class HOGFeatures(RegionFeatures):
    """HOG descriptors of the proposals (cached per image like the CNN features)."""

    name = HOG_BACKBONE
    layer = "hog"
    mode = "warp"
    weights_hash = "none"

    def __init__(self, proposal_config, dataset_root: str | Path | None = None, **options):
        self.proposal_config = proposal_config
        self.dataset_root = dataset_root
        self.opts = HOGOptions(**{k: v for k, v in options.items() if k in {f.name for f in fields(HOGOptions)}})
        self.key = settings_hash("hog", asdict(self.opts), proposal_config.key())

    def options(self) -> dict:
        return asdict(self.opts)

    def regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        from rcnn.proposals import get_proposals

        boxes = get_proposals(record, self.proposal_config, self.dataset_root)
        path = _gt_cache_path("hog_features", self.key, self.dataset_root, record)
        sha = settings_hash(file_sha256(record.path), len(boxes))
        z = load_npz(path)
        if z is not None and str(z.get("key", "")) == sha and len(z["feats"]) == len(boxes):
            return boxes, z["feats"]
        feats = hog_features(load_image(record.path), boxes, self.opts).astype(np.float16)
        save_npz(path, feats=feats, key=np.array(sha))
        return boxes, feats

    def gt_features(self, record: ImageRecord) -> np.ndarray:
        path = _gt_cache_path("hog_gt_features", self.key, self.dataset_root, record)
        return _cached_gt(path, record, lambda: hog_features(load_image(record.path), record.boxes, self.opts))

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from rcnn.proposals import selective_search

        boxes = selective_search(image, self.proposal_config)
        return boxes, hog_features(image, boxes, self.opts)

    def cache_mb(self) -> float:
        from rcnn.cache import dir_size_mb

        return dir_size_mb(cache_dir() / "hog_features" / self.key)


# ------------------------------------------------------------------------- training


def fit(
    dataset: Dataset, source: RegionFeatures, svm: SVMConfig = SVMConfig(), progress=None, records: Sequence[ImageRecord] | None = None
) -> tuple[RCNNModel, TrainResult]:
    """Train the per-class SVMs on ``dataset`` (or a subset ``records``) and wrap them as a model."""
    recs = list(dataset.records if records is None else records)
    res = train_detector(source.augment(recs) if isinstance(source, MirrorAugmented) else recs, dataset.classes, source,
                         svm, progress)
    model = RCNNModel(
        classes=list(dataset.classes), W=res.W, b=res.b, trained=res.trained, feature_scale=res.feature_scale,
        backbone=source.name, weights_hash=source.weights_hash, layer=source.layer, mode=source.mode,
        feature_options=source.options() if hasattr(source, "options") else {},
        proposal_options=asdict(source.proposal_config) if hasattr(source, "proposal_config") else {},
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
    model: RCNNModel, image: np.ndarray, source: RegionFeatures, boxes: np.ndarray, cand: TopK, rounds: int = 1,
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
    reg_src = reg.source_like(source)
    fc, rfc = getattr(source, "feature_config", None), getattr(reg_src, "feature_config", None)
    # the scoring and regression taps differ only by layer (e.g. softmax + pool5): one forward pass
    one_pass = fc is not None and rfc is not None and replace(rfc, layer=fc.layer) == fc
    h, w = image.shape[:2]
    for _ in range(int(rounds) if len(cur) else 0):
        if one_pass:
            out = source.extract(image, cur, list(dict.fromkeys([fc.layer, rfc.layer])))
            feats, reg_feats = out[fc.layer], out[rfc.layer]
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


def shares_features(regressor, source) -> bool:
    """Whether a box regressor reads exactly the features ``source`` gives the scorer (same network,
    layer and geometry), so the scored features can be regressed without a second extraction."""
    fc = getattr(source, "feature_config", None)
    if fc is None:
        return False
    try:
        rfc = regressor.feature_config()
    except (TypeError, ValueError):
        return False
    return replace(rfc, with_gt=fc.with_gt, flip=fc.flip, device=fc.device, batch_size=fc.batch_size) == fc


def detect_image(
    model: RCNNModel, image: np.ndarray, source: RegionFeatures | None = None, threshold: float | None = None,
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
        if shares_features(model.bbox_reg, source):  # the regressor reads the scored features: no second pass
            boxes = model.bbox_reg.refine(boxes, feats, image.shape[1], image.shape[0])
        else:
            boxes = model.bbox_reg.refine_image(image, boxes, source)
        if relocalize_rounds:
            boxes, cand = relocalize(model, image, source, boxes, cand, relocalize_rounds)
    return postprocess(boxes, cand, model.nms_iou, threshold, top_k, max_per_class, model.trained)


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
    model: RCNNModel, dataset: Dataset, source: RegionFeatures | None = None, threshold: float | None = None,
    top_k: int | None = None, max_per_class: int | None = MAX_PER_CLASS, records: Sequence[ImageRecord] | None = None,
    progress: Callable[[int, int], None] | None = None, stats: DetectStats | None = None, bbox_reg: bool = True,
    relocalize_rounds: int = 0,
) -> Detections:
    """Detections over a dataset split, reading proposals/features from the caches (computing
    and storing missing ones). Labels index ``model.classes``. ``relocalize_rounds``: see
    :func:`relocalize` (the new boxes' features are computed from the image, not cached)."""
    from rcnn.data import ImageReadError

    source = source or model.feature_source(dataset.root)
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
            if bbox_reg and model.bbox_reg is not None:  # after scoring, before NMS (released rcnn_test.m)
                if shares_features(model.bbox_reg, source):
                    boxes = model.bbox_reg.refine(boxes, feats, r.width, r.height)
                else:
                    boxes = model.bbox_reg.refine_record(r, boxes, source)
                if relocalize_rounds:
                    boxes, cand = relocalize(model, load_image(r.path), source, boxes, cand, relocalize_rounds)
            b, s, lab = postprocess(boxes, cand, model.nms_iou, threshold, top_k, max_per_class, model.trained)
            parts.append(Detections(np.array([r.image_id] * len(s), dtype=object), b, s, lab))
        stats.images += 1
        stats.seconds += time.perf_counter() - t0
        if progress:
            progress(i + 1, len(recs))
    return Detections.concat(parts)


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
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{c.name}: AP {c.ap:.3f} ({result.metric}, {c.npos} objects)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in c.name)
        p = out_dir / f"pr_{safe}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


__all__ = [
    "FORMAT_VERSION",
    "CNNFeatures",
    "DetectStats",
    "HOGFeatures",
    "HOGOptions",
    "MirrorAugmented",
    "ModelError",
    "RCNNModel",
    "RegionFeatures",
    "check_backbone",
    "detect_dataset",
    "detect_image",
    "evaluate_model",
    "fit",
    "hog_features",
    "postprocess",
    "relocalize",
    "save_pr_curves",
    "shares_features",
]
