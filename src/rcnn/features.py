"""Region features from a pretrained CNN (paper §2.1–2.2), faithful or fast, with a lean cache.

* :func:`warp_regions` — crop + warp each box to the network input (paper §2.1: all pixels of
  the tight box, any size or aspect ratio, warped to ``size``²), plus the released code's
  ``rcnn_im_crop`` variants: context padding ``p`` pixels in the warped frame and the
  tightest square with / without context; pixels outside the image get the input mean.
* :func:`extract_features` — ``mode="warp"`` runs the whole network on each warped crop
  (faithful); ``mode="shared"`` runs the convolutional trunk once over the whole image and
  RoI-pools each box onto the grid the head reads (SPP-net / Fast R-CNN), then the rest of
  the network on the pooled maps. Both return ``(N, D)`` for the same layer. A layer named
  ``"pool5+fire5"`` is the concatenation of those taps from one forward pass (a hypercolumn:
  the backbone's finer side tap pooled to the same grid; see :mod:`rcnn.backbones`).
* :class:`FeatureConfig`, :func:`get_features`, :func:`features_for_dataset` — per-image
  float16 features stored with the boxes they describe, content-keyed and atomic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align, roi_pool

from rcnn.backbones import Backbone, get_backbone, set_threads
from rcnn.boxes import flip_boxes
from rcnn.cache import (
    atomic_write,
    cache_dir,
    dir_size_mb,
    file_sha256,
    load_npz,
    safe_filename,
    save_npz,
    settings_hash,
)
from rcnn.data import ImageReadError, ImageRecord, load_image
from rcnn.device import PRECISIONS, autocast, host_to, place_backbone, to_host
from rcnn.progress import ProgressFn, report

METHODS = ("warp", "square", "square_nocontext")
MODES = ("warp", "shared")
#: shared mode: the trunk runs on the image upscaled ×1.5, so small objects (BCCD's ~30 px
#: platelets) span more stride-16 cells; ×2.0 measured no better on BCCD (bench/results/ablation.json:
#: 6×6 pool5, bf16: 0.742 mAP at ×1.5, 0.725 at ×2.0).
SHARED_SCALES = (1.5,)
#: shared mode RoI grid: the pooled grid keeps where the object sits in the box (bench/results/
#: ablation.json, BCCD pool5: 6×6 (bf16) 0.742 mAP, 3×3 0.724; the globally pooled fc6 tap 0.282).
SHARED_GRID = 6
#: shared mode: longest side of the resized image (keeps trunk activations bounded on huge photos)
SHARED_MAX_SIDE = 2000
FEATURE_VERSION = 2  # bump when stored features would change for the same settings
TRUNK_VERSION = 1  # bump when stored trunk maps would change for the same settings
#: zstd level of the trunk-map cache: level 1 packs ReLU maps (~80-85 % zeros) about 6x at
#: hundreds of MB/s, where zlib cost seconds per image
TRUNK_ZSTD_LEVEL = 1
#: taps read after the spatial pooling: the RoI grid does not change them in warp mode
GRID_FREE_TAPS = frozenset({"fc6", "fc7", "logits", "ft_logprob"})


def split_layer(layer: str) -> list[str]:
    """The taps of a layer name: ``"pool5+fire5"`` → ``["pool5", "fire5"]`` (concatenated in that order)."""
    parts = [p.strip() for p in str(layer).split("+")]
    if not all(parts) or len(set(parts)) != len(parts):
        raise ValueError(f"bad layer {layer!r}: name taps joined by '+', each once (e.g. pool5+fire5)")
    return parts


# ----------------------------------------------------------------------------- warping


def _round(x: float) -> int:
    # MATLAB round (half away from zero), as rcnn_im_crop uses
    return int(np.floor(abs(x) + 0.5) * np.sign(x))


def _context_scale(size: int, context_pad: int) -> float:
    """How much a box grows so that ``context_pad`` of the ``size`` output pixels are context on each side."""
    if not 0 <= 2 * context_pad < size:
        raise ValueError(f"context_pad must be in [0, {(size - 1) // 2}], not {context_pad}")
    return size / (size - 2 * context_pad)


def crop_geometry(box: Sequence[float], size: int, context_pad: int, method: str, width: int, height: int):
    """Where a box's pixels go in the ``size``² crop (``rcnn_im_crop`` in 0-based pixel edges).

    Returns ``(src, dst)``: ``src = (x1, y1, x2, y2)`` integer pixel-edge window inside the
    image, ``dst = (x, y, w, h)`` the rectangle of the output it is resized into; the rest of
    the output is the mean. With ``context_pad = 0`` and ``method = "warp"`` the window is the
    box itself and ``dst`` the whole output (paper §2.1).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if context_pad == 0 and method == "warp":
        a, b = max(0, _round(x1)), max(0, _round(y1))
        c, d = min(width, max(a + 1, _round(x2))), min(height, max(b + 1, _round(y2)))
        return (min(a, width - 1), min(b, height - 1), c, d), (0, 0, size, size)
    scale = _context_scale(size, context_pad)
    hw, hh = max(x2 - x1, 1.0) / 2, max(y2 - y1, 1.0) / 2
    cx, cy = x1 + hw, y1 + hh
    if method != "warp":  # tightest enclosing square
        hw = hh = max(hw, hh)
    # expanded (unclipped) window, integer pixel edges
    ux1, uy1 = _round(cx - hw * scale), _round(cy - hh * scale)
    ux2, uy2 = _round(cx + hw * scale), _round(cy + hh * scale)
    uw, uh = max(ux2 - ux1, 1), max(uy2 - uy1, 1)
    sx, sy = size / uw, size / uh
    a, b = max(0, ux1), max(0, uy1)
    c, d = min(width, ux2), min(height, uy2)
    if c <= a or d <= b:  # window entirely outside the image: nothing to copy
        return (0, 0, 1, 1), (0, 0, 0, 0)
    px, py = _round((a - ux1) * sx), _round((b - uy1) * sy)
    cw, ch = _round((c - a) * sx), _round((d - b) * sy)
    cw, ch = max(1, min(cw, size - px)), max(1, min(ch, size - py))
    return (a, b, c, d), (px, py, cw, ch)


