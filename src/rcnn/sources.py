"""Region-feature sources: one protocol for where training, box regression and detection read
region features from, its implementations, and the feature scale they share.

* :class:`FeatureSource` — the protocol: a dataset image's proposals and their features
  (``regions``), its ground-truth boxes' features (``gt_features``), a new image's regions
  (``image_regions``), features of any boxes (``extract``) and the same source at other feature
  settings (``with_layer`` / ``with_options``: box regression reads the scoring source's
  proposals at its own layer).
* :class:`CNNFeatures` (the feature cache of :mod:`rcnn.features`), :class:`MirrorAugmented`
  (training images seen twice, as themselves and mirrored), :class:`HOGFeatures` (the HOG
  baseline), :class:`CachedRegions` (one record's cached regions served as a new image's).
* Feature scaling (released ``rcnn_scale_features``): features are multiplied so their mean L2
  norm is :data:`TARGET_NORM`; joined taps (``blocks``) get one scalar per block
  (:func:`block_scale`). The SVMs and the box regressors use the same rule.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from rcnn.backbones import get_backbone
from rcnn.cache import cache_dir, dir_size_mb, file_sha256, load_npz, safe_filename, save_npz, settings_hash
from rcnn.data import ImageRecord, load_image
from rcnn.features import (
    FeatureConfig,
    extract_features,
    feature_dirs,
    feature_path,
    get_features,
    image_trunk_maps,
    layer_dim,
    pool_features,
    pooled_features,
    split_layer,
    tap_configs,
)
from rcnn.proposals import ProposalConfig, get_proposals, selective_search

#: The backbone name of HOG features (a model trained on them records it).
HOG_BACKBONE = "hog"
#: Target mean L2 norm of scaled features (released ``rcnn_train.m``: ``target_norm = 20``).
TARGET_NORM = 20.0

#: A feature scale: one scalar (the released code) or a ``(D,)`` float32 vector, constant per block.
Scale = float | np.ndarray


class FeatureSource(Protocol):
    """Where training, box regression and detection get region features from.

    ``name`` (backbone), ``layer``, ``mode`` and ``weights_hash`` describe the features and are
    recorded in a model; ``blocks`` is each joined tap's dimension (``pool5+fire5``: scaled
    separately; ``None``: one block); ``proposal_config`` the proposals' settings (``None``:
    not selective search). Subclass it to inherit the defaults below; :mod:`rcnn.svm` only needs
    ``regions``, ``gt_features`` and ``blocks``."""

    name: str = ""
    layer: str = ""
    mode: str = ""
    weights_hash: str = ""
    blocks: tuple[int, ...] | None = None
    proposal_config: ProposalConfig | None = None

    def regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        """Proposal boxes ``(N,4)`` float32 xyxy of a dataset image and their features ``(N,D)`` (any float dtype)."""
        ...

    def gt_features(self, record: ImageRecord) -> np.ndarray:
        """Features ``(G,D)`` of ``record.boxes``, computed like the proposals' features."""
        ...

    def labelled_regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        """The ground-truth boxes then the proposals, ``(G+N,4)``, and their features ``(G+N,D)``."""
        boxes, feats = self.regions(record)
        gtf = self.gt_features(record)
        allb = np.concatenate([np.asarray(record.boxes, np.float32).reshape(-1, 4), boxes])
        return allb, (np.concatenate([gtf, feats]) if len(gtf) else feats)

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Proposals ``(N,4)`` of a new RGB uint8 image and their features ``(N,D)`` float32 (nothing cached)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe new images")

    def extract(self, image: np.ndarray, boxes: np.ndarray, layers: Sequence[str] | None = None):
        """``(N,D)`` float32 features of any ``(N,4)`` boxes of a new RGB uint8 image (nothing cached);
        with ``layers``, ``{layer: (N,D)}`` of those layers of this source's network from one pass."""
        raise NotImplementedError(f"{type(self).__name__} does not describe arbitrary boxes")

    def with_layer(self, layer: str) -> FeatureSource:
        """This source (same proposals, dataset and network) at another layer."""
        raise NotImplementedError(f"{type(self).__name__} has no other layers")

    def with_options(self, options: dict) -> FeatureSource:
        """This source's proposals and dataset with the feature settings ``options`` (as :meth:`options`
        returns them; settings missing from ``options`` take their defaults)."""
        raise NotImplementedError(f"{type(self).__name__} has no other feature settings")

    def options(self) -> dict:
        """The feature settings a model records (and :meth:`with_options` reads back)."""
        return {}

    def cache_mb(self) -> float:
        """MB on disk of this source's cached features."""
        return 0.0

    def cache_files(self, record: ImageRecord) -> list[Path]:
        """The files ``record``'s features are (or will be) cached in."""
        return []


