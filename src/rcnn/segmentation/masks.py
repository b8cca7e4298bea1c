"""Ground-truth masks: instance masks (Penn-Fudan), VOC ``SegmentationClass/`` label maps,
and the coloured rendering of label maps.

Label maps are ``(H,W)`` uint8: 0 = background, ``c+1`` = ``Dataset.classes[c]``, 255 =
void (VOC's boundary band; ignored by evaluation and training).

Rules for bad input (one line naming the file, never a crash mid-run):

* a mask whose size differs from its image raises :class:`MaskError` (callers working
  over a dataset skip that image and report it);
* a pixel value that names no annotated object (instance masks) or no class (class
  masks, other than 255) is treated as **void** (255) and reported once per file;
* an image without any instance is all background (a valid, all-negative example);
* an annotated instance with no pixels in the mask has no ground-truth mask and is
  skipped by mask recall (reported).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rcnn.data import IMAGE_SUFFIXES, Dataset, ImageRecord, load_image

VOID = 255


class MaskError(ValueError):
    """A mask file that cannot be used; the message is one line naming the file."""


class MaskWarning(UserWarning):
    """A mask file that was used under one of the module's documented rules."""


def read_mask_png(path: str | Path) -> np.ndarray:
    """Raw ``(H,W)`` integer values of a mask PNG (palette indices, not colours)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16", "1"):
                raise MaskError(f"{path}: mask must be a palette or grayscale PNG, got mode {im.mode}")
            return np.asarray(im).astype(np.int64)
    except MaskError:
        raise
    except FileNotFoundError:
        raise MaskError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MaskError(f"{path}: unreadable mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _check_size(mask: np.ndarray, record: ImageRecord, path: Path) -> None:
    if mask.shape != (record.height, record.width):
        raise MaskError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {record.image_id} "
            f"is {record.width}x{record.height}"
        )


def instance_masks(record: ImageRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-object masks of a record with an instance mask PNG.

    Returns ``masks`` (N,H,W) bool (one per annotated object, ``record.mask_ids`` order),
    ``labels`` (N,) int64 class indices and ``void`` (H,W) bool: pixels whose value names
    no annotated object. A record without a mask file raises :class:`MaskError`.
    """
    if record.mask_path is None or record.mask_ids is None:
        raise MaskError(f"{record.path}: no instance mask for image {record.image_id}")
    path = Path(record.mask_path)
    raw = read_mask_png(path)
    _check_size(raw, record, path)
    ids = np.asarray(record.mask_ids, np.int64)
    masks = raw[None] == ids[:, None, None] if len(ids) else np.zeros((0, *raw.shape), bool)
    void = (raw != 0) & ~np.isin(raw, ids)
    if void.any():
        bad = sorted(set(np.unique(raw[void]).tolist()))
        warnings.warn(f"{path}: values {bad} name no annotated object (treated as void)", MaskWarning, stacklevel=2)
    return masks, np.asarray(record.labels, np.int64), void


def class_label_map(record: ImageRecord, num_classes: int) -> np.ndarray:
    """``(H,W)`` uint8 semantic label map of a record (0 background, c+1 class c, 255 void).

    Instance masks are painted with their object's class; a VOC ``SegmentationClass``
    record (see :func:`read_voc_segmentation`) is read directly.
    """
    path = Path(record.mask_path) if record.mask_path is not None else None
    if path is None:
        raise MaskError(f"{record.path}: no mask for image {record.image_id}")
    if record.mask_ids is None:  # class-valued label map (VOC SegmentationClass)
        raw = read_mask_png(path)
        _check_size(raw, record, path)
        bad = (raw > num_classes) & (raw != VOID)
        if bad.any():
            vals = sorted(set(np.unique(raw[bad]).tolist()))
            warnings.warn(f"{path}: values {vals} name no class (treated as void)", MaskWarning, stacklevel=2)
        out = raw.copy()
        out[bad] = VOID
        return out.astype(np.uint8)
    masks, labels, void = instance_masks(record)
    out = np.zeros((record.height, record.width), np.uint8)
    for m, c in zip(masks, labels, strict=True):
        out[m] = int(c) + 1
    out[void] = VOID
    return out