def dilate_boxes(boxes: np.ndarray, size: int, context_pad: int) -> np.ndarray:
    """``(N,4)`` xyxy boxes grown about their centres so that, warped to ``size``², ``context_pad``
    pixels of context surround the original box — the window :func:`crop_geometry` crops, before
    clipping; shared mode pools it (RoIAlign samples outside the image read zero, the mean after
    mean subtraction, as the warp fills them with the mean)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    scale = _context_scale(size, context_pad)
    half = np.maximum(b[:, 2:] - b[:, :2], 1.0) / 2
    centre = b[:, :2] + half
    return np.concatenate([centre - half * scale, centre + half * scale], axis=1).astype(np.float32)


def warp_regions(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int,
    context_pad: int = 0,  # paper §2.1: the tight box, no context
    method: str = "warp",  # paper §2.1: anisotropic warp
    fill: Sequence[int] = (0, 0, 0),
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Crop and warp every box of an (H,W,3) uint8 image to ``(N, size, size, 3)`` uint8.

    ``boxes``: (N,4) xyxy pixel edges. ``method``: ``"warp"`` (anisotropic), ``"square"``
    (tightest square around the box, with its image context), ``"square_nocontext"`` (same
    square, everything outside the box replaced by ``fill``). ``context_pad``: pixels of
    context around the box in the warped frame (the released code's p = 16). ``fill``: colour
    for pixels outside the image (pass the network mean so they are zero after normalisation).
    Resizing is bilinear without antialiasing like the released code (``imresize(...,
    'antialiasing', false)``), or bicubic for networks trained that way.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H,W,3) uint8, got {image.shape} {image.dtype}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    h, w = image.shape[:2]
    flag = cv2.INTER_CUBIC if interpolation == "bicubic" else cv2.INTER_LINEAR
    fill_px = np.asarray(fill, dtype=np.uint8)
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for i, box in enumerate(boxes):
        (a, b, c, d), (px, py, cw, ch) = crop_geometry(box, size, context_pad, method, w, h)
        window = image[b:d, a:c]
        if method == "square_nocontext":
            # blank the square's content outside the original (rounded) box
            window = np.broadcast_to(fill_px, window.shape).copy()
            bx1, by1 = max(a, _round(box[0])), max(b, _round(box[1]))
            bx2, by2 = min(c, max(bx1 + 1, _round(box[2]))), min(d, max(by1 + 1, _round(box[3])))
            window[by1 - b : by2 - b, bx1 - a : bx2 - a] = image[by1:by2, bx1:bx2]
        if (px, py, cw, ch) == (0, 0, size, size):
            out[i] = cv2.resize(window, (size, size), interpolation=flag)
            continue
        out[i] = fill_px
        if cw > 0 and ch > 0:
            out[i, py : py + ch, px : px + cw] = cv2.resize(window, (cw, ch), interpolation=flag)
    return out


# ----------------------------------------------------------------------------- extraction


def _layers(layer: str | Sequence[str]) -> list[str]:
    return [layer] if isinstance(layer, str) else list(layer)


def check_layer(bb: Backbone, layer: str) -> None:
    """Raise ``ValueError`` (one line) unless every tap of ``layer`` is one of the backbone's."""
    bad = [t for t in split_layer(layer) if t not in bb.taps]
    if bad:
        hint = " (taps can be joined by '+', e.g. pool5+fire5)" if bb.side_taps else ""
        raise ValueError(f"unknown layer(s) {bad} for backbone {bb.name}; choose from {list(bb.taps)}{hint}")


def layer_dim(bb: Backbone, layer: str, grid: int | None = None) -> int:
    """Feature dimension of ``layer`` (a tap or taps joined by ``+``) at RoI grid ``grid``."""
    return sum(bb.dim(t, grid) for t in split_layer(layer))


