"""Datasets as plain records, and robust image loading.

Readers for the PASCAL VOC devkit layout (XML, via ``defusedxml``), the older PASCAL
"Annotation Version 1.00" text format (Penn-Fudan) and COCO JSON. Every reader returns
a :class:`Dataset` of :class:`ImageRecord` with boxes as ``(N,4)`` float32 pixel-edge
``xyxy`` (see :mod:`rcnn.boxes`); file conventions are converted here and nowhere else.

Annotation problems never crash a reader. The rule, applied to every format:

* a box with ``xmax <= xmin`` or ``ymax <= ymin`` *in the file's own coordinates*
  (zero or negative extent) is **dropped**;
* a box reaching outside the image is **clipped** to it; one entirely outside is dropped;
* an object of a class outside the dataset's class list is **dropped**;
* an annotation file that cannot be parsed (malformed or hostile XML, bad JSON, missing
  image) drops **that image**.

Each case is recorded as an :class:`AnnotationIssue` naming the file, so counts never
change silently (``rcnn info`` lists them).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import parse as defused_parse
from PIL import Image, ImageOps, UnidentifiedImageError

from rcnn.boxes import voc_to_xyxy, xywh_to_xyxy, xyxy_to_voc

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
    white) and 16-bit/float images. Raises :class:`ImageReadError` with one line naming
    the file for non-images, truncated files and images over ``max_pixels``.
    """
    path = Path(path)
    with image_errors(path), Image.open(path) as im:
        if im.width * im.height > max_pixels:
            raise ImageReadError(
                f"{path}: image is {im.width}x{im.height} pixels, over the "
                f"{max_pixels}-pixel limit (possible decompression bomb)"
            )
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb8(im)


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
    if split is not None:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file}: no such split file")
        ids = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
    else:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
    issues: list[AnnotationIssue] = []
    parsed: list[tuple[str, dict]] = []
    for image_id in ids:
        xml = ann_dir / f"{image_id}.xml"
        try:
            parsed.append((image_id, parse_voc_xml(xml)))
        except (AnnotationError, FileNotFoundError) as e:
            issues.append(AnnotationIssue(str(xml), str(e).split(": ", 1)[-1], "dropped image"))
    if classes is None:
        names = {o["name"] for _, p in parsed for o in p["objects"]}
        classes = list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    records, annotated = [], 0
    for image_id, p in parsed:
        xml = str(ann_dir / f"{image_id}.xml")
        path = img_dir / (p["filename"] or f"{image_id}.jpg")
        if not path.is_file():
            alt = next((img_dir / f"{image_id}{s}" for s in IMAGE_SUFFIXES if (img_dir / f"{image_id}{s}").is_file()), None)
            if alt is None:
                issues.append(AnnotationIssue(xml, f"image {path} not found", "dropped image"))
                continue
            path = alt
        width, height = p["width"], p["height"]
        if width <= 0 or height <= 0:
            try:
                width, height = image_size(path)
            except ImageReadError as e:
                issues.append(AnnotationIssue(xml, str(e), "dropped image"))
                continue
        objs = p["objects"]
        annotated += len(objs)
        known = []
        for o in objs:
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
        boxes = boxes[keep]

        def opt(key: str, known=known):
            vals = [o[key] for o in known]
            return None if all(v is None for v in vals) else np.array([v == "1" for v in vals], bool)

        poses = [o["pose"] for o in known]
        records.append(ImageRecord(
            image_id=image_id, path=path, width=width, height=height, boxes=boxes,
            labels=np.array([index[o["name"]] for o in known], np.int64),
            difficult=np.array([o["difficult"] for o in known], bool),
            truncated=opt("truncated"), occluded=opt("occluded"),
            pose=None if all(v is None for v in poses) else [v or "" for v in poses],
            source_id=p["flickrid"],
        ))
    return Dataset(root, split, classes, records, issues, "voc", annotated)


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
        w, h = int(im.get("width", 0)), int(im.get("height", 0))
        path = image_dir / im["file_name"]
        if w <= 0 or h <= 0:
            try:
                w, h = image_size(path)
            except ImageReadError as e:
                issues.append(AnnotationIssue(name, str(e), "dropped image"))
                continue
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


# ----------------------------------------------------------------------------- entry


def load_dataset(path: str | Path, split: str | None = None, classes: Sequence[str] | None = None) -> Dataset:
    """Open a dataset, detecting its format: a ``.json`` file is COCO, a folder with
    ``Annotations/`` is VOC, one with ``Annotation/*.txt`` is PASCAL v1.00."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return read_coco(path, split=split)
    if (path / "Annotations").is_dir():
        return read_voc(path, split, classes)
    if (path / "Annotation").is_dir():
        return read_pascal_v1(path, split)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset")
    raise ValueError(f"{path}: not a dataset (expected Annotations/ (VOC), Annotation/ (PASCAL v1.00) or a COCO .json)")
