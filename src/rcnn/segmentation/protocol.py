"""The segmentation protocol of paper §4 as whole-dataset steps (the ``rcnn segment-*`` commands):
mask-proposal recall, training with the pasting threshold chosen, evaluation, labelling image files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rcnn.cache import save_json
from rcnn.data import Dataset, ImageReadError, list_images, load_image
from rcnn.progress import ProgressFn, tracked
from rcnn.segmentation.features import RegionFeatureConfig
from rcnn.segmentation.masks import MaskError, class_masks, overlay, save_label_png
from rcnn.segmentation.model import (
    SegmentationModel,
    choose_threshold,
    choose_threshold_pooled,
    evaluate_segmenter,
    out_of_fold_items,
    prepare_dataset,
    segment_image,
    train_segmenter,
)
from rcnn.segmentation.regions import MaskProposalConfig, get_mask_proposals, mask_recall


def mask_proposal_recall(ds: Dataset, config: MaskProposalConfig, problems: list[str],
                         progress: ProgressFn | None = None) -> dict[str, float]:
    """Mask proposals of every image (cached) and their recall: the best region IoU per
    ground-truth instance (:func:`mask_recall`) plus ``regions_per_image``. Images whose mask or
    image cannot be read, or whose sizes differ, are skipped with one line in ``problems``."""
    best, nreg = [], []
    for r in tracked(ds.records, progress, "mask proposals"):
        try:
            regions = get_mask_proposals(r.path, config)
            gt, _ = class_masks(r, len(ds.classes))
        except (MaskError, ImageReadError) as e:
            problems.append(str(e))
            continue
        if regions.shape != (gt.shape[1], gt.shape[2]) and len(gt):
            problems.append(f"{r.path}: image size differs from its mask (image skipped)")
            continue
        nreg.append(len(regions))
        iou = regions.iou(gt)
        best += (iou.max(0) if len(iou) else np.zeros(len(gt))).tolist()
    s = mask_recall(best)
    s["regions_per_image"] = float(np.mean(nreg)) if nreg else 0.0
    return s


def fit_segmenter(train_ds: Dataset, val_ds: Dataset, strategy: str, layer: str, C: float,
                  feature_config: RegionFeatureConfig, mask_config: MaskProposalConfig, train_regions: int,
                  full_weight: float = 1.0, threshold_on: str = "pooled", problems: list[str] | None = None,
                  progress: ProgressFn | None = None) -> tuple[SegmentationModel | None, int]:
    """Train the per-class SVRs on ``train_ds`` (its top ``train_regions`` regions per image plus
    the ground-truth masks) and choose the pasting threshold: on ``val_ds`` plus the training
    images' 4-fold out-of-fold scores (``threshold_on="pooled"``, with at least 4 training images)
    or on ``val_ds`` alone (threshold 0 without val images). Unusable images are skipped with one
    line in ``problems``. Returns (model, usable val images); (None, 0) without a usable training image."""
    train = prepare_dataset(train_ds, mask_config, feature_config, train_regions, with_gt=True, progress=progress,
                            problems=problems)
    val = prepare_dataset(val_ds, mask_config, feature_config, progress=progress, problems=problems)
    if not train:
        return None, 0
    model = train_segmenter(train, train_ds.classes, strategy, layer, C=C, mask_config=mask_config,
                            feature_config=feature_config, full_weight=full_weight)
    if threshold_on == "pooled" and len(train) >= 4:
        oof = out_of_fold_items(train, train_ds.classes, strategy, layer, C, folds=4, full_weight=full_weight)
        model.threshold, table = choose_threshold_pooled(model, val, oof)
        model.info["val_mean_iou"] = table[model.threshold]
        model.info["threshold_on"] = f"pooled: {len(val)} val + {len(oof)} out-of-fold training images"
    elif val:
        model.threshold, table = choose_threshold(model, val)
        model.info["val_mean_iou"] = table[model.threshold]
    return model, len(val)


def evaluate_split(model: SegmentationModel, ds: Dataset, problems: list[str], overlays: Path | None = None,
                   json_path: Path | None = None, progress: ProgressFn | None = None) -> tuple[dict | None, int]:
    """The VOC segmentation measure of ``model`` on ``ds`` (:func:`evaluate_segmenter`), with a
    predicted-label overlay PNG per image in ``overlays`` and the result (plus split, images and
    the skipped images' lines) as JSON at ``json_path`` when given. ``ValueError`` if the classes
    differ from the model's. Returns (result, images); (None, 0) without a usable image."""
    from rcnn.visualize import save_png

    if list(ds.classes) != list(model.classes):
        raise ValueError(f"model classes {model.classes} differ from the dataset's {ds.classes}")
    items = prepare_dataset(ds, model.mask_config, model.feature_config, progress=progress, problems=problems)
    if not items:
        return None, 0
    res = evaluate_segmenter(model, items)
    if overlays:
        for it in items:
            save_png(overlays / f"{it.record.image_id}_overlay.png",
                     overlay(load_image(it.record.path), model.predict(it.regions, it.feats)))
    if json_path:
        save_json(json_path, {**res, "split": ds.split, "images": len(items), "skipped": problems})
    return res, len(items)


def image_files(paths: Sequence[Path]) -> list[Path]:
    """Image files of ``paths`` (folders listed by :func:`rcnn.data.list_images`);
    ``FileNotFoundError`` (one line) for a path that does not exist."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += list_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def segment_files(model: SegmentationModel, files: Sequence[Path], out_dir: Path,
                  on_image: Callable[[Path, dict[str, float]], None], on_skip: Callable[[str], None],
                  progress: ProgressFn | None = None) -> int:
    """Label the pixels of image files: ``<stem>_labels.png`` (VOC palette) and
    ``<stem>_overlay.png`` in ``out_dir``; ``on_image(path, {class: fraction of the pixels}))``
    after each, ``on_skip(message)`` for an unreadable file. Returns how many were skipped."""
    from rcnn.visualize import save_png

    failed = 0
    for f in tracked(files, progress, "segmenting"):
        try:
            img = load_image(f)
        except ImageReadError as e:
            on_skip(str(e))
            failed += 1
            continue
        lm = segment_image(model, img)
        save_label_png(lm, out_dir / f"{f.stem}_labels.png")
        save_png(out_dir / f"{f.stem}_overlay.png", overlay(img, lm))
        on_image(f, {model.classes[c - 1]: float((lm == c).mean()) for c in np.unique(lm) if c != 0})
    return failed