@torch.inference_mode()
def extract_features(
    image: np.ndarray,
    boxes: np.ndarray,
    backbone: Backbone | str,
    layer: str | Sequence[str] = "fc7",  # paper §3.2 uses fc7 features for detection
    mode: str = "warp",  # paper §2.1: warp each region
    batch_size: int = 128,
    *,
    context_pad: int = 0,
    method: str = "warp",
    scales: Sequence[float] = SHARED_SCALES,
    grid: int | None = None,
    pool: str | None = None,
    threads: int | None = None,
    max_side: int = SHARED_MAX_SIDE,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    flip: bool = False,
    mirror: bool = False,
    short_side: int | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """CNN features of each box of an (H,W,3) RGB uint8 image.

    Returns ``(N, D)`` float32 for one ``layer``; for a list of layers, ``{layer: (N, D)}``
    computed in the same pass. ``mode="warp"``: :func:`warp_regions` (``context_pad``,
    ``method``) then the whole network, ``batch_size`` regions at a time. ``mode="shared"``:
    the trunk once per scale in ``scales`` (each box uses the scale that brings its area
    closest to the network input, SPP-net style), RoI pooling of each box to ``grid``² cells
    (``pool="align"``: RoIAlign, 2×2 samples per cell; ``"max"``: RoI max pooling as in Fast
    R-CNN, the default for AlexNet/VGG whose fc6 reads max-pooled pool5), then the head. A scale
    is lowered so the resized image's longer side stays within ``max_side`` (bounded memory).
    ``device`` (``auto``/``cpu``/``cuda``, see :mod:`rcnn.device`; None = where the network is):
    on CUDA, float16 autocast and pinned-memory input batches; results are float32 on the host.
    ``precision="bf16"``: bfloat16 autocast on the CPU (:func:`rcnn.device.autocast`).
    ``flip``: test-time augmentation (not in the paper) — each region's pooled map is the mean of
    the region's and its mirror's (mirrored image, mirrored box, pooled grid mirrored back), so
    every tap sees both; twice the trunk work. ``mirror``: the features of the mirrored image at
    the mirrored boxes (training-set augmentation: a second sample of the same labelled region).
    ``short_side`` (shared mode): resize each image so its shorter side is this many pixels before
    applying ``scales`` (one object scale for photos of any size; see :func:`image_scales`).
    Shared mode pools float16 trunk maps (:func:`trunk_maps`), exactly what the trunk cache stores.
    """
    bb = get_backbone(backbone) if isinstance(backbone, str) else backbone
    layers = _layers(layer)
    for x in layers:
        check_layer(bb, x)
    taps = list(dict.fromkeys(t for x in layers for t in split_layer(x)))  # each tap computed once
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mirror:
        image = np.ascontiguousarray(np.asarray(image)[:, ::-1])
        boxes = flip_boxes(boxes, image.shape[1])
    set_threads(threads)
    dev = place_backbone(bb, device)
    with autocast(dev, precision):
        res = _extract(image, boxes, bb, taps, mode, batch_size, context_pad, method, scales, grid, pool,
                       max_side, dev, flip, short_side)
    out = {x: res[x] if x in res else np.concatenate([res[t] for t in split_layer(x)], axis=1) for x in layers}
    return out[layers[0]] if isinstance(layer, str) else out


def _extract(image, boxes, bb: Backbone, layers, mode, batch_size, context_pad, method, scales, grid, pool,
             max_side, dev: torch.device, flip: bool = False, short_side: int | None = None) -> dict[str, np.ndarray]:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    fixed = bb.fixed_grid  # AlexNet / VGG: fc6 reads exactly their pool5 grid
    g = bb.pool5_grid if fixed else int(grid or bb.pool5_grid)
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    sides = [k for k in layers if k in bb.side_taps]
    heads = [k for k in layers if k not in bb.side_taps]
    if mode == "warp":
        for s in range(0, len(boxes), batch_size):
            crops = warp_regions(image, boxes[s : s + batch_size], bb.input_size, context_pad, method,
                                 fill=bb.mean_rgb(), interpolation=bb.interpolation)
            fmap, smaps = bb.run_trunk(host_to(bb.preprocess(crops), dev), sides)
            grid_maps = bb.to_grid(fmap)
            if flip:  # the mirrored crop is the warp of the mirrored box in the mirrored image
                fm, sm = bb.run_trunk(host_to(bb.preprocess(np.ascontiguousarray(crops[:, :, ::-1])), dev), sides)
                grid_maps = (grid_maps + bb.to_grid(fm).flip(-1)) * 0.5
                smaps = {k: (v + sm[k].flip(-1)) * 0.5 for k, v in smaps.items()}
            out = bb.head(grid_maps, heads, g) if heads else {}
            # a side tap of a warped crop: its whole map (the crop is the box) averaged to g×g cells
            out.update({k: F.adaptive_avg_pool2d(v, g).flatten(1) for k, v in smaps.items()})
            for k in layers:
                chunks[k].append(to_host(out[k]))
    else:
        tm = trunk_maps(image, bb, sides, scales, max_side, dev, flip, short_side, boxes=boxes, context_pad=context_pad)
        out = pool_regions(tm, boxes, bb, layers, g, pool, batch_size, context_pad)
        chunks = {k: [to_host(out[k])] for k in layers}
    res = {}
    for k in layers:
        d = bb.dim(k, g)
        res[k] = torch.cat(chunks[k]).float().numpy() if chunks[k] else np.zeros((0, d), np.float32)
    return res


#: the trunk maps are kept (and cached) as float16: ReLU maps of ImageNet nets stay far below its
#: range (SqueezeNet's fire9 peaks near 150), bfloat16 maps convert exactly, and pooling float16
#: maps is what both training (from the cache) and detection (from the image) do, so they agree
TRUNK_DTYPE = torch.float16


def _scale_pick(boxes: np.ndarray, factors: Sequence[float], input_size: int) -> np.ndarray:
    """Index of the factor that brings each box's area closest to the network input's (SPP-net's rule)."""
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 1) * np.maximum(boxes[:, 3] - boxes[:, 1], 1)
    return np.argmin(np.abs(area[:, None] * np.square(factors)[None] - input_size**2), axis=1)


@dataclass
class TrunkMaps:
    """One image's trunk maps in shared mode: everything of the extraction that does not depend on the boxes.

    ``factors[i]``: the nominal resize factor of scale ``i`` (boxes pick a scale by it); ``sizes[i]``:
    the resized image's ``(w, h)`` in pixels; ``maps[i]``: ``{name: (1,C,h',w') float16}`` with
    ``"trunk"`` (the map the head reads, stride ``Backbone.stride``), each side tap by name, and the
    same names suffixed ``"@flip"`` for the mirrored image when flip averaging is on. A scale no box
    needed may be absent (``maps[i]`` empty)."""

    image_size: tuple[int, int]
    factors: tuple[float, ...]
    sizes: tuple[tuple[int, int], ...]
    maps: tuple[dict[str, torch.Tensor], ...]

    def names(self) -> set[str]:
        return {k for m in self.maps for k in m}