# ----------------------------------------------------------------------------- feature scaling


def source_blocks(source: FeatureSource) -> tuple[int, ...] | None:
    """The dimensions of the blocks a source's features are made of (``None``: one block)."""
    blocks = source.blocks
    return tuple(int(d) for d in blocks) if blocks and len(blocks) > 1 else None


def block_scale(mean_norms: float | Sequence[float], blocks: Sequence[int] | None, target_norm: float = TARGET_NORM) -> Scale:
    """Scale bringing the mean L2 norm to ``target_norm``: one scalar, or with ``blocks`` a
    ``(D,)`` vector bringing block ``i`` (mean norm ``mean_norms[i]``) to ``target_norm/√B``."""
    if not blocks:
        return float(target_norm / float(np.asarray(mean_norms).reshape(-1)[0]))
    per = target_norm / math.sqrt(len(blocks))
    return np.concatenate([np.full(d, per / m, np.float32) for d, m in zip(blocks, mean_norms, strict=True)])


def block_norms(feats: np.ndarray, blocks: Sequence[int] | None) -> np.ndarray:
    """``(N, B)`` L2 norm of each block of features ``(N, D)`` (``blocks=None``: one block)."""
    f = np.asarray(feats, np.float32)
    cuts = np.cumsum(blocks)[:-1] if blocks else []
    return np.stack([np.linalg.norm(x, axis=1) for x in np.split(f, cuts, axis=1)], 1)


def scale_to_json(scale: Scale) -> float | list[list[float]]:
    """A scale for JSON metadata: the scalar, or ``[[dim, scale], ...]`` runs of a block vector."""
    if np.ndim(scale) == 0:
        return float(scale)
    v = np.asarray(scale, np.float32)
    cuts = np.flatnonzero(np.diff(v)) + 1
    return [[len(r), float(r[0])] for r in np.split(v, cuts)]


def scale_from_json(value) -> Scale:
    """Inverse of :func:`scale_to_json`."""
    if isinstance(value, list):
        return np.concatenate([np.full(int(d), float(x), np.float32) for d, x in value])
    return float(value)


# ----------------------------------------------------------------------------- CNN features


def _hog_cache_path(kind: str, key: str, root: str | Path | None, record: ImageRecord) -> Path:
    droot = str(Path(root).resolve()) if root is not None else str(Path(record.path).parent.resolve())
    return cache_dir() / kind / key / settings_hash("dataset", droot) / f"{safe_filename(record.image_id)}.npz"


def _cached_gt(path: Path, record: ImageRecord, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Ground-truth features cached per image, keyed by the image's bytes and its boxes."""
    sha = settings_hash(file_sha256(record.path), np.asarray(record.boxes, np.float32).round(2).tolist())
    z = load_npz(path)
    if z is not None and str(z.get("key", "")) == sha and z["feats"].shape[0] == len(record.boxes):
        return z["feats"]
    feats = compute()
    save_npz(path, feats=np.asarray(feats, np.float16), key=np.array(sha))
    return np.asarray(feats, np.float16)


def options_config(options: dict) -> FeatureConfig:
    """The :class:`rcnn.features.FeatureConfig` of recorded feature options (a model's or a box
    regressor's JSON: lists back to tuples, unknown keys ignored, missing ones at their defaults)."""
    names = {f.name for f in fields(FeatureConfig)}
    return FeatureConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k in names})


