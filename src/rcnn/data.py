"""Datasets as plain records, and robust image loading.

Readers for the PASCAL VOC devkit layout (XML, via ``defusedxml``), the older PASCAL
"Annotation Version 1.00" text format (Penn-Fudan), COCO JSON and YOLO text labels
(``data.yaml`` via ``yaml.safe_load``). Every reader returns
a :class:`Dataset` of :class:`ImageRecord` with boxes as ``(N,4)`` float32 pixel-edge
``xyxy`` (see :mod:`rcnn.boxes`); file conventions are converted here and nowhere else.

Annotation problems never crash a reader. The rule, applied to every format:

* a box with ``xmax <= xmin`` or ``ymax <= ymin`` *in the file's own coordinates*
  (zero or negative extent) is **dropped**;
* a box reaching outside the image is **clipped** to it; one entirely outside is dropped;
* an object of a class outside the dataset's class list is **dropped**, as is a
  malformed line of a text format (YOLO);
* an annotation file that cannot be parsed (malformed or hostile XML, bad JSON, missing
  image) drops **that image**, as does an id a split file lists without its files;
* an image without a label file (YOLO) is kept with no objects; a label file without an
  image is ignored.

Each case is recorded as an :class:`AnnotationIssue` naming the file, so counts never
change silently (``rcnn info`` lists them).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import parse as defused_parse
from PIL import Image, ImageOps, UnidentifiedImageError

from rcnn.boxes import voc_to_xyxy, xywh_to_xyxy, xyxy_to_voc

log = logging.getLogger(__name__)


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once per process: a truncated image that several
    stages load (proposals, features, drawing) warns once, not once per stage. Bounded."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self._seen: set[str] = set()
        self._limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self._seen:
            return False
        if len(self._seen) < self._limit:
            self._seen.add(msg)
        return True


log.addFilter(_OncePerMessage())

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

#: Largest image accepted by :func:`load_image` (pixels). Larger files are refused as
#: possible decompression bombs; pass ``max_pixels`` to raise the limit deliberately.
MAX_IMAGE_PIXELS = 12_000 * 12_000

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """An image file that cannot be used; the message is one line naming the file."""


class AnnotationError(ValueError):
    """An annotation file that cannot be parsed; the message names the file."""


@dataclass
class ImageRecord:
    """One annotated image. Boxes ``(N,4)`` float32 pixel-edge xyxy; ``labels`` index
    ``Dataset.classes``; ``difficult`` ``(N,)`` bool. Optional per-object fields are
    ``None`` when the format does not carry them. ``mask_ids[k]`` is the value of object
    ``k`` in the instance mask PNG at ``mask_path``."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray | None = None
    occluded: np.ndarray | None = None
    pose: list[str] | None = None
    mask_path: Path | None = None
    mask_ids: np.ndarray | None = None
    source_id: str | None = None  # e.g. VOC <source><flickrid>, COCO flickr_url


@dataclass
class AnnotationIssue:
    """A problem found while reading annotations: what was done about it, and where."""

    file: str
    problem: str
    action: str  # "dropped box", "clipped box", "dropped object", "dropped image"

    def __str__(self) -> str:
        return f"{self.file}: {self.problem} ({self.action})"


@dataclass
class Dataset:
    """Records of one split plus the class list they index and the issues met."""

    root: Path
    split: str | None
    classes: list[str]
    records: list[ImageRecord]
    issues: list[AnnotationIssue] = field(default_factory=list)
    format: str = "voc"
    annotated_objects: int = 0  # objects in the files, before any drop
    category_ids: list[int] | None = None  # COCO category id per class (COCO input only)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def num_objects(self) -> int:
        return int(sum(len(r.boxes) for r in self.records))