def trunk_maps(image: np.ndarray, bb: Backbone, sides: Sequence[str], scales: Sequence[float], max_side: int,
               dev: torch.device, flip: bool = False, short_side: int | None = None, boxes: np.ndarray | None = None,
               context_pad: int = 0) -> TrunkMaps:
    """Run the trunk over an (H,W,3) uint8 image at each shared-mode scale (:func:`scaled_image`; with
    ``short_side``, of the image resized to that shorter side), keeping the trunk map and the ``sides`` maps as float16. With ``boxes``, only the scales some box
    picks are run (extraction of known boxes); without, all (the trunk cache)."""
    scales = tuple(float(x) for x in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive, not {scales}")
    h, w = image.shape[:2]
    # each scale multiplies the image resized to ``short_side`` (or the image itself)
    nominal = [float(sc) * (1.0 if short_side is None else short_side / max(1, min(h, w))) for sc in scales]
    need = set(range(len(scales)))
    if boxes is not None:
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        b = dilate_boxes(b, bb.input_size, context_pad) if context_pad else b
        need = set(_scale_pick(b, nominal, bb.input_size).tolist())
    sizes, maps = [], []
    for i, sc in enumerate(nominal):
        if i not in need:  # no box picks this scale: nothing to run (its size is never read)
            sizes.append((0, 0))
            maps.append({})
            continue
        img, _, _ = scaled_image(image, sc, max_side, bb.interpolation)
        sizes.append((img.shape[1], img.shape[0]))
        views = {"": img[None]}
        if flip:
            views["@flip"] = np.ascontiguousarray(img[None, :, ::-1])
        got = {}
        for suffix, x in views.items():
            fm, sm = bb.run_trunk(host_to(bb.preprocess(x), dev), sides)
            got["trunk" + suffix] = fm.to(TRUNK_DTYPE)
            got.update({k + suffix: v.to(TRUNK_DTYPE) for k, v in sm.items()})
        maps.append(got)
    return TrunkMaps((w, h), tuple(nominal), tuple(sizes), tuple(maps))


def pool_regions(tm: TrunkMaps, boxes: np.ndarray, bb: Backbone, layers: Sequence[str], grid: int,
                 pool: str | None = None, batch_size: int = 512, context_pad: int = 0) -> dict[str, torch.Tensor]:
    """``{tap: (N, D)}`` features of boxes ``(N,4)`` (original image pixels) from an image's trunk maps:
    each box RoI-pooled to ``grid``² cells at the scale that brings it closest to the network input
    (``pool="align"``: RoIAlign with 2×2 samples per cell; ``"max"``: RoI max pooling), head taps
    computed from the pooled trunk map, side taps pooled from their own maps; flip-averaged when
    ``tm`` holds mirrored maps. Rows follow the order of ``boxes``."""
    fixed = bb.name == "alexnet" or bb.name.startswith("vgg")
    pool = pool or ("max" if fixed else "align")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if context_pad:
        boxes = dilate_boxes(boxes, bb.input_size, context_pad)
    sides = [k for k in layers if k in bb.side_taps]
    heads = [k for k in layers if k not in bb.side_taps]
    pick = _scale_pick(boxes, tm.factors, bb.input_size)
    w, h = tm.image_size
    res = {k: None for k in layers}
    for si, size in enumerate(tm.sizes):
        idx = np.flatnonzero(pick == si)
        if len(idx) == 0:
            continue
        # float16 maps → float32 once per image (CPU RoI ops have no float16 kernels)
        m = {k: (v.float() if v.dtype == TRUNK_DTYPE else v) for k, v in tm.maps[si].items()}
        flip = "trunk@flip" in m
        sx, sy = size[0] / w, size[1] / h  # the resized image's true per-axis scale (rounded to whole pixels)
        for s in range(0, len(idx), batch_size):
            sel = idx[s : s + batch_size]
            scaled = boxes[sel] * np.array([sx, sy, sx, sy], np.float32)
            mirrored = flip_boxes(scaled, size[0]) if flip else None
            views = ["trunk", "trunk@flip"] if flip else ["trunk"]
            grid_maps = _pool_views([m[v] for v in views], scaled, mirrored, grid, bb.stride, pool)
            out = bb.head(grid_maps, heads, grid) if heads else {}
            for k in sides:  # the finer map pooled to the same grid cells of the box
                sv = [k, k + "@flip"] if flip else [k]
                out[k] = _pool_views([m[v] for v in sv], scaled, mirrored, grid, bb.side_taps[k][1], pool).flatten(1)
            for k in layers:
                if res[k] is None:  # one output buffer per tap, rows written in place (no concatenation copies)
                    res[k] = torch.empty((len(boxes), out[k].shape[1]), dtype=out[k].dtype, device=out[k].device)
                res[k][torch.from_numpy(sel)] = out[k]
    return {k: (v if v is not None else torch.zeros((len(boxes), bb.dim(k, grid)))) for k, v in res.items()}


def _pool_views(maps: list[torch.Tensor], boxes: np.ndarray, mirrored: np.ndarray | None, g: int, stride: int,
                pool: str) -> torch.Tensor:
    """``(N,C,g,g)`` cells of ``boxes`` in ``maps[0]``; with a second map (the mirrored image), averaged
    with the mirrored boxes' cells there, their grid mirrored back (``flip``)."""
    out = roi_cells(maps[0], boxes, g, stride, pool)
    if len(maps) > 1:  # the mirrored box [W-x2, W-x1) in the mirrored map
        out = (out + roi_cells(maps[1], mirrored, g, stride, pool).flip(-1)) * 0.5
    return out


def scaled_image(image: np.ndarray, scale: float, max_side: int, interpolation: str) -> tuple[np.ndarray, float, float]:
    """Shared mode's input: ``image`` resized by ``scale``, lowered so the longer side stays within
    ``max_side``; returns ``(resized, sx, sy)``, the true per-axis scales (the size is rounded to
    whole pixels). Bicubic for networks trained so and for upscaling, area averaging to shrink."""
    h, w = image.shape[:2]
    sc = min(scale, max_side / max(h, w))  # the scale actually used
    size = (max(1, round(w * sc)), max(1, round(h * sc)))
    flag = cv2.INTER_CUBIC if interpolation == "bicubic" or sc > 1 else cv2.INTER_AREA
    img = image if size == (w, h) else cv2.resize(image, size, interpolation=flag)
    return img, size[0] / w, size[1] / h


def roi_cells(fmap: torch.Tensor, boxes: np.ndarray, g: int, stride: int, pool: str = "align") -> torch.Tensor:
    """``(N,C,g,g)`` pooled cells of boxes ``(N,4)`` given in the map's input pixels (``fmap``: one
    image's ``(1,C,h,w)`` map of stride ``stride``): RoIAlign with 2×2 samples per cell, or RoI max
    pooling (``pool="max"``). Differentiable: fine-tuning back-propagates through it into the trunk."""
    rois = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(np.ascontiguousarray(boxes))], 1).to(fmap.device)

    def cells(r: torch.Tensor) -> torch.Tensor:
        if pool == "max":  # torchvision has no CPU autocast rule for roi_pool: pool in float32
            return roi_pool(fmap.float(), r.float(), g, 1.0 / stride)
        return roi_align(fmap, r, g, 1.0 / stride, sampling_ratio=2, aligned=True)

    threads = torch.get_num_threads()
    serial = fmap.device.type != "cpu" or fmap.dtype != torch.float32 or (torch.is_grad_enabled() and fmap.requires_grad)
    if serial or threads < 2 or len(rois) < 256:
        return cells(rois)
    # torchvision's CPU kernels pool one box after another on one core; each box is independent and
    # the op releases the GIL, so chunks of boxes pooled in threads give the same values in less time
    # (float32 only: autocast, which bf16 maps need, is thread-local)
    with ThreadPoolExecutor(threads) as ex:
        return torch.cat(list(ex.map(cells, torch.chunk(rois, threads))))


