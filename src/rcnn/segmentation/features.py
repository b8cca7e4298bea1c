"""CNN features of free-form regions: the paper's ``full``, ``fg`` and ``full+fg`` (§4).

* ``full`` — the region's bounding box warped exactly as for detection
  (:func:`rcnn.features.warp_regions`), features from the backbone's taps.
* ``fg`` — the same warp with every pixel outside the region mask replaced by the network's
  mean pixel, i.e. zero after mean subtraction (paper §4). The mask is warped with the same
  geometry (:func:`rcnn.features.crop_geometry`, the function ``warp_regions`` uses), so
  image and mask line up pixel for pixel.
* ``full+fg`` — the concatenation (each half scaled by the model, see ``rcnn.segmentation.model``).

``mode="warp"`` (default, paper §4) runs the whole network on both crops of every region.
``mode="shared"`` is the fast variant of :mod:`rcnn.features`: the trunk runs once per image;
``full`` is the detection feature (RoIAlign, sampling ratio 2, onto the head's grid) and
``fg`` applies the mask to the *feature map* at the RoIAlign sample points before they are
averaged (convolutional feature masking, Dai et al. 2015), since the pixels themselves are
not re-run through the trunk. Both modes cache every tap of both strategies per image in
one pass, so any (strategy, tap) row of the paper's Table 3 reads the same cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from rcnn.backbones import Backbone, get_backbone, set_threads
from rcnn.cache import atomic_write, cache_dir, file_sha256, settings_hash
from rcnn.device import PRECISIONS, autocast, place_backbone
from rcnn.features import SHARED_MAX_SIDE, SHARED_SCALES, crop_geometry, scaled_image, warp_regions

STRATEGIES = ("full", "fg", "full+fg")
FEATURE_VERSION = 1


@dataclass(frozen=True)
class RegionFeatureConfig:
    """What determines the stored region features (``key()`` names their cache)."""

    backbone: str = "squeezenet1_1"  # the detector's default backbone (rcnn.features.FeatureConfig)
    weights: str | None = None
    taps: tuple[str, ...] = ("pool5", "fc6", "fc7")  # paper Table 3 compares fc6 / fc7
    mode: str = "warp"  # paper §4: each region's box warped to the network input
    context_pad: int = 0  # paper §4: "warping the rectangular window around the region"
    batch_size: int = 32
    # "fp32" is faithful; "bf16" = CPU bfloat16 autocast (rcnn.device.autocast: ~2x faster
    # with AVX512-BF16, features within ~0.5 %), a separate cache
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.mode not in ("warp", "shared"):
            raise ValueError(f"mode must be 'warp' or 'shared', not {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")

    def key(self) -> str:
        d = asdict(self)
        d.pop("batch_size")
        if self.precision == "fp32":  # keeps the keys of caches written before the option existed
            d.pop("precision")
        d["weights"] = file_sha256(self.weights) if self.weights else None
        return settings_hash("region-features", FEATURE_VERSION, d)


_BACKBONES: dict[tuple[str, str | None], Backbone] = {}


def backbone_for(config: RegionFeatureConfig) -> Backbone:
    """The (memoised) backbone of a config."""
    k = (config.backbone, config.weights)
    if k not in _BACKBONES:
        _BACKBONES[k] = get_backbone(config.backbone, config.weights)
    return _BACKBONES[k]


def warp_masks(masks: np.ndarray, boxes: np.ndarray, size: int, context_pad: int = 0) -> np.ndarray:
    """Warp each region mask with its box exactly as :func:`rcnn.features.warp_regions` warps
    the image: ``masks`` (N,H,W) bool, ``boxes`` (N,4) xyxy → (N,size,size) bool.

    Rule for a mask that vanishes in the warp (a sliver thinner than half a warped pixel):
    every warped pixel the mask touches at all is kept, so a non-empty region never
    becomes an empty ``fg`` crop; a region with no pixels in its window stays empty.
    """
    n, h, w = masks.shape
    out = np.zeros((n, size, size), bool)
    for i in range(n):
        (a, b, c, d), (px, py, cw, ch) = crop_geometry(boxes[i], size, context_pad, "warp", w, h)
        if cw <= 0 or ch <= 0:
            continue
        win = masks[i, b:d, a:c].astype(np.float32)
        warped = cv2.resize(win, (cw, ch), interpolation=cv2.INTER_LINEAR)
        m = warped >= 0.5
        if not m.any() and win.any():
            m = warped > 0
            if not m.any():
                m = cv2.resize(win, (cw, ch), interpolation=cv2.INTER_NEAREST) > 0
        out[i, py:py + ch, px:px + cw] = m
    return out


def fg_crops(crops: np.ndarray, warped_masks: np.ndarray, mean_rgb: Sequence[int]) -> np.ndarray:
    """``crops`` (N,S,S,3) uint8 with pixels outside ``warped_masks`` (N,S,S) set to the mean
    (zero after the backbone's mean subtraction; paper §4)."""
    return np.where(warped_masks[..., None], crops, np.asarray(mean_rgb, np.uint8)).astype(np.uint8)


def _warp_features(image, masks, boxes, bb, taps, config) -> dict[str, dict[str, np.ndarray]]:
    full: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    fg: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    g = bb.pool5_grid
    for s in range(0, len(boxes), config.batch_size):
        bx = boxes[s:s + config.batch_size]
        crops = warp_regions(image, bx, bb.input_size, config.context_pad, "warp",
                             fill=bb.mean_rgb(), interpolation=bb.interpolation)
        wm = warp_masks(masks[s:s + config.batch_size], bx, bb.input_size, config.context_pad)
        both = np.concatenate([crops, fg_crops(crops, wm, bb.mean_rgb())])
        out = bb.head(bb.to_grid(bb.trunk(bb.preprocess(both))), list(taps), g)
        k = len(bx)
        for t in taps:
            v = out[t].float().numpy()
            full[t].append(v[:k])
            fg[t].append(v[k:])
    return {"full": {t: np.concatenate(full[t]) for t in taps}, "fg": {t: np.concatenate(fg[t]) for t in taps}}


def _shared_features(image, masks, boxes, bb, taps, config) -> dict[str, dict[str, np.ndarray]]:
    g = bb.pool5_grid
    h, w = image.shape[:2]
    img, sx, sy = scaled_image(image, SHARED_SCALES[0], SHARED_MAX_SIDE, bb.interpolation)
    fmap = bb.trunk(bb.preprocess(img[None]))
    full: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    fg: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    n2 = 2 * g
    frac = (np.arange(n2) + 0.5) / n2
    for s in range(0, len(boxes), config.batch_size):
        bx = boxes[s:s + config.batch_size].astype(np.float32)
        rois = torch.from_numpy(bx * np.array([sx, sy, sx, sy], np.float32))
        rois = torch.cat([torch.zeros(len(bx), 1), rois], 1)
        # RoIAlign with sampling ratio 2 on a g x g grid = 2x2 average of single samples on
        # a 2g x 2g grid; masking those samples before averaging gives the fg features.
        a = roi_align(fmap, rois, n2, 1.0 / bb.stride, sampling_ratio=1, aligned=True)
        xs = bx[:, 0:1] + frac[None] * (bx[:, 2:3] - bx[:, 0:1])  # (B, 2g) sample x, image pixels
        ys = bx[:, 1:2] + frac[None] * (bx[:, 3:4] - bx[:, 1:2])
        xi = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
        yi = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
        mk = masks[s:s + len(bx)]
        m = mk[np.arange(len(bx))[:, None, None], yi[:, :, None], xi[:, None, :]]  # (B,2g,2g)
        mt = torch.from_numpy(m.astype(np.float32))[:, None]
        pooled_full = F.avg_pool2d(a, 2)
        pooled_fg = F.avg_pool2d(a * mt, 2)
        out_full = bb.head(pooled_full, list(taps), g)
        out_fg = bb.head(pooled_fg, list(taps), g)
        for t in taps:
            full[t].append(out_full[t].float().numpy())
            fg[t].append(out_fg[t].float().numpy())
    return {"full": {t: np.concatenate(full[t]) for t in taps}, "fg": {t: np.concatenate(fg[t]) for t in taps}}


@torch.inference_mode()
def region_features(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray | None = None,
    config: RegionFeatureConfig = RegionFeatureConfig(),
    backbone: Backbone | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{"full": {tap: (N,D)}, "fg": {tap: (N,D)}}`` float32 features of N region masks.

    ``image`` (H,W,3) RGB uint8; ``masks`` (N,H,W) bool; ``boxes`` (N,4) xyxy (the masks'
    bounding boxes when None). An empty mask raises ``ValueError``.
    """
    bb = backbone or backbone_for(config)
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (N,H,W) matching the {image.shape[1]}x{image.shape[0]} image, got {masks.shape}")
    if boxes is None:
        boxes = mask_boxes(masks)
    taps = tuple(config.taps)
    if len(masks) == 0:
        z = {t: np.zeros((0, bb.dim(t)), np.float32) for t in taps}
        return {"full": dict(z), "fg": dict(z)}
    set_threads(None)
    fn = _warp_features if config.mode == "warp" else _shared_features
    dev = place_backbone(bb, None)  # where the network is; bf16 autocast applies on the CPU
    with autocast(dev, config.precision):
        return fn(image, masks, np.asarray(boxes, np.float32).reshape(-1, 4), bb, taps, config)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N,4) float32 pixel-edge xyxy box of each (N,H,W) bool mask; empty masks raise."""
    masks = np.asarray(masks, bool)
    rows, cols = masks.any(2), masks.any(1)
    empty = ~rows.any(1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} empty region mask(s): a region needs at least one pixel")
    y1 = rows.argmax(1)
    y2 = masks.shape[1] - rows[:, ::-1].argmax(1)
    x1 = cols.argmax(1)
    x2 = masks.shape[2] - cols[:, ::-1].argmax(1)
    return np.stack([x1, y1, x2, y2], 1).astype(np.float32)


def combine(feats: dict[str, dict[str, np.ndarray]], strategy: str, tap: str) -> np.ndarray:
    """The (N,D) feature matrix of one strategy (``full+fg`` concatenates)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if strategy == "full+fg":
        return np.concatenate([feats["full"][tap], feats["fg"][tap]], 1)
    return feats[strategy][tap]


# ----------------------------------------------------------------------------- cache


def _pack(feats: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{s}__{t}": v.astype(np.float16) for s, d in feats.items() for t, v in d.items()}


def _unpack(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {"full": {}, "fg": {}}
    for k, v in arrays.items():
        if "__" in k:
            s, t = k.split("__", 1)
            out[s][t] = v
    return out


def cached_features(
    key_parts: Sequence[object],
    compute,
    config: RegionFeatureConfig,
) -> dict[str, dict[str, np.ndarray]]:
    """Features stored under ``cache_dir()/segmentation_features/<config.key()>/<hash of key_parts>``
    (float16, zlib-compressed, atomic); ``compute()`` fills a missing entry."""
    path = cache_dir() / "segmentation_features" / config.key() / f"{settings_hash(*key_parts, length=24)}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        feats = _unpack(arrays)
        if all(t in feats["full"] and t in feats["fg"] for t in config.taps):
            return feats
    except (OSError, ValueError, EOFError, KeyError):
        pass
    feats = compute()
    packed = _pack(feats)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **packed)  # ReLU features are mostly zeros

    atomic_write(path, write)
    return _unpack(packed)