class CNNFeatures(FeatureSource):
    """CNN features of proposals through the feature cache (:func:`rcnn.features.get_features`).

    The cache stores each image's ground-truth boxes first (``with_gt``): their features are
    computed exactly like the proposals' (paper §2.3 positives), in the same pass."""

    def __init__(self, proposal_config, feature_config, dataset_root: str | Path | None = None, backbone=None):
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
        return cls(proposal_config, options_config(options), dataset_root, backbone)

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
        return layer_dim(self.backbone, self.layer, self.feature_config.grid)

    @property
    def blocks(self) -> tuple[int, ...] | None:  # type: ignore[override]
        """Each tap's dimension when the layer joins several (``pool5+fire5``): scaled separately."""
        taps = split_layer(self.layer)
        return tuple(self.backbone.dim(t, self.feature_config.grid) for t in taps) if len(taps) > 1 else None

    def with_layer(self, layer: str) -> CNNFeatures:
        return CNNFeatures(self.proposal_config, replace(self.feature_config, layer=layer), self.dataset_root,
                           backbone=self._backbone)

    def with_options(self, options: dict) -> CNNFeatures:
        """Test-time flip averaging (``flip``) carries over: flipped scoring features get flipped
        features at the other settings too. The network is shared when it is the same one."""
        fc = options_config(options)
        if self.feature_config.flip:
            fc = replace(fc, flip=True)
        same = (self.feature_config.backbone, self.feature_config.weights) == (fc.backbone, fc.weights)
        return CNNFeatures(self.proposal_config, fc, self.dataset_root, backbone=self.backbone if same else None)

    def _stored(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray, int]:
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

    def labelled_regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth and proposals as the cache stores them: one read."""
        boxes, feats, _ = self._stored(record)
        return boxes, feats

    @property
    def pools_boxes(self) -> bool:
        """Shared mode: any box of a dataset image is pooled from its cached trunk maps
        (:meth:`box_features`), so a pass that needs a few boxes need not pool them all."""
        return self.feature_config.mode == "shared"

    def region_boxes(self, record: ImageRecord) -> np.ndarray:
        """The image's proposals ``(N,4)``, in the order :meth:`regions` returns them (no features)."""
        return get_proposals(record, self.proposal_config, self.dataset_root).astype(np.float32).reshape(-1, 4)

    def box_features(self, record: ImageRecord, boxes: np.ndarray) -> np.ndarray:
        """``(N, D)`` float16 features of any boxes ``(N,4)`` of a dataset image (shared mode only):
        the values :meth:`regions` gives for the same boxes."""
        if not self.pools_boxes:
            raise ValueError("box_features needs shared mode (warp mode caches the proposals' features only)")
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(b) == 0:
            return np.zeros((0, self.dim), np.float16)
        return pooled_features(record, b, self.feature_config, self.dataset_root).astype(np.float16)

    def extract(self, image: np.ndarray, boxes: np.ndarray, layers: Sequence[str] | None = None):
        """``(N, D)`` float32 features of boxes of a new image (no cache); with ``layers``,
        ``{layer: (N, D)}`` of those taps from one forward pass. The image :meth:`image_regions` saw
        last is pooled from the trunk maps it computed (iterative localisation re-scores boxes of
        that image: the trunk does not run twice)."""
        fc = self.feature_config
        seen = getattr(self, "_image_maps", None)
        if (seen is not None and seen[0] is image and seen[2] == _fingerprint(image)
                and self._maps_hold(seen[1], [fc.layer] if layers is None else layers)):
            if layers is None:
                return pool_features(seen[1], boxes, fc, self.backbone)
            return {t: pool_features(seen[1], boxes, replace(fc, layer=t), self.backbone) for t in layers}
        return extract_features(image, boxes, self.backbone, fc.layer if layers is None else list(layers),
                                **fc.extract_options())

    def _maps_hold(self, maps, layers: Sequence[str]) -> bool:
        """Whether trunk ``maps`` have every side tap the ``layers`` pool from."""
        names = set().union(*(m.keys() for m in maps.maps))
        return all(t in names for layer in layers for t in split_layer(layer) if t in self.backbone.side_taps)

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fc = self.feature_config
        if fc.mode == "shared" and not fc.mirror:
            # the trunk does not depend on the boxes: run selective search (OpenCV, GIL released)
            # beside it instead of before it
            with ThreadPoolExecutor(1) as pool:
                found = pool.submit(selective_search, image, self.proposal_config)
                maps = image_trunk_maps(image, fc, self.backbone)
                boxes = found.result()
            self._image_maps = (image, maps, _fingerprint(image))  # for :meth:`extract` of more boxes of it
            feats = pool_features(maps, boxes, fc, self.backbone) if len(boxes) else np.zeros((0, self.dim), np.float32)
            return boxes.reshape(-1, 4), feats
        boxes = selective_search(image, self.proposal_config)
        if len(boxes) == 0:
            return boxes.reshape(0, 4), np.zeros((0, self.dim), np.float32)
        return boxes, self.extract(image, boxes)

    def cache_mb(self) -> float:
        return sum(dir_size_mb(d) for d in feature_dirs(self.proposal_config, self.feature_config, self.dataset_root or "."))

    def cache_files(self, record: ImageRecord) -> list[Path]:
        root = self.dataset_root if self.dataset_root is not None else Path(record.path).parent
        return [feature_path(record, self.proposal_config, c, root) for c in tap_configs(self.feature_config)]


def _fingerprint(image: np.ndarray) -> tuple:
    """Shape and a checksum of every 8th pixel: an image array changed in place is not mistaken for
    the one whose trunk maps are kept."""
    return image.shape, zlib.crc32(np.ascontiguousarray(image[::8, ::8]).tobytes())