# ----------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines the stored features (the cache key)."""

    backbone: str = "squeezenet1_1"
    weights: str | None = None  # weights file (required for torchvision models such as alexnet)
    layer: str = "fc7"  # paper §3.2
    mode: str = "warp"  # paper §2.1
    context_pad: int = 0  # paper §2.1: tight box
    method: str = "warp"  # paper §2.1
    scales: tuple[float, ...] = SHARED_SCALES  # shared mode only
    grid: int = SHARED_GRID  # shared mode RoI grid (and conv nets' pool5 grid)
    pool: str | None = None  # shared mode: "align" | "max" (None: backbone default)
    with_gt: bool = False  # also describe the ground-truth boxes (stored first)
    batch_size: int = field(default=128, compare=False)
    # where the CNN runs (rcnn.device): not in the cache key, GPU (fp16 autocast) and CPU
    # features agree within the float16 storage precision
    device: str = field(default="auto", compare=False)
    # CPU arithmetic: "fp32" (faithful) or "bf16" (~2x faster on AVX512-BF16 CPUs); in the key
    precision: str = "fp32"
    # test-time augmentation (not in the paper): pooled maps averaged with the mirrored region's
    flip: bool = False
    # training-set augmentation (not in the paper): features of the mirrored image at the mirrored
    # boxes; the stored boxes stay the original image's, so labels and IoUs are unchanged
    mirror: bool = False
    # shared mode: each image resized so its shorter side is this many pixels before ``scales``
    # (None: ``scales`` multiply the original size, the SPP-net convention)
    short_side: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.pool not in (None, "align", "max"):
            raise ValueError(f"pool must be 'align' or 'max', not {self.pool!r}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.short_side is not None and int(self.short_side) < 16:
            raise ValueError(f"short_side must be at least 16 pixels, not {self.short_side}")

    def weights_hash(self) -> str:
        """sha256 of the weights the features come from."""
        if self.weights:
            return _file_hash(str(Path(self.weights).resolve()))
        from rcnn.backbones import EFFNET_SHA256, SQUEEZENET_SHA256

        # built-ins come from sha256-verified files: no need to build the network for the key
        known = {"squeezenet1_1": SQUEEZENET_SHA256, "efficientnet_lite0": EFFNET_SHA256}
        return known.get(self.backbone) or get_backbone(self.backbone).weights_hash

    def key(self) -> str:
        """Hash of every setting that changes the features (the weights by content)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("device")
        d.pop("weights")
        if self.precision == "fp32":  # keeps the keys of caches written before the option existed
            d.pop("precision")
        for opt in ("flip", "mirror", "short_side"):  # likewise
            if not d[opt]:
                d.pop(opt)
        if self.mode == "warp":  # shared-only options do not change warp features...
            d.pop("scales"), d.pop("pool")
            d.pop("short_side", None)
            if set(split_layer(self.layer)) <= GRID_FREE_TAPS:  # ...nor the grid those read after pooling
                d.pop("grid")
        else:  # the crop method is warp-only; context_pad = 0 keeps the keys of older caches
            d.pop("method")
            if self.context_pad == 0:
                d.pop("context_pad")
        return settings_hash("features", FEATURE_VERSION, d, self.weights_hash())

    def extract_options(self) -> dict:
        """The keyword arguments of :func:`extract_features` these settings stand for."""
        return dict(mode=self.mode, batch_size=self.batch_size, context_pad=self.context_pad, method=self.method,
                    scales=self.scales, grid=self.grid, pool=self.pool, precision=self.precision, flip=self.flip,
                    mirror=self.mirror, short_side=self.short_side)

    def backbone_obj(self) -> Backbone:
        return get_backbone(self.backbone, self.weights)

    def trunk_key(self) -> str:
        """Hash of the settings that change a shared-mode image's trunk maps (not the boxes, grid or pooling)."""
        d = {"backbone": self.backbone, "precision": self.precision, "scales": list(self.scales),
             "short_side": self.short_side, "max_side": SHARED_MAX_SIDE, "flip": self.flip, "mirror": self.mirror}
        return settings_hash("trunk", TRUNK_VERSION, d, self.weights_hash())

    def describe(self) -> str:
        side = f", short side {self.short_side} px" if self.short_side else ""
        extra = (f"scales {list(self.scales)}{side}, grid {self.grid}" if self.mode == "shared"
                 else f"{self.method}, context {self.context_pad}")
        extra += f", context {self.context_pad}" if self.mode == "shared" and self.context_pad else ""
        extra += ", bf16" if self.precision == "bf16" else ""
        extra += ", flip-averaged" if self.flip else ""
        extra += ", mirrored" if self.mirror else ""
        return f"{self.backbone} {self.layer} {self.mode} ({extra})"


_HASHES: dict[str, str] = {}


def _file_hash(path: str) -> str:
    if path not in _HASHES:
        _HASHES[path] = file_sha256(path)
    return _HASHES[path]


def feature_dir(proposal_config, feature_config: FeatureConfig, dataset_root: str | Path) -> Path:
    """Where an image's features are cached: warp mode ``<cache>/features/<feature key>/<proposal
    key>-<dataset hash>`` (per-region features); shared mode ``<cache>/trunk/<trunk key>/<dataset
    hash>`` (the image's trunk maps, pooled for any boxes when read: :func:`get_trunk_maps`)."""
    root = str(Path(dataset_root).resolve())
    if feature_config.mode == "shared":
        return cache_dir() / "trunk" / feature_config.trunk_key() / settings_hash("dataset", root)
    return cache_dir() / "features" / feature_config.key() / f"{proposal_config.key()}-{settings_hash('dataset', root)}"


def tap_configs(feature_config: FeatureConfig) -> list[FeatureConfig]:
    """One config per cache folder of a (possibly joined) layer: one per tap in warp mode (each tap
    has its own per-region cache), one in shared mode (every tap is pooled from the same trunk maps)."""
    if feature_config.mode == "shared":
        return [feature_config]
    return [replace(feature_config, layer=t) for t in split_layer(feature_config.layer)]


def feature_dirs(proposal_config, feature_config: FeatureConfig, dataset_root: str | Path) -> list[Path]:
    """The cache folders a (possibly joined) layer's features live in: one per tap."""
    return [feature_dir(proposal_config, c, dataset_root) for c in tap_configs(feature_config)]


def feature_path(record: ImageRecord, proposal_config, feature_config: FeatureConfig, dataset_root) -> Path:
    return feature_dir(proposal_config, feature_config, dataset_root) / f"{safe_filename(record.image_id)}.npz"


def _save(path: Path, boxes: np.ndarray, feats: np.ndarray, image_sha: str, n_gt: int, compress: bool = True) -> None:
    def w(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            # compressed: ReLU features are mostly zeros, zlib roughly halves float16 bytes again
            (np.savez_compressed if compress else np.savez)(f, boxes=boxes, feats=feats, image_sha256=np.array(image_sha),
                                                            n_gt=np.array(n_gt, np.int32))

    atomic_write(path, w)


def _load(path: Path, image_sha: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["image_sha256"]) != image_sha:
                return None
            boxes, feats = z["boxes"], z["feats"]
    except (OSError, ValueError, EOFError, KeyError):
        return None  # missing or corrupt (e.g. a kill mid-write of a non-atomic copy): recompute
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(feats) != len(boxes):
        return None
    return boxes, feats


def _save_trunk(path: Path, tm: TrunkMaps, image_sha: str) -> None:
    """Store trunk maps as float16 bytes, zstd level :data:`TRUNK_ZSTD_LEVEL`, atomically."""
    import zstandard

    zc = zstandard.ZstdCompressor(level=TRUNK_ZSTD_LEVEL)
    arrays, shapes = {}, []
    for i, m in enumerate(tm.maps):
        shapes.append({k: list(v.shape) for k, v in m.items()})
        for k, v in m.items():
            raw = v.detach().to("cpu", TRUNK_DTYPE).contiguous().numpy().tobytes()
            arrays[f"m{i}__{k}"] = np.frombuffer(zc.compress(raw), np.uint8)
    meta = {"image_size": list(tm.image_size), "factors": list(tm.factors), "sizes": [list(x) for x in tm.sizes],
            "shapes": shapes}
    save_npz(path, meta=np.array(json.dumps(meta)), image_sha256=np.array(image_sha), **arrays)


def _load_trunk(path: Path, image_sha: str) -> TrunkMaps | None:
    """Trunk maps stored by :func:`_save_trunk` for this image's bytes, or None (absent, stale or corrupt)."""
    import zstandard

    z = load_npz(path)
    if z is None or str(z.get("image_sha256", "")) != image_sha:
        return None
    try:
        meta = json.loads(str(z["meta"]))
        zd = zstandard.ZstdDecompressor()
        maps = []
        for i, shapes in enumerate(meta["shapes"]):
            m = {}
            for k, shape in shapes.items():
                buf = zd.decompress(z[f"m{i}__{k}"].tobytes())
                m[k] = torch.frombuffer(bytearray(buf), dtype=TRUNK_DTYPE).reshape(shape)
            maps.append(m)
        return TrunkMaps(tuple(meta["image_size"]), tuple(meta["factors"]), tuple(tuple(x) for x in meta["sizes"]),
                         tuple(maps))
    except (KeyError, ValueError, RuntimeError, zstandard.ZstdError):
        return None  # written by another version or damaged: recompute


def get_trunk_maps(record: ImageRecord, feature_config: FeatureConfig, dataset_root: str | Path | None = None,
                   image_sha: str | None = None) -> TrunkMaps:
    """A dataset image's shared-mode trunk maps (the trunk map and every side tap of
    ``feature_config.layer``): cached, else computed over the whole image and stored
    (``<cache>/trunk/...``, float16 + zstd, ~1–2 MB for a 640×480 image at ×1.5). Keyed by the
    trunk settings (:meth:`FeatureConfig.trunk_key`), the dataset root, the image id and the image
    file's sha256; a cached entry missing a requested side tap is recomputed with the union."""
    fc = feature_config
    if fc.mode != "shared":
        raise ValueError("trunk maps are cached in shared mode only")
    root = Path(dataset_root) if dataset_root is not None else Path(record.path).parent
    sha = image_sha or _image_sha(record)
    bb = fc.backbone_obj()
    check_layer(bb, fc.layer)
    sides = [t for t in split_layer(fc.layer) if t in bb.side_taps]
    path = feature_path(record, None, fc, root)
    tm = _load_trunk(path, sha)
    want = {"trunk", *sides}
    if tm is not None and want <= {k.removesuffix("@flip") for k in tm.names()}:
        return tm
    if tm is not None:  # keep the side taps cached earlier for other layers
        sides = sorted(set(sides) | {k.removesuffix("@flip") for k in tm.names()} - {"trunk"})
    tm = image_trunk_maps(load_image(record.path), fc, bb, sides)
    _save_trunk(path, tm, sha)
    return tm


def _image_sha(record: ImageRecord) -> str:
    try:
        return file_sha256(record.path)
    except OSError as e:
        raise ImageReadError(f"{record.path}: cannot read ({e.strerror or e})") from None


@torch.inference_mode()
def image_trunk_maps(image: np.ndarray, feature_config: FeatureConfig, bb: Backbone | None = None,
                     sides: Sequence[str] | None = None) -> TrunkMaps:
    """A new (H,W,3) uint8 image's shared-mode trunk maps at ``feature_config``'s scales, with the side
    taps ``sides`` (default: those of its layer): what :func:`get_trunk_maps` caches for a dataset image."""
    fc = feature_config
    bb = bb or fc.backbone_obj()
    if sides is None:
        sides = [t for t in split_layer(fc.layer) if t in bb.side_taps]
    if fc.mirror:
        image = np.ascontiguousarray(np.asarray(image)[:, ::-1])
    set_threads(None)
    dev = place_backbone(bb, fc.device)
    with autocast(dev, fc.precision):
        tm = trunk_maps(image, bb, sides, fc.scales, SHARED_MAX_SIDE, dev, fc.flip, fc.short_side)
    return TrunkMaps(tm.image_size, tm.factors, tm.sizes, tuple({k: v.cpu() for k, v in m.items()} for m in tm.maps))


@torch.inference_mode()
def pool_features(tm: TrunkMaps, boxes: np.ndarray, feature_config: FeatureConfig, bb: Backbone | None = None
                  ) -> np.ndarray:
    """``(N, D)`` float32 shared-mode features of ``boxes`` ``(N,4)`` (original pixels) from an image's
    trunk maps (:func:`pool_regions` at ``feature_config``'s grid and pooling); joined taps concatenated."""
    fc = feature_config
    bb = bb or fc.backbone_obj()
    taps = split_layer(fc.layer)
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if fc.mirror:
        b = flip_boxes(b, tm.image_size[0])
    fixed = bb.name == "alexnet" or bb.name.startswith("vgg")
    g = 6 if fixed else int(fc.grid or bb.pool5_grid)
    dev = place_backbone(bb, fc.device)
    with autocast(dev, fc.precision):
        out = pool_regions(tm, b, bb, taps, g, fc.pool, max(fc.batch_size, 512), fc.context_pad)
    if len(taps) == 1:
        return to_host(out[taps[0]]).float().numpy()
    return torch.cat([to_host(out[t]).float() for t in taps], 1).numpy()


def pooled_features(record: ImageRecord, boxes: np.ndarray, feature_config: FeatureConfig,
                    dataset_root: str | Path | None = None, image_sha: str | None = None) -> np.ndarray:
    """``(N, D)`` float32 shared-mode features of a dataset image's ``boxes`` ``(N,4)`` (original
    pixels), pooled from its cached trunk maps (:func:`get_trunk_maps`); joined taps concatenated."""
    return pool_features(get_trunk_maps(record, feature_config, dataset_root, image_sha), boxes, feature_config)


def is_cached(record: ImageRecord, proposal_config, feature_config: FeatureConfig, dataset_root: str | Path) -> bool:
    """Whether ``record``'s features (its trunk maps in shared mode, every tap in warp mode) are in the
    cache for its current bytes."""
    sha = file_sha256(record.path)
    if feature_config.mode == "shared":
        try:
            with np.load(feature_path(record, None, feature_config, dataset_root), allow_pickle=False) as z:
                return str(z["image_sha256"]) == sha  # read alone: the maps stay compressed on disk
        except (OSError, ValueError, KeyError, EOFError):
            return False
    return all(_load(feature_path(record, proposal_config, c, dataset_root), sha) is not None
               for c in tap_configs(feature_config))


def get_features(
    record: ImageRecord,
    proposal_config=None,
    feature_config: FeatureConfig | None = None,
    dataset_root: str | Path | None = None,
    compress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (N,4) float32, feats (N,D) float16)`` of one image: cached, else computed and stored.

    A joined layer (``pool5+fire5``) is read from (and stored in) each tap's own cache, computed in one
    pass for the taps not cached yet, and returned concatenated.
    ``boxes`` are the image's proposals (:func:`rcnn.proposals.get_proposals`), preceded by its
    ground-truth boxes when ``feature_config.with_gt``. Shared mode caches the image's trunk maps
    instead and pools the boxes from them on every call (:func:`pooled_features`). The entry is keyed by dataset root,
    image id, the proposal config, every feature setting and the weights' sha256, and stores
    the image file's sha256 so an edited image is never served stale features. ``compress=False``
    stores plain ``.npz`` (the same arrays: zlib on a 1000-box pool5 block costs seconds per image).
    """
    from rcnn.proposals import ProposalConfig, get_proposals

    pc = proposal_config or ProposalConfig()
    fc = feature_config or FeatureConfig()
    root = Path(dataset_root) if dataset_root is not None else Path(record.path).parent
    sha = _image_sha(record)
    if fc.mode == "shared":  # the trunk maps are cached, the regions pooled on the fly
        boxes = get_proposals(record, pc, root).astype(np.float32)
        if fc.with_gt and len(record.boxes):
            boxes = np.concatenate([np.asarray(record.boxes, np.float32).reshape(-1, 4), boxes])
        return boxes, pooled_features(record, boxes, fc, root, sha).astype(np.float16)
    # joined taps (pool5+fire5) are cached tap by tap: a tap shared by several rows is stored once
    parts = {c.layer: c for c in tap_configs(fc)}
    hits = {t: _load(feature_path(record, pc, c, root), sha) for t, c in parts.items()}
    todo = [t for t, h in hits.items() if h is None]
    if todo:
        boxes = get_proposals(record, pc, root).astype(np.float32)
        n_gt = 0
        if fc.with_gt and len(record.boxes):
            boxes = np.concatenate([np.asarray(record.boxes, np.float32).reshape(-1, 4), boxes])
            n_gt = len(record.boxes)
        image = load_image(record.path)
        out = extract_features(image, boxes, fc.backbone_obj(), todo, device=fc.device, **fc.extract_options())
        for t in todo:
            hits[t] = boxes, out[t].astype(np.float16)
            _save(feature_path(record, pc, parts[t], root), boxes, hits[t][1], sha, n_gt, compress)
    boxes = hits[next(iter(parts))][0]
    if any(len(b) != len(boxes) or not np.array_equal(b, boxes) for b, _ in hits.values()):
        # one tap cached with older proposals: recompute them all from the current ones
        for t in parts:
            feature_path(record, pc, parts[t], root).unlink(missing_ok=True)
        return get_features(record, pc, fc, dataset_root, compress)
    if len(parts) == 1:
        return hits[next(iter(parts))]
    return boxes, np.concatenate([hits[t][1] for t in parts], axis=1)


@dataclass
class FeatureSummary:
    """What :func:`features_for_dataset` did."""

    images: int = 0
    computed: int = 0
    cached: int = 0
    failed: list[str] = field(default_factory=list)
    regions: int = 0  # regions computed in this run (0 in shared mode: trunk maps are cached, regions pooled later)
    seconds: float = 0.0  # wall seconds spent on images computed in this run
    cache_dir: str = ""
    cache_mb: float = 0.0

    @property
    def regions_per_s(self) -> float:
        return self.regions / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "regions_per_s": self.regions_per_s, "images_per_s": self.images_per_s}


def features_for_dataset(
    dataset,
    proposal_config=None,
    feature_config: FeatureConfig | None = None,
    progress: ProgressFn | None = None,
    collect: bool = False,
) -> FeatureSummary | tuple[FeatureSummary, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Fill the feature cache for every image of ``dataset`` (resumes; cached images are skipped).

    One image at a time, so memory stays at one image's features whatever the dataset size;
    ``collect=True`` also returns ``{image_id: (boxes, feats)}`` (all in RAM — only if asked).
    ``progress`` hears of each image (with the regions/s). Unreadable images are reported, not fatal.
    """
    from rcnn.proposals import ProposalConfig

    pc = proposal_config or ProposalConfig()
    fc = feature_config or FeatureConfig()
    fc.backbone_obj()  # fail early (missing weights) before the loop
    taps = tap_configs(fc)
    for c in taps:
        _remove_stale_tmp(feature_dir(pc, c, dataset.root))
    summary = FeatureSummary(images=len(dataset.records))
    got: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    n = len(dataset.records)
    for i, rec in enumerate(dataset.records):
        cached = all(feature_path(rec, pc, c, dataset.root).is_file() for c in taps)
        t0 = time.perf_counter()
        try:
            if fc.mode == "shared" and not collect:  # fill the trunk cache; regions are pooled when read
                get_trunk_maps(rec, fc, dataset.root)
                boxes = np.zeros((0, 4), np.float32)
            else:
                boxes, feats = get_features(rec, pc, fc, dataset.root)
        except ImageReadError as e:
            summary.failed.append(str(e))
            report(progress, fc.describe(), i + 1, n)
            continue
        if cached:
            summary.cached += 1
        else:
            summary.computed += 1
            summary.regions += len(boxes)
            summary.seconds += time.perf_counter() - t0
        if collect:
            got[rec.image_id] = (boxes, feats)
        rate = f"{summary.images_per_s:.2f} images/s" if fc.mode == "shared" else f"{summary.regions_per_s:.1f} regions/s"
        report(progress, fc.describe(), i + 1, n, rate)
    dirs = feature_dirs(pc, fc, dataset.root)
    summary.cache_dir = " + ".join(str(d) for d in dirs)
    summary.cache_mb = sum(dir_size_mb(d) for d in dirs)
    return (summary, got) if collect else summary


def _remove_stale_tmp(folder: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary files a killed run left behind (older than ``max_age_s``: not being written)."""
    now = time.time()
    for f in folder.glob(".*.tmp") if folder.is_dir() else ():
        try:
            if now - f.stat().st_mtime > max_age_s:
                f.unlink()
        except OSError:
            pass  # another process removed or renamed it
