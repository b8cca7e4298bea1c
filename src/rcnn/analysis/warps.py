"""Warped training samples (paper Figure 2): random regions of one class, exactly as the
feature extractor sees them — cropped and warped by :func:`rcnn.features.warp_regions`
with the backbone's input size, context padding, crop method, mean fill and
interpolation — after warping and before normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rcnn.boxes import box_iou
from rcnn.data import Dataset, ImageRecord, load_image


def sample_regions(
    dataset: Dataset,
    class_name: str,
    n: int = 32,
    seed: int = 0,
    proposal_config=None,
    min_iou: float = 0.5,
) -> list[tuple[ImageRecord, np.ndarray]]:
    """``n`` random training regions of ``class_name``: its non-difficult ground-truth boxes
    (the SVM positives, paper §2.3) and, with ``proposal_config``, also the proposals with
    IoU >= ``min_iou`` to one of them (the fine-tuning positives, paper §2.3)."""
    if class_name not in dataset.classes:
        raise ValueError(f"class {class_name!r} is not in the dataset; its classes are {dataset.classes}")
    c = dataset.classes.index(class_name)
    pool: list[tuple[ImageRecord, np.ndarray]] = []
    for r in dataset.records:
        sel = (r.labels == c) & ~r.difficult
        gt = r.boxes[sel]
        pool += [(r, b) for b in gt]
    rng = np.random.default_rng(seed)
    if proposal_config is not None and pool:
        from rcnn.proposals import get_proposals

        # proposals only from a bounded random sample of images: warps are for looking at
        ids = {id(r): r for r, _ in pool}
        recs = list(ids.values())
        pick = rng.permutation(len(recs))[: max(1, min(len(recs), n // 2))]
        for k in pick:
            r = recs[int(k)]
            props = get_proposals(r, proposal_config, dataset.root)
            gt = r.boxes[(r.labels == c) & ~r.difficult]
            if len(props) and len(gt):
                ok = box_iou(props.astype(np.float32), gt.astype(np.float32)).max(1) >= min_iou
                pool += [(r, b) for b in props[ok]]
    if not pool:
        raise ValueError(f"class {class_name!r} has no (non-difficult) objects in this split")
    idx = rng.permutation(len(pool))[:n]
    return [pool[int(i)] for i in sorted(idx, key=lambda i: (pool[int(i)][0].image_id, int(i)))]


def warp_samples(
    samples: Sequence[tuple[ImageRecord, np.ndarray]],
    size: int,
    context_pad: int = 0,
    method: str = "warp",
    fill: Sequence[int] = (0, 0, 0),
    interpolation: str = "bilinear",
) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 crops of ``samples`` (one image read per distinct image)."""
    from rcnn.features import warp_regions

    out = np.zeros((len(samples), size, size, 3), np.uint8)
    by_image: dict[str, list[int]] = {}
    for i, (r, _) in enumerate(samples):
        by_image.setdefault(r.image_id, []).append(i)
    for idx in by_image.values():
        r = samples[idx[0]][0]
        image = load_image(r.path)
        boxes = np.array([samples[i][1] for i in idx], np.float32)
        out[idx] = warp_regions(image, boxes, size, context_pad=context_pad, method=method, fill=fill,
                                interpolation=interpolation)
    return out


def tile(crops: np.ndarray, cols: int = 8, pad: int = 2, tile_size: int | None = None) -> np.ndarray:
    """Arrange ``(N,S,S,3)`` crops in a grid (white padding); optional resize to ``tile_size``."""
    import cv2

    n = len(crops)
    if n == 0:
        return np.full((16, 16, 3), 255, np.uint8)
    s = tile_size or crops.shape[1]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    out = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad, 3), 255, np.uint8)
    for i, c in enumerate(crops):
        if c.shape[0] != s:
            c = cv2.resize(c, (s, s), interpolation=cv2.INTER_AREA)
        y, x = divmod(i, cols)
        out[pad + y * (s + pad) : pad + y * (s + pad) + s, pad + x * (s + pad) : pad + x * (s + pad) + s] = c
    return out


def warps_figure(crops: np.ndarray, path, title: str, caption: str, cols: int = 8, tile_size: int = 96):
    """Save the grid as a PNG figure with a title and a caption (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    grid = tile(crops, cols, tile_size=tile_size)
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(w / 80 + 0.4, h / 80 + 1.0))
    ax.imshow(grid)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(caption, fontsize=8)
    ax.legend(handles=[Patch(facecolor="none", edgecolor="none", label=f"{len(crops)} regions")], loc="upper right",
              bbox_to_anchor=(1.0, -0.02), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def show_warps(dataset: Dataset, class_name: str, n: int, seed: int, feature_config, proposal_config, path) -> str:
    """``rcnn show-warps``: :func:`sample_regions` of ``class_name`` (with proposals when
    ``proposal_config`` is given) warped as ``feature_config``'s extractor warps them, drawn
    as one PNG at ``path``; returns the figure's caption."""
    bb = feature_config.backbone_obj()
    samples = sample_regions(dataset, class_name, n, seed, proposal_config)
    crops = warp_samples(samples, bb.input_size, feature_config.context_pad, feature_config.method, bb.mean_rgb(),
                         bb.interpolation)
    caption = (f"{len(crops)} random {'ground-truth' if proposal_config is None else 'ground-truth and proposal'} "
               f"regions from {len({r.image_id for r, _ in samples})} images, {feature_config.method} to "
               f"{bb.input_size}×{bb.input_size}, context {feature_config.context_pad} px ({bb.name})")
    warps_figure(crops, path, f"Warped training samples: {class_name}", caption)
    return caption
