"""Own-dataset bad input: truncated JPEGs, split files naming missing files, and the
validation carve-out."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import data_path
from rcnn.data import Dataset, ImageReadError, ImageRecord, holdout_split, load_dataset, load_image
from test_data import make_voc, voc_xml


def gradient(h=120, w=160) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=2).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------- truncated JPEG


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_decodes_the_readable_part(tmp_path, caplog, progressive):
    img = gradient()
    p = tmp_path / "cut.jpg"
    p.write_bytes(jpeg_bytes(img, progressive=progressive)[:-20])  # the last 20 bytes missing
    with caplog.at_level(logging.WARNING, logger="rcnn.data"):
        a = load_image(p)
        b = load_image(p)  # a second stage loading the same file: no second warning
    assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.abs(a[:60].astype(int) - img[:60]).mean() < 6  # the top half is the picture
    msgs = [r.getMessage() for r in caplog.records if r.name == "rcnn.data"]
    assert len(msgs) == 1 and str(p) in msgs[0] and "truncated" in msgs[0] and "decoded the readable part" in msgs[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no global switch was flipped
    # PIL itself still refuses the file: the tolerance is this call's, not the process's
    with pytest.raises(OSError), Image.open(p) as im:
        im.load()


def test_truncated_jpeg_keeps_exif_and_mode(tmp_path, caplog):
    img = gradient(40, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    p = tmp_path / "rot.jpg"
    p.write_bytes(jpeg_bytes(img, exif=exif)[:-20])
    assert load_image(p).shape == (90, 40, 3)
    g = tmp_path / "gray.jpg"
    buf = io.BytesIO()
    Image.fromarray(img[..., 0]).save(buf, "JPEG")
    g.write_bytes(buf.getvalue()[:-20])
    a = load_image(g)
    assert a.shape == (40, 90, 3) and np.array_equal(a[..., 0], a[..., 2])
    with pytest.raises(ImageReadError, match="pixel limit"):  # the size limit still applies
        load_image(p, max_pixels=1000)


def test_corrupt_jpeg_with_end_marker_is_not_called_truncated(tmp_path):
    data = jpeg_bytes(gradient())
    p = tmp_path / "bad.jpg"
    n = len(data) // 2
    p.write_bytes(data[:n] + b"\xff\xc4\x00\x01" + data[n:])  # a bogus table mid-scan; the end marker is there
    with pytest.raises(ImageReadError, match="corrupt") as e:
        load_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_truncated_image_keeps_its_objects(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": voc_xml([("cat", (1, 1, 10, 10), 0)], 64, 48),
                                        "b": voc_xml([("cat", (5, 5, 30, 30), 0)], 64, 48)})
    jpg = root / "JPEGImages" / "a.jpg"
    jpg.write_bytes(jpeg_bytes(gradient(48, 64))[:-20])
    ds = load_dataset(root, "test", ["cat"])
    assert [r.image_id for r in ds] == ["a", "b"] and ds.num_objects == 2
    assert load_image(ds.records[0].path).shape == (48, 64, 3)


# ------------------------------------------------------------ split files, missing files


def test_split_file_naming_missing_files(tmp_path):
    root = make_voc(tmp_path / "voc", {f"im{i}": voc_xml([("cat", (1, 1, 10, 10), 0)]) for i in range(4)},
                    split=["im0", "im1", "gone", "im2", "noimg", "noxml", "im3"])
    (root / "Annotations" / "noimg.xml").write_text(voc_xml([("cat", (1, 1, 10, 10), 0)], filename="noimg.jpg"))
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "noxml.jpg")
    ds = load_dataset(root, "test", ["cat"])
    assert [r.image_id for r in ds] == ["im0", "im1", "im2", "im3"]
    split_file = str(root / "ImageSets" / "Main" / "test.txt")
    lines = {i.problem.split()[2].rstrip(","): str(i) for i in ds.issues}
    assert set(lines) == {"gone", "noimg", "noxml"} and all(i.file == split_file for i in ds.issues)
    assert "no annotation file Annotations/gone.xml and no image JPEGImages/gone.jpg" in lines["gone"]
    assert "no annotation file Annotations/noxml.xml" in lines["noxml"] and "no image" not in lines["noxml"]
    assert "no image JPEGImages/noimg.jpg" in lines["noimg"]
    assert all(i.action == "dropped image" for i in ds.issues)


# ------------------------------------------------------------------ validation carve-out


def toy(n: int, split: str | None = "trainval") -> Dataset:
    """``n`` records (paths are never opened) with 0, 1 or 2 objects each."""
    root = Path("/nonexistent/toy")
    recs = [ImageRecord(f"img{i:03d}", root / f"img{i:03d}.jpg", 10, 10, np.zeros((i % 3, 4), np.float32),
                        np.zeros(i % 3, np.int64), np.zeros(i % 3, bool)) for i in range(n)]
    return Dataset(root, split, ["a"], recs, format="yolo")


def test_holdout_split_deterministic_and_order_free():
    ds = toy(50)
    train, val = holdout_split(ds, 0.2)
    assert (len(train), len(val)) == (40, 10)
    assert (train.split, val.split) == ("trainval-train", "trainval-val")
    assert train.classes == val.classes == ["a"] and train.root == ds.root and val.format == "yolo"
    ids_t, ids_v = {r.image_id for r in train}, {r.image_id for r in val}
    assert not ids_t & ids_v and len(ids_t | ids_v) == 50
    # the same parts whatever the file order; another seed gives another part
    rev = Dataset(ds.root, "trainval", ["a"], ds.records[::-1])
    assert {r.image_id for r in holdout_split(rev, 0.2)[1]} == ids_v
    assert {r.image_id for r in holdout_split(ds, 0.2, seed=1)[1]} != ids_v
    assert val.annotated_objects == val.num_objects
    assert [r.image_id for r in val] == sorted(ids_v)  # original order kept
    assert holdout_split(toy(10, None), 0.5)[0].split == "all-train"


@pytest.mark.parametrize(("n", "fraction", "match"), [
    (10, 0.0, "between 0 and 1"), (10, 1.0, "between 0 and 1"), (10, float("nan"), "between 0 and 1"),
    (10, 0.01, "no validation image"), (3, 0.9, "no training image"), (0, 0.5, "no validation image"),
])
def test_holdout_split_refuses(n, fraction, match):
    with pytest.raises(ValueError, match=match) as e:
        holdout_split(toy(n), fraction)
    assert "\n" not in str(e.value)


def test_holdout_split_bccd():
    ds = load_dataset(data_path("BCCD"), "trainval")
    train, val = holdout_split(ds, 0.25)
    assert len(train) + len(val) == len(ds) and abs(len(val) - 0.25 * len(ds)) <= 0.5
    assert train.num_objects + val.num_objects == ds.num_objects
