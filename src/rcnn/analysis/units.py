"""Top activations of pool5 units (paper §3.1, Figures 3 and 6).

A *unit* is one cell of the pool5-like feature map: ``(channel, y, x)`` of the ``C × G × G``
grid, flattened channel-major as :mod:`rcnn.backbones` does (``index = (c·G + y)·G + x``).
Each unit is treated as an object detector: its activation is read for every proposal of
a held-out split (streamed image by image from the feature cache, or computed and
discarded), non-maximum suppression is applied *within each image* (paper §3.1), and the
top regions are drawn as a grid with the unit's receptive field and activation value.

The receptive field of a cell is computed from the network's own layers by autograd: a
copy of the trunk with every activation replaced by the identity, max-pooling by average
pooling, batch-norm and squeeze-excitation gates removed and all weights made positive
is a linear map whose input gradient is non-zero exactly on the cell's (boundary-clipped)
support.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcnn.boxes import nms
from rcnn.data import ImageRecord, load_image
from rcnn.progress import ProgressFn, tracked

UNIT_NMS_IOU = 0.3  # paper §3.1: NMS within each image (the detector's §2.2 threshold)
TOP_K = 16  # paper Figure 3: top 16 activations per unit


@dataclass(frozen=True)
class Unit:
    """One pool5 cell: ``channel`` at grid position ``(y, x)`` of a ``grid × grid`` map."""

    channel: int
    y: int
    x: int
    grid: int = 6
    note: str = ""  # why it was chosen, e.g. "RBC +" (largest positive SVM weight)

    @property
    def index(self) -> int:
        return (self.channel * self.grid + self.y) * self.grid + self.x

    @classmethod
    def from_index(cls, index: int, grid: int = 6, note: str = "") -> Unit:
        c, r = divmod(int(index), grid * grid)
        return cls(c, r // grid, r % grid, grid, note)

    def label(self) -> str:
        # the paper labels units by their (y, x, channel) position
        return f"({self.y}, {self.x}, {self.channel})" + (f" {self.note}" if self.note else "")


def parse_units(spec: str, grid: int = 6) -> list[Unit]:
    """``"y,x,c; y,x,c"`` (paper order) or flat indices ``"123 4567"`` → units."""
    out = []
    for part in [p for p in spec.replace(";", " ").split() if p]:
        nums = [int(v) for v in part.split(",") if v.strip() != ""]
        if len(nums) == 3:
            y, x, c = nums
            if not (0 <= y < grid and 0 <= x < grid and c >= 0):
                raise ValueError(f"unit {part!r}: y and x must be in 0..{grid - 1}, channel >= 0")
            out.append(Unit(c, y, x, grid))
        elif len(nums) == 1:
            out.append(Unit.from_index(nums[0], grid))
        else:
            raise ValueError(f"unit {part!r}: give 'y,x,channel' or a flat index")
    if not out:
        raise ValueError("no units given")
    return out


# ------------------------------------------------------------------ receptive field


def _linearize(module: nn.Module) -> nn.Module:
    """In place: activations → identity, max-pool → avg-pool, BN / SE → identity, weights ≥ 0, biases 0."""
    for name, child in list(module.named_children()):
        cname = type(child).__name__
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode))
        elif isinstance(child, nn.BatchNorm2d | nn.Dropout | nn.ReLU | nn.ReLU6 | nn.SiLU | nn.GELU | nn.Hardswish
                        | nn.Hardsigmoid | nn.Sigmoid | nn.LeakyReLU) or "SqueezeExcite" in cname or cname in ("SEModule",
                                                                                                           "SqueezeExcitation"):
            setattr(module, name, nn.Identity())
        elif isinstance(child, nn.Conv2d | nn.Linear):
            with torch.no_grad():
                child.weight.abs_()
                if child.weight.abs().sum() == 0:
                    child.weight.fill_(1.0)
                child.weight.add_(1e-3)  # no exact zeros inside the kernel: the support is the full kernel
                if child.bias is not None:
                    child.bias.zero_()
        elif "BatchNormAct" in cname:  # timm fuses BN + activation in one module
            setattr(module, name, nn.Identity())
        else:
            _linearize(child)
    return module


def _rf_trunk(backbone) -> nn.Module:
    mods = getattr(backbone, "modules", None)
    if backbone.fixed_grid:  # AlexNet / VGG
        net = copy.deepcopy(mods.features)  # includes the max-pool that to_grid applies
    else:
        net = copy.deepcopy(backbone.trunk)
    return _linearize(net).eval()


def _compute_rf(backbone, grid: int) -> np.ndarray:
    net = _rf_trunk(backbone).float()
    s = backbone.input_size
    x = torch.zeros(1, 3, s, s, requires_grad=True)
    g = F.adaptive_avg_pool2d(net(x), grid)  # the same bins as pool5's adaptive max-pool

    def support(y: int, xx: int) -> tuple[torch.Tensor, torch.Tensor]:
        (grad,) = torch.autograd.grad(g[0, :, y, xx].sum(), x, retain_graph=True)
        sup = grad[0].abs().sum(0) > 0  # positive weights: no cancellation, support is exact
        return torch.nonzero(sup.any(0)).flatten(), torch.nonzero(sup.any(1)).flatten()

    # every layer widens the support per axis, so a cell's support is the product of its
    # column extent (same for every row) and its row extent: 2G passes instead of G²
    mid = grid // 2
    cols = [support(mid, i)[0] for i in range(grid)]
    rows = [support(i, mid)[1] for i in range(grid)]
    out = np.zeros((grid, grid, 4), np.float32)
    for y in range(grid):
        for xx in range(grid):
            out[y, xx] = (int(cols[xx].min()), int(rows[y].min()), int(cols[xx].max()) + 1, int(rows[y].max()) + 1)
    return out


_RF_CACHE: dict[tuple, np.ndarray] = {}


def receptive_fields(backbone, grid: int | None = None) -> np.ndarray:
    """``(G, G, 4)`` float32 xyxy pixel-edge box of each pool5 cell's receptive field in the
    ``input_size``² network input (clipped at the borders, as the paper notes)."""
    grid = grid or backbone.pool5_grid
    key = (backbone.name, backbone.weights_hash, backbone.input_size, grid)
    if key not in _RF_CACHE:
        with torch.enable_grad():
            _RF_CACHE[key] = _compute_rf(backbone, grid)
    return _RF_CACHE[key].copy()


def rf_in_crop(rf: np.ndarray, input_size: int, crop_size: int) -> np.ndarray:
    """Scale a receptive-field box from the network input to a displayed crop."""
    return np.asarray(rf, np.float32) * (crop_size / input_size)


# ------------------------------------------------------------------ unit selection


def auto_units(model, backbone, grid: int | None = None) -> list[Unit]:
    """Paper Figure 3 rows 1–2: for each trained class, the unit with the largest positive
    and the one with the largest negative SVM weight. Needs a pool5 model; for a model on
    a conv net's channel-pooled layer (fc6/fc7 of SqueezeNet/EfficientNet: one value per
    pool5 channel) the channel is chosen by its weight and shown at the central cell."""
    grid = grid or backbone.pool5_grid
    W = np.asarray(model.W, np.float32)
    channels = backbone.dim("pool5", grid) // (grid * grid)
    units: list[Unit] = []
    for c, name in enumerate(model.classes):
        if hasattr(model, "trained") and not model.trained[c]:
            continue
        w = W[:, c]
        for sign, idx in (("+", int(np.argmax(w))), ("-", int(np.argmin(w)))):  # ASCII: PIL fonts lack U+2212
            if model.layer == "pool5" and W.shape[0] == channels * grid * grid:
                u = Unit.from_index(idx, grid, f"{name} {sign}")
            elif W.shape[0] == channels:
                u = Unit(idx, grid // 2, grid // 2, grid, f"{name} {sign} ({model.layer} channel)")
            else:
                raise ValueError(f"--units auto needs a model on pool5 (or a channel-pooled layer); this model uses "
                                 f"{model.layer} with {W.shape[0]} dimensions — pass --units y,x,channel instead")
            if u not in units:
                units.append(u)
    return units


# ------------------------------------------------------------------ streaming top activations


@dataclass(order=True)
class Hit:
    """One top activation: ``score`` of a unit on region ``box`` (xyxy) of ``image_id``."""

    score: float
    image_id: str
    box: tuple[float, float, float, float]


def top_activations(
    records: Sequence[ImageRecord],
    features: Callable[[ImageRecord], tuple[np.ndarray, np.ndarray]],
    units: Sequence[Unit],
    k: int = TOP_K,
    nms_iou: float = UNIT_NMS_IOU,
    progress: ProgressFn | None = None,
) -> dict[Unit, list[Hit]]:
    """The ``k`` highest activations of each unit over all regions of ``records``, after
    NMS within each image. ``features(record) -> (boxes (N,4), pool5 feats (N,D))`` is
    called once per image; only ``k`` hits per unit are held, so memory does not grow
    with the dataset."""
    heaps: dict[Unit, list[Hit]] = {u: [] for u in units}
    cols = np.array([u.index for u in units], np.int64)
    for r in tracked(records, progress, f"top activations of {len(units)} units"):
        boxes, feats = features(r)
        if len(boxes) == 0:
            continue
        if feats.shape[1] <= cols.max():
            raise ValueError(f"unit index {int(cols.max())} is outside the {feats.shape[1]}-dimensional pool5 features")
        acts = np.asarray(feats[:, cols], np.float32)
        for j, u in enumerate(units):
            a = acts[:, j]
            heap = heaps[u]
            floor = heap[0].score if len(heap) >= k else -math.inf
            cand = np.nonzero(a > floor)[0]
            if len(cand) == 0:
                continue
            keep = cand[np.asarray(nms(boxes[cand], a[cand], nms_iou), np.int64)][:k]
            for q in keep:
                h = Hit(float(a[q]), r.image_id, tuple(float(v) for v in boxes[q]))
                if len(heap) < k:
                    heapq.heappush(heap, h)
                elif h.score > heap[0].score:
                    heapq.heapreplace(heap, h)
    return {u: sorted(h, key=lambda z: -z.score) for u, h in heaps.items()}


def backbone_units_by_max(
    records: Iterable[ImageRecord], features: Callable[[ImageRecord], tuple[np.ndarray, np.ndarray]],
    grid: int, n: int = 6,
) -> list[Unit]:
    """``--units auto`` without a model: the ``n`` units (of distinct channels) whose
    maximum activation over the split is largest (one streamed pass)."""
    best: np.ndarray | None = None
    for r in records:
        _, feats = features(r)
        if len(feats):
            m = np.asarray(feats, np.float32).max(0)
            best = m if best is None else np.maximum(best, m)
    if best is None:
        return []
    out, seen = [], set()
    for idx in np.argsort(-best):
        u = Unit.from_index(int(idx), grid, "max activation")
        if u.channel not in seen:
            out.append(u)
            seen.add(u.channel)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------ drawing


def unit_grid(
    hits: Sequence[Hit],
    records_by_id: dict[str, ImageRecord],
    rf_box: np.ndarray,
    input_size: int,
    warp: Callable[[np.ndarray, np.ndarray], np.ndarray],
    tile: int = 96,
    cols: int = 8,
    title: str = "",
) -> np.ndarray:
    """A grid of the regions in ``hits``, each warped as the network saw it
    (``warp(image, boxes) -> (N,S,S,3)``), with the receptive field ``rf_box`` (in the S² input)
    drawn in white and the activation in its upper-left corner. Returns RGB uint8."""
    from PIL import Image, ImageDraw

    from rcnn.visualize import label_font

    n = max(len(hits), 1)
    rows = math.ceil(n / cols)
    head = 18 if title else 0
    canvas = Image.new("RGB", (cols * tile, rows * tile + head), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = label_font(11)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    cache: dict[str, np.ndarray] = {}
    rf = rf_in_crop(rf_box, input_size, tile)
    for i, h in enumerate(hits):
        if h.image_id not in cache:
            cache.clear()  # hits of one image are often adjacent; hold one image at a time
            cache[h.image_id] = load_image(records_by_id[h.image_id].path)
        crop = warp(cache[h.image_id], np.array([h.box], np.float32))[0]
        im = Image.fromarray(crop).resize((tile, tile), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        d.rectangle([rf[0], rf[1], rf[2] - 1, rf[3] - 1], outline=(255, 255, 255), width=2)
        txt = f"{h.score:.1f}"
        tb = d.textbbox((rf[0] + 2, rf[1] + 1), txt, font=font)
        d.rectangle(tb, fill=(0, 0, 0))
        d.text((rf[0] + 2, rf[1] + 1), txt, fill=(255, 255, 255), font=font)
        canvas.paste(im, ((i % cols) * tile, head + (i // cols) * tile))
    if not hits:
        draw.text((4, head + 4), "no regions", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def units_figure(grids: Sequence[tuple[str, np.ndarray]], path, title: str = "Top activations of pool5 units"):
    """Stack per-unit grids (from :func:`unit_grid`, each headed by its unit label) into
    one PNG figure with a title, an axis caption and a legend. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    imgs = [g for _, g in grids] or [np.full((40, 200, 3), 255, np.uint8)]
    w = max(g.shape[1] for g in imgs)
    gap = np.full((8, w, 3), 255, np.uint8)
    parts = []
    for g in imgs:
        if g.shape[1] < w:
            g = np.concatenate([g, np.full((g.shape[0], w - g.shape[1], 3), 255, np.uint8)], 1)
        parts += [g, gap]
    stack = np.concatenate(parts[:-1], 0)
    h = stack.shape[0]
    fig_h = h / 80 + 1.2
    fig, ax = plt.subplots(figsize=(max(w / 80, 6.0), fig_h))
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.75 / fig_h, bottom=0.4 / fig_h)  # no band between title and grid
    ax.imshow(stack)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    ax.set_xlabel("units labelled (y, x, channel); regions in decreasing activation (left to right, top to bottom), "
                  "NMS within each image", fontsize=8)
    ax.legend(handles=[Patch(facecolor="none", edgecolor="0.4", label="receptive field (white box)"),
                       Patch(facecolor="black", label="activation value")],
              loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------ end to end


def pool5_source(feature_config, proposal_config, dataset_root, cache: bool = False):
    """``features(record) -> (boxes, pool5 feats)`` for ``feature_config`` with its layer set
    to pool5. Reads the feature cache when the image's pool5 entry exists (or ``cache``
    asks to fill it); otherwise computes the features and discards them, because pool5
    of every proposal is large (SqueezeNet: 18432 values per region)."""
    from dataclasses import replace

    from rcnn.features import extract_features, feature_path, get_features
    from rcnn.proposals import get_proposals

    fc = replace(feature_config, layer="pool5")
    bb = fc.backbone_obj()

    def features(record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        if cache or feature_path(record, proposal_config, fc, dataset_root).is_file():
            return get_features(record, proposal_config, fc, dataset_root)
        boxes = np.asarray(get_proposals(record, proposal_config, dataset_root), np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return boxes, np.zeros((0, bb.dim("pool5", fc.grid)), np.float16)
        feats = extract_features(load_image(record.path), boxes, bb, "pool5", **fc.extract_options())
        return boxes, np.asarray(feats, np.float16)

    return fc, bb, features


def cell_rf(backbone, feature_config, unit: Unit) -> np.ndarray:
    """Receptive field of ``unit`` in the warped input: from the layers in warp mode; in
    shared mode a pool5 cell is a RoI bin, so its bin of the box is shown."""
    s = backbone.input_size
    if feature_config.mode == "shared":
        g = unit.grid
        return np.array([unit.x * s / g, unit.y * s / g, (unit.x + 1) * s / g, (unit.y + 1) * s / g], np.float32)
    return receptive_fields(backbone, unit.grid)[unit.y, unit.x]


def render_units(
    records: Sequence[ImageRecord],
    features: Callable[[ImageRecord], tuple[np.ndarray, np.ndarray]],
    units: Sequence[Unit],
    backbone,
    feature_config,
    out_path,
    k: int = TOP_K,
    nms_iou: float = UNIT_NMS_IOU,
    progress: ProgressFn | None = None,
    title: str = "Top activations of pool5 units",
) -> tuple[Path, dict[Unit, list[Hit]]]:
    """Top ``k`` regions of each unit over ``records`` drawn as one PNG figure (paper Figure 3)."""
    from rcnn.features import warp_regions

    top = top_activations(records, features, units, k, nms_iou, progress)
    by_id = {r.image_id: r for r in records}
    fc = feature_config

    def warp(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        return warp_regions(image, boxes, backbone.input_size, context_pad=fc.context_pad, method=fc.method,
                            fill=backbone.mean_rgb(), interpolation=backbone.interpolation)

    grids = [(u.label(), unit_grid(top[u], by_id, cell_rf(backbone, fc, u), backbone.input_size, warp, cols=min(k, 8),
                                   title=u.label()))
             for u in units]
    return Path(units_figure(grids, out_path, title)), top


class UnitsError(ValueError):
    """A units spec that cannot be drawn: unparsable, or units outside the network's pool5."""


def feature_settings(model_or_backbone: str, weights: str | None = None, mode: str | None = None):
    """``(FeatureConfig, ProposalConfig, model or None)`` of a model file (its features, ``mode``
    overriding its mode) or of a backbone name (``mode`` default warp, the paper's).
    ``ValueError`` (one line) for a HOG model, a path that is not a model, an unknown backbone."""
    from dataclasses import replace

    from rcnn.analysis.detections import is_model
    from rcnn.detect import RCNNModel
    from rcnn.features import FeatureConfig
    from rcnn.proposals import ProposalConfig
    from rcnn.sources import HOG_BACKBONE, CNNFeatures

    p = Path(model_or_backbone)
    if is_model(p):
        model = RCNNModel.load(p)
        if model.backbone == HOG_BACKBONE:
            raise ValueError(f"{p}: a HOG model has no CNN units to visualise")
        fc = CNNFeatures.from_options(model.proposal_config(), model.feature_options).feature_config
        if mode:
            fc = replace(fc, mode=mode)
        return fc, model.proposal_config(), model
    if p.exists():
        raise ValueError(f"{p}: not a model file (a folder or a detections file; expected e.g. .rcnn)")
    try:
        fc = FeatureConfig(backbone=model_or_backbone, weights=weights, mode=mode or "warp")
        fc.backbone_obj()
    except Exception as e:
        raise ValueError(f"{model_or_backbone}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return fc, ProposalConfig(), None


def run_units(model_or_backbone: str, ds, units_spec: str, out_path, top: int = TOP_K, max_images: int | None = None,
              weights: str | None = None, mode: str | None = None, cache: bool = False,
              progress: ProgressFn | None = None) -> tuple[Path, list[Unit], dict[Unit, list[Hit]]]:
    """Top-``top`` activation grids of pool5 units over the first ``max_images`` images of ``ds``
    (all if None) as one PNG at ``out_path`` (``rcnn units``, ``rcnn report``). ``units_spec``:
    ``"auto"`` (a model's highest-weighted units, a backbone's most active ones) or
    :func:`parse_units`' format. Returns (PNG path, units, hits); :class:`UnitsError` for a bad
    spec, ``ValueError`` for unusable settings (:func:`feature_settings`)."""
    fc, pc, model = feature_settings(model_or_backbone, weights, mode)
    fc, bb, features = pool5_source(fc, pc, ds.root, cache)
    recs = ds.records[:max_images] if max_images else ds.records
    grid = fc.grid
    if units_spec == "auto":
        if model is not None:
            units = auto_units(model, bb, grid)
        else:
            units = backbone_units_by_max(tracked(recs, progress, "finding the most active units"), features, grid)
    else:
        try:
            units = parse_units(units_spec, grid)
        except ValueError as e:
            raise UnitsError(str(e)) from None
    channels = bb.dim("pool5", grid) // (grid * grid)
    bad = [u.label() for u in units if u.channel >= channels]
    if bad:
        raise UnitsError(f"{bad} outside the {channels} channels of {bb.name}'s pool5")
    path, hits = render_units(recs, features, units, bb, fc, out_path, k=top, progress=progress,
                              title=f"Top activations of pool5 units — {bb.name}, {fc.mode} mode, {len(recs)} images")
    return path, units, hits