def class_masks(record: ImageRecord, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth regions for training/recall: instance masks when the record has them,
    else one mask per class present in its label map. Returns (N,H,W) bool, (N,) labels;
    objects with no pixels are left out."""
    if record.mask_ids is not None:
        masks, labels, _ = instance_masks(record)
    else:
        lm = class_label_map(record, num_classes)
        present = [c for c in range(1, num_classes + 1) if (lm == c).any()]
        masks = np.stack([lm == c for c in present]) if present else np.zeros((0, *lm.shape), bool)
        labels = np.array([c - 1 for c in present], np.int64)
    keep = masks.any(axis=(1, 2))
    return masks[keep], labels[keep]


# ------------------------------------------------------------------ VOC segmentation


def images_and_masks(dataset: Dataset, limit: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The RGB uint8 images of ``dataset`` (its first ``limit`` records; 0 = all) and each one's
    ``(G,H,W)`` bool object masks (:func:`class_masks`, any class): what the mask ranker and the
    mask head learn from. Raises :class:`MaskError` / ``ImageReadError`` naming the file."""
    recs = dataset.records[:limit] if limit else dataset.records
    return [load_image(r.path) for r in recs], [class_masks(r, len(dataset.classes))[0] for r in recs]


def read_voc_segmentation(root: str | Path, split: str, classes: list[str] | None = None) -> Dataset:
    """Read a VOC2012-style segmentation layout: ``ImageSets/Segmentation/<split>.txt``,
    ``JPEGImages/``, ``SegmentationClass/<id>.png`` (palette indices: 0 background, 1..20
    the VOC classes, 255 void). Records carry ``mask_path`` and ``mask_ids=None`` (the
    PNG holds class indices, not instance ids). Boxes come from ``Annotations/`` when
    present (else empty). Images whose PNG is missing are dropped and reported."""
    from rcnn.data import VOC_CLASSES, AnnotationIssue, image_size, read_voc

    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: no such segmentation split file")
    ids = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
    classes = list(classes or VOC_CLASSES)
    boxes_by_id = {}
    if (root / "Annotations").is_dir():
        det = read_voc(root, None, classes)
        boxes_by_id = {r.image_id: r for r in det.records}
    records, issues = [], []
    for image_id in ids:
        png = root / "SegmentationClass" / f"{image_id}.png"
        img = next((root / "JPEGImages" / f"{image_id}{s}" for s in IMAGE_SUFFIXES
                    if (root / "JPEGImages" / f"{image_id}{s}").is_file()), None)
        if not png.is_file() or img is None:
            issues.append(AnnotationIssue(str(png), "segmentation PNG or image missing", "dropped image"))
            continue
        det_rec = boxes_by_id.get(image_id)
        w, h = (det_rec.width, det_rec.height) if det_rec else image_size(img)
        records.append(ImageRecord(
            image_id=image_id, path=img, width=w, height=h,
            boxes=det_rec.boxes if det_rec else np.zeros((0, 4), np.float32),
            labels=det_rec.labels if det_rec else np.zeros(0, np.int64),
            difficult=det_rec.difficult if det_rec else np.zeros(0, bool),
            mask_path=png, mask_ids=None,
        ))
    return Dataset(root, split, classes, records, issues, "voc-segmentation", 0)


def load_segmentation_dataset(path: str | Path, split: str | None = None) -> Dataset:
    """A dataset with masks: VOC ``SegmentationClass/`` when the folder has it, else
    :func:`rcnn.data.load_dataset` (Penn-Fudan's instance masks)."""
    from rcnn.data import load_dataset

    path = Path(path)
    if (path / "SegmentationClass").is_dir() and (path / "ImageSets" / "Segmentation").is_dir():
        return read_voc_segmentation(path, split or "val")
    ds = load_dataset(path, split)
    missing = [r.image_id for r in ds.records if r.mask_path is None]
    if len(missing) == len(ds.records):
        raise ValueError(f"{path}: no masks (expected SegmentationClass/ PNGs or instance masks)")
    return ds


# ----------------------------------------------------------------------- rendering


def voc_palette(n: int = 256) -> np.ndarray:
    """(n,3) uint8 the PASCAL VOC colour map (bit-interleaved), index 255 = void."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def colorize(label_map: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 VOC colours of an (H,W) uint8 label map."""
    return voc_palette()[np.asarray(label_map, np.uint8)]


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H,W,3) uint8 image with non-background labels blended in their VOC colour."""
    col = colorize(label_map).astype(np.float32)
    img = np.asarray(image, np.float32)
    fg = (np.asarray(label_map) != 0)[..., None]
    out = np.where(fg, (1 - alpha) * img + alpha * col, img)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_label_png(label_map: np.ndarray, path: str | Path) -> Path:
    """Write a label map as a VOC-style palette PNG (values kept as indices)."""
    from rcnn.cache import atomic_write

    im = Image.fromarray(np.asarray(label_map, np.uint8), mode="P")
    im.putpalette(voc_palette().ravel().tolist())
    return atomic_write(Path(path), lambda tmp: im.save(tmp, format="PNG"))


