"""Dataset readers and image loading, including hostile and broken inputs."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import data_path
from rcnn.data import (
    AnnotationError,
    ImageReadError,
    fixed_split,
    load_dataset,
    load_image,
    load_splits,
    parse_voc_xml,
    read_coco,
    read_voc,
    summarize,
    write_voc_xml,
)

BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<annotation><filename>&lol3;</filename></annotation>
"""

EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotation><filename>&xxe;</filename></annotation>
"""


def voc_xml(objects, width=64, height=48, filename="a.jpg"):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    return f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height></size>{objs}</annotation>"


def make_voc(root: Path, files: dict[str, str], split=None):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, xml in files.items():
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
        Image.new("RGB", (64, 48), "gray").save(root / "JPEGImages" / f"{stem}.jpg")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(split or files) + "\n")
    return root


# ----------------------------------------------------------------------------- images


def test_load_image_conversions(tmp_path):
    # CMYK JPEG
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    a = load_image(tmp_path / "cmyk.jpg")
    assert a.shape == (10, 20, 3) and a.dtype == np.uint8
    assert a[5, 5, 0] > 200 and a[5, 5, 1] < 60  # red
    # 16-bit grayscale PNG: 65535 -> 255, 0 -> 0
    g = np.zeros((8, 8), np.uint16)
    g[:, 4:] = 65535
    Image.fromarray(g).save(tmp_path / "g16.png")
    a = load_image(tmp_path / "g16.png")
    assert a.shape == (8, 8, 3) and a[0, 0, 0] == 0 and a[0, 7, 0] == 255
    # palette and grayscale
    Image.new("P", (5, 5)).save(tmp_path / "p.png")
    Image.new("L", (5, 5), 100).save(tmp_path / "l.jpg")
    assert load_image(tmp_path / "p.png").shape == (5, 5, 3)
    assert load_image(tmp_path / "l.jpg")[0, 0].tolist() == [100, 100, 100]
    # RGBA composited on white
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png")[0, 0].tolist() == [255, 255, 255]
    # 1x1 image
    Image.new("RGB", (1, 1), "blue").save(tmp_path / "one.png")
    assert load_image(tmp_path / "one.png").shape == (1, 1, 3)


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (30, 10), "white")
    im.paste((255, 0, 0), (0, 0, 5, 10))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    a = load_image(tmp_path / "rot.jpg")
    assert a.shape == (30, 10, 3)  # displayed upright: portrait
    assert a[2, 5, 0] > 200 and a[2, 5, 1] < 80  # the red stripe is now on top


@pytest.mark.parametrize("kind", ["header_only", "no_scan_data", "truncated_png", "not_image", "missing", "empty"])
def test_bad_images_one_line_error(tmp_path, kind):
    # a truncated JPEG with some image data decodes (tests/test_data_bad_input.py); these cannot
    p = tmp_path / f"{kind}.jpg"
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "PNG" if kind == "truncated_png" else "JPEG")
    data = buf.getvalue()
    if kind == "header_only":
        p.write_bytes(data[:300])
    elif kind == "no_scan_data":  # cut right after the start-of-scan header
        sos = data.find(b"\xff\xda")
        p.write_bytes(data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")])
    elif kind == "truncated_png":
        p.write_bytes(data[: len(data) // 2])
    elif kind == "not_image":
        p.write_text("this is not a JPEG\n")
    elif kind == "empty":
        p.write_bytes(b"")
    with pytest.raises(ImageReadError) as e:
        load_image(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg


def test_decompression_bomb_refused(tmp_path):
    Image.new("L", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="pixel limit"):
        load_image(tmp_path / "big.png", max_pixels=100_000)


# ------------------------------------------------------------------------------ VOC


def test_voc_hostile_and_malformed_xml(tmp_path):
    for name, text in {"bomb": BOMB, "xxe": EXTERNAL, "broken": "<annotation><object>"}.items():
        (tmp_path / f"{name}.xml").write_text(text)
        with pytest.raises(AnnotationError) as e:
            parse_voc_xml(tmp_path / f"{name}.xml")
        assert f"{name}.xml" in str(e.value) and "\n" not in str(e.value)


def test_voc_missing_annotation_is_named_as_missing(tmp_path):
    with pytest.raises(AnnotationError, match=r"none\.xml: annotation file not found$"):
        parse_voc_xml(tmp_path / "none.xml")


def test_voc_reader_rules(tmp_path):
    root = make_voc(tmp_path / "voc", {
        "a": voc_xml([("cat", (1, 1, 10, 10), 0), ("dog", (5, 5, 5, 20), 0), ("cat", (50, 40, 80, 60), 1),
                      ("zebra", (1, 1, 5, 5), 0)]),
        "b": BOMB,
        "c": "<annotation><object><name>cat</name></object></annotation>",
    })
    ds = read_voc(root, "test", classes=["cat", "dog"])
    assert [r.image_id for r in ds.records] == ["a"]
    r = ds.records[0]
    assert r.boxes.dtype == np.float32
    # 1-based inclusive [1,1,10,10] -> pixel-edge [0,0,10,10]; clipped [49,39,64,48]
    assert np.allclose(r.boxes, [[0, 0, 10, 10], [49, 39, 64, 48]])
    assert r.difficult.tolist() == [False, True] and r.labels.tolist() == [0, 0]
    actions = sorted(i.action for i in ds.issues)
    assert actions == ["clipped box", "dropped box", "dropped image", "dropped image", "dropped object"]
    assert ds.annotated_objects == 4 and ds.num_objects == 2
    assert all(str(root) in i.file for i in ds.issues)


def test_voc_write_roundtrip(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": voc_xml([("cat", (1, 2, 10, 20), 1)])})
    ds = read_voc(root, "test", ["cat"])
    out = tmp_path / "out.xml"
    write_voc_xml(ds.records[0], ds.classes, out)
    p = parse_voc_xml(out)
    assert p["objects"][0]["box"] == [1, 2, 10, 20] and p["objects"][0]["difficult"]


def test_coco_reader(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "x.jpg")
    doc = {"images": [{"id": 7, "file_name": "x.jpg", "width": 50, "height": 40, "flickr_url": "http://farm1.staticflickr.com/1/123456_abcdef.jpg"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [5, 5, 10, 20], "iscrowd": 0},
                           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 0, 5], "iscrowd": 1},
                           {"id": 3, "image_id": 7, "category_id": 99, "bbox": [0, 0, 5, 5]}],
           "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    ds = read_coco(tmp_path / "ann.json")
    assert ds.classes == ["cat", "dog"] and ds.category_ids == [1, 3]
    r = ds.records[0]
    assert np.allclose(r.boxes, [[5, 5, 15, 25]]) and r.labels.tolist() == [1]
    assert r.source_id == "123456"
    assert sorted(i.action for i in ds.issues) == ["dropped box", "dropped object"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match=r"bad\.json"):
        load_dataset(tmp_path / "bad.json")


def test_fixed_split_partitions():
    ids = [f"im{i:03d}" for i in range(17)]
    test, trainval = fixed_split(ids, "test"), fixed_split(ids, "trainval")
    assert sorted(test + trainval) == ids and test == ids[3::4]
    assert sorted(fixed_split(ids, "train") + fixed_split(ids, "val")) == trainval
    with pytest.raises(ValueError, match="unknown split"):
        fixed_split(ids, "nope")


def test_unknown_dataset_layout(tmp_path):
    with pytest.raises(ValueError, match="not a dataset"):
        load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing")


# ------------------------------------------------------------------------- real data


def test_bccd_counts_and_degenerate_boxes():
    ds = load_dataset(data_path("BCCD"))
    assert len(ds) == 364 and ds.annotated_objects == 4888
    assert ds.classes == ["Platelets", "RBC", "WBC"]
    dropped = [i for i in ds.issues if i.action == "dropped box"]
    assert sorted(Path(i.file).stem for i in dropped) == ["BloodImage_00338", "BloodImage_00343"]
    assert ds.num_objects == 4888 - 2


def test_voc_sample_counts():
    ds = load_dataset(data_path("VOC2007-test-sample"), "test")
    assert len(ds) == 19 and ds.num_objects == 81
    assert int(sum(r.difficult.sum() for r in ds.records)) == 15
    assert ds.classes == list(__import__("rcnn.data", fromlist=["VOC_CLASSES"]).VOC_CLASSES)
    r = next(r for r in ds.records if r.image_id == "000004")
    assert np.allclose(r.boxes[0], [12, 310, 84, 362])  # xml: 13 311 84 362


def test_pennfudan_counts_and_masks():
    ds = load_dataset(data_path("PennFudanPed"))
    assert len(ds) == 170 and ds.num_objects == 423
    assert sum(int((~r.difficult).sum()) for r in ds.records) == 345  # the 78 later-added people are difficult
    r = ds.records[0]
    m = np.asarray(Image.open(r.mask_path))
    assert m.shape == (r.height, r.width) and set(np.unique(m)) - {0} == set(r.mask_ids.tolist())


def test_summarize_counts_per_class_and_parts():
    ds = load_dataset(data_path("VOC2007-test-sample"), "test")
    s = summarize(ds)
    assert sum(s.objects) == ds.num_objects == 81 and sum(s.difficult) == 15 and s.parts == ()
    person = ds.classes.index("person")
    assert s.objects[person] == sum(int((r.labels == person).sum()) for r in ds.records)
    s = summarize(ds, 0.3)
    assert [len(p) for p in s.parts] == [13, 6]
    assert [sum(c) for c in s.part_objects] == [p.num_objects for p in s.parts]
    assert np.add(*s.part_objects).tolist() == s.objects
    assert s.width[0] <= s.width[1] and s.masked == 0
    with pytest.raises(ValueError, match="validation fraction"):
        summarize(ds, 1.5)


def test_load_splits_cuts_each_split():
    parts = load_splits(data_path("PennFudanPed"), ("train", "test"), limit=3)
    assert list(parts) == ["train", "test"] and [len(d) for d in parts.values()] == [3, 3]
    assert {r.image_id for r in parts["train"].records}.isdisjoint(r.image_id for r in parts["test"].records)