# ----------------------------------------------------------------------------- images


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` RGB uint8 array.

    Applies the EXIF orientation; converts grayscale, palette, CMYK, alpha (composited on
    white) and 16-bit/float images. A JPEG missing its end (an interrupted copy) is decoded
    as far as its data goes, the missing rows grey, with one warning naming the file (see
    :func:`decode_truncated_jpeg`). Raises :class:`ImageReadError` with one line naming the
    file for non-images, files with no decodable image data and images over ``max_pixels``.
    """
    path = Path(path)
    with image_errors(path), Image.open(path) as im:
        if im.width * im.height > max_pixels:
            raise ImageReadError(
                f"{path}: image is {im.width}x{im.height} pixels, over the "
                f"{max_pixels}-pixel limit (possible decompression bomb)"
            )
        try:
            im.load()
        except OSError:
            if im.format != "JPEG":
                raise
            data = path.read_bytes()
            if data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                raise  # the file has its end marker: corrupt, not truncated
            im = decode_truncated_jpeg(data, path)
            log.warning("%s: truncated JPEG (%d bytes, no end marker); decoded the readable part, "
                        "the missing rows are grey", path, len(data))
        im = ImageOps.exif_transpose(im)
        return to_rgb8(im)


def decode_truncated_jpeg(data: bytes, path: str | Path = "<bytes>") -> Image.Image:
    """Decode the JPEG bytes ``data`` that stop before the end-of-image marker.

    This is what PIL does under its global ``ImageFile.LOAD_TRUNCATED_IMAGES`` flag
    (``JpegImageFile.load_read`` feeds libjpeg an EOI marker at the premature end), done
    for this call only: libjpeg then finishes the frame and fills the rows it has no data
    for with grey. Raises :class:`ImageReadError` when the data stops before the first
    scan's entropy-coded bytes (nothing of the image is there).
    """
    sos = data.find(b"\xff\xda")
    if sos < 0 or len(data) <= sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big"):
        raise ImageReadError(f"{path}: truncated JPEG with no image data (nothing to decode)")
    im = Image.open(io.BytesIO(data + b"\xff\xd9"))
    im.load()
    return im


@contextmanager
def image_errors(path: str | Path):
    """Turn whatever PIL raises while reading ``path`` into one-line :class:`ImageReadError`."""
    try:
        yield
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"{path}: corrupt or truncated image ({msg})") from None


def to_rgb8(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode as ``(H, W, 3)`` RGB uint8 (16-bit/float scaled, alpha on white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F":
            lo, hi = float(a.min()), float(a.max()) or 1.0
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            a = a / hi * 255.0
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file after EXIF orientation, reading only the header."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orient = im.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ImageReadError(f"{path}: cannot read image header ({e})") from None
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by suffix) directly inside ``folder``, sorted by name."""
    return sorted(
        p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


# ------------------------------------------------------------------------- box rules


def _sanitize(
    raw: np.ndarray, width: int, height: int, file: str, issues: list[AnnotationIssue]
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the module's box rule to library-coordinate boxes ``raw`` (N,4) whose
    file-coordinate extent was already checked. Returns (boxes, keep mask)."""
    keep = np.ones(len(raw), dtype=bool)
    out = raw.astype(np.float32).copy()
    for i, b in enumerate(raw):
        x1, y1, x2, y2 = (float(v) for v in b)
        if x2 <= x1 or y2 <= y1:
            keep[i] = False
            issues.append(AnnotationIssue(file, f"degenerate box xyxy={_fmt(b)} (zero or negative extent)", "dropped box"))
            continue
        c = np.array([max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)], np.float32)
        if c[2] <= c[0] or c[3] <= c[1]:
            keep[i] = False
            issues.append(AnnotationIssue(file, f"box xyxy={_fmt(b)} outside the {width}x{height} image", "dropped box"))
        elif not np.array_equal(c, out[i]):
            issues.append(AnnotationIssue(file, f"box xyxy={_fmt(b)} reaches outside the {width}x{height} image", "clipped box"))
            out[i] = c
    return out, keep


def _fmt(b: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in b) + "]"


# ------------------------------------------------------------------------------- VOC


def _text(node, tag: str, default: str | None = None) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text is not None else default


def parse_voc_xml(path: str | Path) -> dict:
    """Parse one VOC annotation file into a dict (file coordinates, 1-based inclusive).

    Raises :class:`AnnotationError` naming the file for malformed or hostile XML
    (entity expansion, external entities and DTDs are refused by ``defusedxml``).
    """
    path = Path(path)
    try:
        root = defused_parse(path, forbid_dtd=True).getroot()
    except DefusedXmlException as e:
        raise AnnotationError(f"{path}: refused hostile XML ({type(e).__name__})") from None
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except Exception as e:  # ParseError, OSError
        raise AnnotationError(f"{path}: malformed XML ({str(e).splitlines()[0]})") from None
    size = root.find("size")
    try:
        width = int(float(_text(size, "width", "0"))) if size is not None else 0
        height = int(float(_text(size, "height", "0"))) if size is not None else 0
        objects = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                raise AnnotationError(f"{path}: object without <bndbox>")
            box = [float(_text(bb, k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
            if any(np.isnan(box)):
                raise AnnotationError(f"{path}: <bndbox> missing a coordinate")
            objects.append({
                "name": (_text(obj, "name") or "").strip(),
                "box": box,
                "difficult": _text(obj, "difficult", "0") == "1",
                "truncated": _text(obj, "truncated"),
                "occluded": _text(obj, "occluded"),
                "pose": _text(obj, "pose"),
            })
    except ValueError as e:
        if isinstance(e, AnnotationError):
            raise
        raise AnnotationError(f"{path}: non-numeric value ({e})") from None
    src = root.find("source")
    return {
        "filename": _text(root, "filename"),
        "width": width,
        "height": height,
        "objects": objects,
        "flickrid": _text(src, "flickrid") if src is not None else None,
    }


def read_voc(
    root: str | Path, split: str | None = None, classes: Sequence[str] | None = None
) -> Dataset:
    """Read a VOC devkit layout: ``Annotations/*.xml``, ``ImageSets/Main/<split>.txt``,
    ``JPEGImages/``. ``split=None`` reads every annotation file. ``classes`` defaults to
    the 20 VOC classes when every name in the split is one of them, else the sorted names."""
    root = Path(root)
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if split is not None:
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file}: no such split file")
        ids = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
    else:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
    issues: list[AnnotationIssue] = []
    parsed: list[tuple[str, dict]] = []
    for image_id in ids:
        xml = ann_dir / f"{image_id}.xml"
        if split is not None and not xml.is_file():
            # a split file naming an id without its files: skip it, say which files are missing
            what = f"no annotation file Annotations/{xml.name}"
            if _find_image(img_dir, image_id) is None:
                what += f" and no image JPEGImages/{image_id}.jpg"
            issues.append(AnnotationIssue(str(split_file), f"lists id {image_id}, which has {what}", "dropped image"))
            continue
        try:
            parsed.append((image_id, parse_voc_xml(xml)))
        except (AnnotationError, FileNotFoundError) as e:
            issues.append(AnnotationIssue(str(xml), str(e).split(": ", 1)[-1], "dropped image"))
    if classes is None:
        names = {o["name"] for _, p in parsed for o in p["objects"]}
        # VOC itself (most of its 20 names) keeps the VOC order on every split; a dataset that uses a
        # few VOC names (a person-only collection) gets just those, not 20 classes with no examples
        classes = list(VOC_CLASSES) if names <= set(VOC_CLASSES) and len(names) >= len(VOC_CLASSES) // 2 else sorted(names)
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    records, annotated = [], 0
    for image_id, p in parsed:
        xml = str(ann_dir / f"{image_id}.xml")
        path = img_dir / (p["filename"] or f"{image_id}.jpg")
        if not path.is_file():
            alt = _find_image(img_dir, image_id)
            if alt is None:
                if split is not None:
                    issues.append(AnnotationIssue(str(split_file), f"lists id {image_id}, which has no image "
                                                  f"JPEGImages/{path.name} (annotation {xml})", "dropped image"))
                else:
                    issues.append(AnnotationIssue(xml, f"image {path} not found", "dropped image"))
                continue
            path = alt
        size = _image_size_or_issue(path, p["width"], p["height"], xml, issues)
        if size is None:
            continue
        annotated += len(p["objects"])
        records.append(_voc_record(image_id, path, *size, p, index, xml, issues))
    return Dataset(root, split, classes, records, issues, "voc", annotated)


def _image_size_or_issue(path: Path, width: int, height: int, where: str,
                         issues: list[AnnotationIssue]) -> tuple[int, int] | None:
    """``(width, height)`` as annotated, or read from the image when the annotation has none;
    None (and a "dropped image" issue at ``where``) when the image cannot be read."""
    if width > 0 and height > 0:
        return width, height
    try:
        return image_size(path)
    except ImageReadError as e:
        issues.append(AnnotationIssue(where, str(e), "dropped image"))
        return None


def _voc_record(image_id: str, path: Path, width: int, height: int, p: dict, index: dict[str, int], xml: str,
                issues: list[AnnotationIssue]) -> ImageRecord:
    """One VOC image's record from its parsed XML ``p``: objects of unknown classes and
    degenerate boxes dropped with an issue each, boxes converted to 0-based pixel edges."""
    known = []
    for o in p["objects"]:
        if o["name"] in index:
            known.append(o)
        else:
            issues.append(AnnotationIssue(xml, f"unknown class {o['name']!r}", "dropped object"))
    file_boxes = np.array([o["box"] for o in known], np.float32).reshape(-1, 4)
    boxes = voc_to_xyxy(file_boxes)
    # A file box with xmax <= xmin has zero extent in the annotator's eyes even though
    # VOC's inclusive convention would give it one pixel: treat it as degenerate.
    flat = (file_boxes[:, 2] <= file_boxes[:, 0]) | (file_boxes[:, 3] <= file_boxes[:, 1])
    boxes[flat, 2:] = boxes[flat, :2]
    boxes, keep = _sanitize(boxes, width, height, xml, issues)
    known = [o for o, k in zip(known, keep, strict=True) if k]

    def flags(key: str):
        vals = [o[key] for o in known]
        return None if all(v is None for v in vals) else np.array([v == "1" for v in vals], bool)

    poses = [o["pose"] for o in known]
    return ImageRecord(
        image_id=image_id, path=path, width=width, height=height, boxes=boxes[keep],
        labels=np.array([index[o["name"]] for o in known], np.int64),
        difficult=np.array([o["difficult"] for o in known], bool),
        truncated=flags("truncated"), occluded=flags("occluded"),
        pose=None if all(v is None for v in poses) else [v or "" for v in poses],
        source_id=p["flickrid"],
    )


def _find_image(folder: Path, stem: str) -> Path | None:
    """``folder/<stem><suffix>`` for the first image suffix that exists, else ``None``."""
    return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def write_voc_xml(record: ImageRecord, classes: Sequence[str], path: str | Path) -> None:
    """Write ``record`` as a VOC annotation file (boxes back to 1-based inclusive)."""
    from xml.etree.ElementTree import Element, SubElement, tostring

    ann = Element("annotation")
    SubElement(ann, "filename").text = Path(record.path).name
    size = SubElement(ann, "size")
    for k, v in (("width", record.width), ("height", record.height), ("depth", 3)):
        SubElement(size, k).text = str(v)
    for i, box in enumerate(xyxy_to_voc(record.boxes)):
        obj = SubElement(ann, "object")
        SubElement(obj, "name").text = classes[int(record.labels[i])]
        SubElement(obj, "difficult").text = "1" if record.difficult[i] else "0"
        if record.truncated is not None:
            SubElement(obj, "truncated").text = "1" if record.truncated[i] else "0"
        bb = SubElement(obj, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            SubElement(bb, k).text = f"{v:g}"
    Path(path).write_bytes(tostring(ann, encoding="utf-8"))


# --------------------------------------------------------- PASCAL Annotation v1.00 text

_V1_SIZE = re.compile(r"Image size \(X x Y x C\)\s*:\s*(\d+)\s*x\s*(\d+)")
_V1_FILE = re.compile(r'Image filename\s*:\s*"([^"]+)"')
_V1_BOX = re.compile(
    r'Bounding box for object (\d+) "([^"]*)" \(Xmin, Ymin\) - \(Xmax, Ymax\)\s*:\s*'
    r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*-\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)"
)
_V1_MASK = re.compile(r'Pixel mask for object (\d+) "[^"]*"\s*:\s*"([^"]+)"')


def fixed_split(ids: Sequence[str], split: str | None) -> list[str]:
    """The documented split for datasets that ship none (e.g. Penn-Fudan).

    Sorted by name: ``test`` is every 4th image (indices 3, 7, ...), ``trainval`` the
    rest; within ``trainval`` every 4th is ``val`` and the others ``train``.
    """
    ids = sorted(ids)
    if split in (None, "all"):
        return ids
    test = set(ids[3::4])
    trainval = [i for i in ids if i not in test]
    val = set(trainval[3::4])
    table = {
        "test": [i for i in ids if i in test],
        "trainval": trainval,
        "val": [i for i in trainval if i in val],
        "train": [i for i in trainval if i not in val],
    }
    if split not in table:
        raise ValueError(f"unknown split {split!r}; this dataset has {sorted(table)} (see rcnn.data.fixed_split)")
    return table[split]


def read_pascal_v1(root: str | Path, split: str | None = None, class_name: str = "person") -> Dataset:
    """Read the PASCAL "Annotation Version 1.00" text layout (``Annotation/*.txt``,
    ``PNGImages/``, ``PedMasks/``), as used by Penn-Fudan. Every object becomes
    ``class_name``; splits follow :func:`fixed_split`. Objects listed in
    ``added-object-list.txt`` (Penn-Fudan's later-labelled "very small, highly occluded"
    pedestrians) are marked ``difficult``, as VOC marks objects not required to be found."""
    root = Path(root)
    files = {p.stem: p for p in (root / "Annotation").glob("*.txt")}
    added: set[tuple[str, int]] = set()
    if (root / "added-object-list.txt").is_file():
        for ln in (root / "added-object-list.txt").read_text().splitlines():
            parts = ln.split()
            if len(parts) == 2 and not ln.startswith("#") and parts[1].isdigit():
                added.add((Path(parts[0]).stem, int(parts[1])))
    issues: list[AnnotationIssue] = []
    records, annotated = [], 0
    for image_id in fixed_split(list(files), split):
        f = files[image_id]
        try:
            text = f.read_text(errors="replace")
        except OSError as e:
            issues.append(AnnotationIssue(str(f), str(e), "dropped image"))
            continue
        m_file, m_size = _V1_FILE.search(text), _V1_SIZE.search(text)
        if not m_file or not m_size:
            issues.append(AnnotationIssue(str(f), "no image filename/size line", "dropped image"))
            continue
        path = _resolve_v1(root, m_file.group(1))
        width, height = int(m_size.group(1)), int(m_size.group(2))
        objs = sorted((int(m[0]), [float(v) for v in m[2:6]]) for m in _V1_BOX.findall(text))
        masks = {int(k): _resolve_v1(root, p) for k, p in _V1_MASK.findall(text)}
        annotated += len(objs)
        file_boxes = np.array([b for _, b in objs], np.float32).reshape(-1, 4)
        boxes = voc_to_xyxy(file_boxes)  # "Top left pixel co-ordinates : (1, 1)", inclusive
        flat = (file_boxes[:, 2] <= file_boxes[:, 0]) | (file_boxes[:, 3] <= file_boxes[:, 1])
        boxes[flat, 2:] = boxes[flat, :2]
        boxes, keep = _sanitize(boxes, width, height, str(f), issues)
        ids = np.array([k for k, _ in objs], np.int64)[keep]
        mask_files = {masks[k] for k in ids if k in masks}
        records.append(ImageRecord(
            image_id=image_id, path=path, width=width, height=height, boxes=boxes[keep],
            labels=np.zeros(int(keep.sum()), np.int64),
            difficult=np.array([(image_id, int(k)) in added for k in ids], bool),
            mask_path=mask_files.pop() if len(mask_files) == 1 else None,
            mask_ids=ids if len(mask_files) == 0 and masks else None,
        ))
        if records[-1].mask_path is not None:
            records[-1].mask_ids = ids
    return Dataset(root, split, [class_name], records, issues, "pascal-v1", annotated)


def _resolve_v1(root: Path, rel: str) -> Path:
    # Paths in the files start with the dataset folder's own name ("PennFudanPed/...").
    parts = Path(rel).parts
    return root.joinpath(*parts[1:]) if len(parts) > 1 else root / rel


# ------------------------------------------------------------------------------ COCO


def read_coco(json_path: str | Path, image_dir: str | Path | None = None, split: str | None = None) -> Dataset:
    """Read COCO-format JSON (``images``, ``annotations``, ``categories``). Classes are the
    category names in increasing id order; ``iscrowd`` objects are marked difficult (ignored
    by VOC evaluation, as crowds are by COCO's). ``image_dir`` defaults to the JSON's folder,
    or its ``images/`` subfolder when that exists."""
    json_path = Path(json_path)
    try:
        doc = json.loads(json_path.read_text())
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        images = doc["images"]
        anns = doc.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError, OSError) as e:
        raise AnnotationError(f"{json_path}: not a COCO annotation file ({e})") from None
    if image_dir is None:
        image_dir = json_path.parent / "images" if (json_path.parent / "images").is_dir() else json_path.parent
    image_dir = Path(image_dir)
    classes = [c["name"] for c in cats]
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict = {}
    for a in anns:
        by_image.setdefault(a.get("image_id"), []).append(a)
    issues: list[AnnotationIssue] = []
    records = []
    for im in images:
        objs = by_image.get(im["id"], [])
        name = str(json_path)
        known = []
        for a in objs:
            if a.get("category_id") not in cat_index or len(a.get("bbox", [])) != 4:
                issues.append(AnnotationIssue(name, f"annotation {a.get('id')} has no valid category/bbox", "dropped object"))
            else:
                known.append(a)
        path = image_dir / im["file_name"]
        size = _image_size_or_issue(path, int(im.get("width", 0)), int(im.get("height", 0)), name, issues)
        if size is None:
            continue
        w, h = size
        xywh = np.array([a["bbox"] for a in known], np.float32).reshape(-1, 4)
        boxes, keep = _sanitize(xywh_to_xyxy(xywh), w, h, f"{name} image {im['id']}", issues)
        known = [a for a, k in zip(known, keep, strict=True) if k]
        records.append(ImageRecord(
            image_id=str(im["id"]), path=path, width=w, height=h, boxes=boxes[keep],
            labels=np.array([cat_index[a["category_id"]] for a in known], np.int64),
            difficult=np.array([bool(a.get("iscrowd", 0)) for a in known], bool),
            source_id=_flickr_id(im.get("flickr_url")),
        ))
    if split not in (None, "all"):
        warnings.warn(f"{json_path}: COCO files carry one split; ignoring split={split!r}", stacklevel=2)
    return Dataset(json_path, split, classes, records, issues, "coco", len(anns), [c["id"] for c in cats])


def _flickr_id(url: str | None) -> str | None:
    if not url:
        return None
    m = re.search(r"/(\d+)_[0-9a-f]+", url)
    return m.group(1) if m else url


# ------------------------------------------------------------------------------ YOLO

#: Files that name a YOLO dataset's classes and splits, looked for in the dataset folder.
YOLO_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
YOLO_SPLITS = ("train", "val", "test")


def yolo_label_path(image: str | Path) -> Path:
    """The label file YOLO tools pair with ``image``: the last folder called ``images`` in its
    path replaced by ``labels`` and the suffix by ``.txt`` (``d/images/train/x.jpg`` ->
    ``d/labels/train/x.txt``); beside the image when no folder is called ``images``."""
    image = Path(image)
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _yolo_yaml(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AnnotationError(f"{path}: not a readable YAML file ({msg})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise AnnotationError(f"{path}: expected a mapping with names: and train:/val:/test: entries")
    return doc


def _yolo_names(doc: dict, path: Path) -> list[str] | None:
    """Class names from a data.yaml: ``names:`` as a list or an {index: name} mapping (a gap
    in the indices is named by its index), else ``nc:`` indices; ``None`` when neither."""
    names = doc.get("names")
    if names is None:
        nc = doc.get("nc")
        return [str(i) for i in range(nc)] if isinstance(nc, int) and nc > 0 else None
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            by_id = {}
        if not by_id or min(by_id) < 0:
            raise AnnotationError(f"{path}: names: keys must be class indices 0, 1, 2, ...")
        return [by_id.get(i, str(i)) for i in range(max(by_id) + 1)]
    raise AnnotationError(f"{path}: names: must be a list or an {{index: name}} mapping")


def _yolo_entry(base: Path, entry: str) -> Path | None:
    """A data.yaml split entry resolved against ``base``. Like Ultralytics, ``../x`` that does
    not exist is also tried as ``x`` (Roboflow exports write ``train: ../train/images``)."""
    p = Path(entry).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    cands = [base / p] + ([base / entry[3:]] if entry.startswith("../") else [])
    return next((c for c in cands if c.exists()), None)


def _yolo_entry_images(src: Path, base: Path, issues: list[AnnotationIssue]) -> list[Path]:
    """Images of one split entry: a folder (searched recursively), a ``.txt`` list of image
    paths (relative ones against the list's folder, then ``base``) or one image file."""
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if src.suffix.lower() != ".txt":
        return [src] if src.suffix.lower() in IMAGE_SUFFIXES else []
    out = []
    for n, ln in enumerate(src.read_text(errors="replace").splitlines(), start=1):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        p = Path(s)
        cands = [p] if p.is_absolute() else [src.parent / p, base / p]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            issues.append(AnnotationIssue(f"{src}:{n}", f"lists image {s}, which does not exist", "dropped image"))
        else:
            out.append(hit)
    return out


def _yolo_splits(root: Path, yaml_path: Path | None, doc: dict, split: str | None,
                 issues: list[AnnotationIssue]) -> tuple[dict[str, list[Path]], list[Path]]:
    """``({split: images}, extra label folders)``; ``{}`` for a flat ``images/`` folder."""
    if yaml_path is not None and any(doc.get(k) for k in YOLO_SPLITS):
        base = yaml_path.parent
        if doc.get("path"):
            p = Path(str(doc["path"])).expanduser()
            p = p if p.is_absolute() else base / p
            base = p if p.is_dir() else base
        out: dict[str, list[Path]] = {}
        for key in YOLO_SPLITS:
            entries = doc.get(key)
            if not entries:
                continue
            images: list[Path] = []
            for e in entries if isinstance(entries, list) else [entries]:
                src = _yolo_entry(base, str(e))
                if src is None:
                    if split == key:
                        raise FileNotFoundError(f"{yaml_path}: {key}: {e} not found (relative to {base})")
                    issues.append(AnnotationIssue(str(yaml_path), f"{key}: {e} not found (relative to {base})",
                                                  "ignored split entry"))
                    continue
                images += _yolo_entry_images(src, base, issues)
            out[key] = images
        return _with_trainval(out), []
    img_dir = root / "images"
    subs = sorted(d for d in img_dir.iterdir() if d.is_dir()) if img_dir.is_dir() else []
    if subs and not list_images(img_dir):  # images/<split>/..., labels/<split>/...
        out = {d.name: sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
               for d in subs}
        return _with_trainval(out), [root / "labels" / d.name for d in subs]
    return {}, [root / "labels"]


def _with_trainval(splits: dict[str, list[Path]]) -> dict[str, list[Path]]:
    # VOC's naming, which `rcnn train` defaults to: trainval = train + val, unless defined
    val = splits.get("val", splits.get("valid"))
    if "trainval" not in splits and "train" in splits and val is not None:
        splits["trainval"] = splits["train"] + val
    return splits


def _yolo_ids(images: Sequence[Path], root: Path) -> dict[Path, str]:
    """Image id per image: the file stem, or the path under ``root`` when stems repeat."""
    stems: dict[str, int] = {}
    for p in images:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    out = {}
    for p in images:
        if stems[p.stem] == 1:
            out[p] = p.stem
        else:
            try:
                out[p] = p.relative_to(root).as_posix()
            except ValueError:
                out[p] = p.as_posix()
    return out


def _read_yolo_label(path: Path, issues: list[AnnotationIssue]) -> tuple[list[tuple[int, str, int, list[float]]] | None, int]:
    """Parsed lines ``(line number, text, class, [x1, y1, x2, y2] normalised)`` (``None`` when
    the file cannot be read) and the count of object lines. A line is ``class cx cy w h`` or a polygon ``class x1 y1 x2 y2 ...``
    (YOLO segmentation labels; its bounding box is used); anything else is malformed."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        issues.append(AnnotationIssue(str(path), f"cannot read ({e.strerror or e})", "dropped image"))
        return None, 0
    rows, count = [], 0
    for n, ln in enumerate(text.splitlines(), start=1):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        count += 1
        where = f"{path}:{n}"
        try:
            v = [float(x) for x in s.split()]
        except ValueError:
            v = []
        ok = (len(v) == 5 or (len(v) >= 7 and len(v) % 2 == 1)) and all(math.isfinite(x) for x in v)
        if not ok:
            issues.append(AnnotationIssue(where, f"malformed line {s[:60]!r} (expected 'class cx cy w h', "
                                          "numbers, coordinates normalised to 0..1)", "dropped object"))
            continue
        if not v[0].is_integer():
            issues.append(AnnotationIssue(where, f"class index {s.split()[0]!r} is not an integer", "dropped object"))
            continue
        if len(v) == 5:
            cx, cy, w, h = v[1:]
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            xs, ys = v[1::2], v[2::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        rows.append((n, s, int(v[0]), box))
    return rows, count


def read_yolo(root: str | Path, split: str | None = None, classes: Sequence[str] | None = None) -> Dataset:
    """Read a YOLO (Darknet / Ultralytics) detection layout; ``root`` is the dataset folder
    or its ``data.yaml``.

    Labels: one ``.txt`` per image (:func:`yolo_label_path`), one line ``class cx cy w h``
    per object, centre and size normalised to 0..1 by the image's (EXIF-oriented) width and
    height; a polygon line ``class x1 y1 x2 y2 ...`` (segmentation labels) gives its bounding
    box. Class names: ``classes`` if given, else ``names:`` of ``data.yaml`` (a list or an
    ``{index: name}`` mapping), else ``classes.txt`` (one name per line, in ``root`` or
    ``labels/``), else the indices themselves. Splits: the ``train:``/``val:``/``test:``
    entries of ``data.yaml`` (image folders, ``.txt`` lists of image paths, or lists of
    these); else the sub-folders of ``images/`` (``images/train/`` with ``labels/train/``:
    the split is the folder name); else, for one flat ``images/`` folder,
    :func:`fixed_split`. ``split=None`` or ``"all"`` reads every image once. Image ids are
    file stems (the path under ``root`` where stems repeat).

    Bad input follows the module's rules, one issue per case naming the label file and
    line: a class index outside the class list or a malformed line drops that object;
    coordinates outside 0..1 are clipped (the box is dropped when nothing is left); an image
    without a label file has no objects; a label file without an image is ignored.
    """
    root = Path(root)
    yaml_path = root if root.is_file() else next((root / n for n in YOLO_YAML_NAMES if (root / n).is_file()), None)
    root = root.parent if root.is_file() else root
    doc = _yolo_yaml(yaml_path) if yaml_path is not None else {}
    issues: list[AnnotationIssue] = []
    splits, label_dirs = _yolo_splits(root, yaml_path, doc, split, issues)
    if splits:
        listed = [p for imgs in splits.values() for p in imgs]
    else:
        listed = list_images(root / "images") if (root / "images").is_dir() else []
    seen: dict[Path, Path] = {}
    for p in listed:  # each image once (yaml splits may overlap), in first-listed order
        seen.setdefault(p.resolve(), p)
    every = list(seen.values())
    ids = _yolo_ids(every, root)
    if split in (None, "all"):
        chosen = every
    elif splits:
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; {yaml_path or root / 'images'} has {sorted(splits)}")
        chosen = list(dict.fromkeys(seen[p.resolve()] for p in splits[split]))
    else:
        keep = set(fixed_split([ids[p] for p in every], split))
        chosen = [p for p in every if ids[p] in keep]
    names = list(classes) if classes is not None else (_yolo_names(doc, yaml_path) if yaml_path is not None else None)
    if names is None:
        txt = next((f for f in (root / "classes.txt", root / "labels" / "classes.txt",
                                *(yolo_label_path(p).parent / "classes.txt" for p in chosen[:1])) if f.is_file()), None)
        if txt is not None:
            names = [ln.strip() for ln in txt.read_text(errors="replace").splitlines() if ln.strip()]
    parsed, annotated = [], 0
    for p in chosen:
        lp = yolo_label_path(p)
        rows: list = []
        if lp.is_file():
            rows, n = _read_yolo_label(lp, issues)
            annotated += n
            if rows is None:
                continue
        else:
            issues.append(AnnotationIssue(str(p), f"no label file {lp}", "kept image without objects"))
        try:
            w, h = image_size(p)
        except ImageReadError as e:
            issues.append(AnnotationIssue(str(lp), str(e), "dropped image"))
            continue
        parsed.append((p, lp, w, h, rows))
    if names is None:
        top = max((r[2] for *_, rows in parsed for r in rows), default=-1)
        names = [str(i) for i in range(top + 1)]
        issues.append(AnnotationIssue(str(root), "no class names (data.yaml names: or classes.txt)",
                                      "named classes by index"))
    records = [_yolo_record(ids[p], p, lp, w, h, rows, len(names), issues) for p, lp, w, h, rows in parsed]
    # label files without an image: in the label folders of this split (all images count as owners)
    expected = {yolo_label_path(p).resolve() for p in every}
    dirs = {yolo_label_path(p).parent for p in chosen}
    dirs |= {d for d in label_dirs if split in (None, "all") or not splits or d.name == split}
    for d in sorted(x for x in dirs if x.is_dir()):
        for t in sorted(d.glob("*.txt")):
            if t.name != "classes.txt" and t.resolve() not in expected:
                issues.append(AnnotationIssue(str(t), "label file without an image", "ignored label file"))
    return Dataset(root, split, names, records, issues, "yolo", annotated)


def _yolo_record(image_id: str, path: Path, lp: Path, w: int, h: int, rows: list, num_classes: int,
                 issues: list[AnnotationIssue]) -> ImageRecord:
    """One YOLO image's record from its label ``rows`` ``(line number, text, class, normalised
    xyxy)``: boxes scaled to ``w`` x ``h`` pixels; a class outside ``num_classes`` or an empty box
    dropped, one reaching outside 0..1 clipped, one issue each naming ``lp`` and the line."""
    boxes, labels = [], []
    for n, text, c, b in rows:
        where = f"{lp}:{n}"
        if not 0 <= c < num_classes:
            issues.append(AnnotationIssue(where, f"class index {c} outside the {num_classes} classes "
                                          f"0..{num_classes - 1}", "dropped object"))
            continue
        raw = np.array(b, np.float64)
        clipped = np.clip(raw, 0.0, 1.0)
        if raw[2] <= raw[0] or raw[3] <= raw[1]:
            issues.append(AnnotationIssue(where, f"box {text!r} has zero or negative size", "dropped box"))
            continue
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            issues.append(AnnotationIssue(where, f"box {text!r} lies outside the image (0..1)", "dropped box"))
            continue
        if np.abs(clipped - raw).max() > 1e-6:  # exporters' rounding (1.0000001) is not worth a line
            issues.append(AnnotationIssue(where, f"box {text!r} reaches outside 0..1", "clipped box"))
        boxes.append(clipped * (w, h, w, h))
        labels.append(c)
    return ImageRecord(image_id=image_id, path=path, width=w, height=h, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                       labels=np.array(labels, np.int64), difficult=np.zeros(len(labels), bool))


# ------------------------------------------------------------------------ validation


def holdout_split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Carve a validation part out of ``dataset``: returns ``(train, val)``.

    Images are ranked by ``sha256("<seed>:<image id>")`` and the first
    ``round(fraction * N)`` form the validation part, so the choice depends only on the ids
    and the seed (not on file order) and adding images moves few others. The parts are named
    ``"<split>-train"`` and ``"<split>-val"`` (``<split>`` is ``dataset.split``, or ``all``);
    both keep the class list, root, format, category ids and issues of ``dataset``, share its
    records (same objects, original order), and count their own usable objects as
    ``annotated_objects``. Raises ``ValueError`` (one line) for a fraction outside (0, 1) or
    when a part would be empty.
    """
    n = len(dataset.records)
    if not 0.0 < fraction < 1.0:  # also refuses NaN
        raise ValueError(f"validation fraction must be between 0 and 1 (exclusive), not {fraction}")
    k = math.floor(fraction * n + 0.5)
    if k == 0 or k == n:
        part = "validation" if k == 0 else "training"
        raise ValueError(f"a validation fraction of {fraction} of {n} image(s) leaves no {part} image; "
                         "choose another fraction or use more images")

    def rank(i: int) -> tuple[str, int]:
        key = f"{seed}:{dataset.records[i].image_id}".encode()
        return hashlib.sha256(key).hexdigest(), i

    val = set(sorted(range(n), key=rank)[:k])
    base = dataset.split or "all"

    def part(name: str, idx: list[int]) -> Dataset:
        recs = [dataset.records[i] for i in idx]
        return Dataset(dataset.root, f"{base}-{name}", list(dataset.classes), recs, list(dataset.issues),
                       dataset.format, int(sum(len(r.boxes) for r in recs)), dataset.category_ids)

    return part("train", [i for i in range(n) if i not in val]), part("val", sorted(val))


@dataclass
class DatasetSummary:
    """What ``rcnn info`` shows of a dataset: object counts per class (all, difficult, in each part of
    a validation carve-out), objects with instance masks, the range of image sizes (px)."""

    objects: list[int]  # per class
    difficult: list[int]  # per class
    parts: tuple[Dataset, ...]  # (train, val) of holdout_split, or ()
    part_objects: list[list[int]]  # per part, per class
    masked: int  # objects of images with instance masks
    masked_not_difficult: int
    width: tuple[int, int] | None  # (min, max); None without images
    height: tuple[int, int] | None


def summarize(dataset: Dataset, val_fraction: float | None = None) -> DatasetSummary:
    """Count ``dataset``'s objects per class and, with ``val_fraction``, in the two parts of
    :func:`holdout_split` (its ``ValueError`` for a bad fraction)."""
    parts = holdout_split(dataset, val_fraction) if val_fraction is not None else ()
    C = len(dataset.classes)

    def per_class(records: Sequence[ImageRecord], difficult: bool = False) -> list[int]:
        labels = [r.labels[r.difficult.astype(bool)] if difficult else r.labels for r in records]
        return np.bincount(np.concatenate([np.zeros(0, np.int64), *labels]).astype(np.int64), minlength=C).tolist()

    masked = [r for r in dataset.records if r.mask_path is not None]
    sizes = np.array([(r.width, r.height) for r in dataset.records]).reshape(-1, 2)
    return DatasetSummary(per_class(dataset.records), per_class(dataset.records, True), parts,
                          [per_class(p.records) for p in parts], sum(len(r.boxes) for r in masked),
                          sum(int((~r.difficult).sum()) for r in masked),
                          (int(sizes[:, 0].min()), int(sizes[:, 0].max())) if len(sizes) else None,
                          (int(sizes[:, 1].min()), int(sizes[:, 1].max())) if len(sizes) else None)


def load_splits(path: str | Path, splits: Sequence[str], limit: int = 0) -> dict[str, Dataset]:
    """``{split: Dataset}`` of the named splits of one dataset (:func:`load_dataset`), each cut to
    its first ``limit`` images (0: all; for quick checks)."""
    out = {s: load_dataset(path, s) for s in splits}
    if limit:
        for d in out.values():
            d.records = d.records[:limit]
    return out


# ----------------------------------------------------------------------------- entry


def load_dataset(path: str | Path, split: str | None = None, classes: Sequence[str] | None = None) -> Dataset:
    """Open a dataset, detecting its format: a ``.json`` file is COCO, a ``.yaml`` file is
    YOLO, a folder with ``Annotations/`` is VOC, one with ``Annotation/*.txt`` is PASCAL
    v1.00, one with ``data.yaml`` (or ``images/`` beside ``labels/``) is YOLO."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return read_coco(path, split=split)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return read_yolo(path, split, classes)
    if (path / "Annotations").is_dir():
        return read_voc(path, split, classes)
    if (path / "Annotation").is_dir():
        return read_pascal_v1(path, split)
    if any((path / n).is_file() for n in YOLO_YAML_NAMES) or ((path / "images").is_dir() and (path / "labels").is_dir()):
        return read_yolo(path, split, classes)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset")
    raise ValueError(f"{path}: not a dataset (expected Annotations/ (VOC), Annotation/ (PASCAL v1.00), "
                     "images/ + labels/ or data.yaml (YOLO), or a COCO .json)")