class MirrorAugmented(FeatureSource):
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
    def blocks(self) -> tuple[int, ...] | None:  # type: ignore[override]
        return self.plain.blocks

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

    def labelled_regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        return self._src(record).labelled_regions(record)

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.plain.image_regions(image)

    def extract(self, image: np.ndarray, boxes: np.ndarray, layers: Sequence[str] | None = None):
        return self.plain.extract(image, boxes, layers)

    def with_layer(self, layer: str) -> MirrorAugmented:
        return MirrorAugmented(self.plain.with_layer(layer))

    def with_options(self, options: dict) -> CNNFeatures:
        return self.plain.with_options(options)

    def cache_mb(self) -> float:
        return self.plain.cache_mb() + self.mirror.cache_mb()

    def cache_files(self, record: ImageRecord) -> list[Path]:
        return self.plain.cache_files(record) + self.mirror.cache_files(record)


# ----------------------------------------------------------------------------- HOG baseline


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


class HOGFeatures(FeatureSource):
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
        boxes = get_proposals(record, self.proposal_config, self.dataset_root)
        path = _hog_cache_path("hog_features", self.key, self.dataset_root, record)
        sha = settings_hash(file_sha256(record.path), len(boxes))
        z = load_npz(path)
        if z is not None and str(z.get("key", "")) == sha and len(z["feats"]) == len(boxes):
            return boxes, z["feats"]
        feats = hog_features(load_image(record.path), boxes, self.opts).astype(np.float16)
        save_npz(path, feats=feats, key=np.array(sha))
        return boxes, feats

    def gt_features(self, record: ImageRecord) -> np.ndarray:
        path = _hog_cache_path("hog_gt_features", self.key, self.dataset_root, record)
        return _cached_gt(path, record, lambda: hog_features(load_image(record.path), record.boxes, self.opts))

    def extract(self, image: np.ndarray, boxes: np.ndarray, layers: Sequence[str] | None = None):
        if layers is not None and set(layers) != {self.layer}:
            raise ValueError(f"HOG features have one layer, 'hog', not {list(layers)}")
        f = hog_features(image, boxes, self.opts)
        return f if layers is None else {self.layer: f}

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes = selective_search(image, self.proposal_config)
        return boxes, hog_features(image, boxes, self.opts)

    def with_layer(self, layer: str) -> HOGFeatures:
        if layer != self.layer:
            raise ValueError(f"HOG features have one layer, 'hog', not {layer!r}")
        return self

    def with_options(self, options: dict) -> HOGFeatures:
        return HOGFeatures(self.proposal_config, self.dataset_root, **options)

    def cache_mb(self) -> float:
        return dir_size_mb(cache_dir() / "hog_features" / self.key)

    def cache_files(self, record: ImageRecord) -> list[Path]:
        return [_hog_cache_path(kind, self.key, self.dataset_root, record) for kind in ("hog_features", "hog_gt_features")]


# ----------------------------------------------------------------------------- cached regions


class CachedRegions(FeatureSource):
    """``source`` whose ``image_regions`` serves one dataset record's cached regions (e.g. filled
    by the Ray engine), so :func:`rcnn.detect.detect_image` scores them like freshly computed ones;
    every other call goes to ``source``."""

    def __init__(self, source: FeatureSource, record: ImageRecord):
        self.source, self.record = source, record
        self.name, self.layer, self.mode = source.name, source.layer, source.mode
        self.proposal_config = source.proposal_config

    @property
    def weights_hash(self) -> str:  # type: ignore[override]
        return self.source.weights_hash

    @property
    def blocks(self) -> tuple[int, ...] | None:  # type: ignore[override]
        return self.source.blocks

    def image_regions(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.regions(self.record)

    def regions(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        return self.source.regions(record)

    def gt_features(self, record: ImageRecord) -> np.ndarray:
        return self.source.gt_features(record)

    def extract(self, image: np.ndarray, boxes: np.ndarray, layers: Sequence[str] | None = None):
        return self.source.extract(image, boxes, layers)

    def with_layer(self, layer: str) -> CachedRegions:
        return CachedRegions(self.source.with_layer(layer), self.record)

    def with_options(self, options: dict) -> CachedRegions:
        return CachedRegions(self.source.with_options(options), self.record)

    def options(self) -> dict:
        return self.source.options()


__all__ = [
    "HOG_BACKBONE", "TARGET_NORM", "CNNFeatures", "CachedRegions", "FeatureSource", "HOGFeatures", "HOGOptions",
    "MirrorAugmented", "Scale", "block_norms", "block_scale", "hog_features", "options_config", "scale_from_json", "scale_to_json",
    "source_blocks",
]
