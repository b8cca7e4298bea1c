"""The YOLO layout: data.yaml / classes.txt, the split forms, box conversion and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import data_path
from rcnn.data import AnnotationError, load_dataset, read_yolo, yolo_label_path


def image(path: Path, size=(100, 50), exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    Image.new("RGB", size, "gray").save(path, **kw)
    return path


def label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def by_action(ds) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in ds.issues:
        out.setdefault(i.action, []).append(i.file)
    return out


def test_label_path_rule():
    assert yolo_label_path("d/images/train/x.jpg") == Path("d/labels/train/x.txt")
    assert yolo_label_path("images/d/images/x.png") == Path("images/d/labels/x.txt")  # the last images/ folder
    assert yolo_label_path("d/obj/x.jpg") == Path("d/obj/x.txt")  # darknet: beside the image


def test_flat_layout_with_classes_txt(tmp_path):
    image(tmp_path / "images" / "a.jpg", (100, 50))
    image(tmp_path / "images" / "b.png", (40, 40))
    label(tmp_path / "labels" / "a.txt", "0 0.5 0.5 0.2 0.4\n1 0.1 0.2 0.2 0.4\n\n")
    label(tmp_path / "labels" / "b.txt", "")  # an empty label file: a background image, not an issue
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    ds = load_dataset(tmp_path)
    assert ds.format == "yolo" and ds.classes == ["cat", "dog"] and ds.issues == []
    assert [r.image_id for r in ds.records] == ["a", "b"]
    a = ds.records[0]
    assert a.boxes.dtype == np.float32 and a.labels.tolist() == [0, 1] and a.difficult.tolist() == [False, False]
    # cx 50 cy 25 w 20 h 20 -> [40, 15, 60, 35]; cx 10 cy 10 w 20 h 20 -> [0, 0, 20, 20]
    assert np.allclose(a.boxes, [[40, 15, 60, 35], [0, 0, 20, 20]])
    assert (a.width, a.height) == (100, 50) and len(ds.records[1].boxes) == 0
    assert ds.annotated_objects == 2 and ds.num_objects == 2
    # no split files: the documented fixed split, as for Penn-Fudan
    assert len(load_dataset(tmp_path, "trainval")) == 2 and len(load_dataset(tmp_path, "test")) == 0


def test_data_yaml_names_and_split_entries(tmp_path):
    for s, names in {"train": ["t1", "t2", "t3"], "val": ["v1"], "test": ["s1", "s2"]}.items():
        for n in names:
            image(tmp_path / "images" / s / f"{n}.jpg")
            label(tmp_path / "labels" / s / f"{n}.txt", "2 0.5 0.5 0.5 0.5\n")
    # the test split is a .txt list of image paths (relative to the list's folder)
    (tmp_path / "test.txt").write_text("images/test/s1.jpg\n./images/test/s2.jpg\n")
    (tmp_path / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: [images/val]\ntest: test.txt\nnames:\n  0: cat\n  2: dog\n")
    ds = load_dataset(tmp_path, "train")
    assert ds.classes == ["cat", "1", "dog"] and ds.split == "train"  # a gap in the ids is named by its index
    assert [r.image_id for r in ds.records] == ["t1", "t2", "t3"] and ds.records[0].labels.tolist() == [2]
    assert [r.image_id for r in load_dataset(tmp_path, "test")] == ["s1", "s2"]
    assert len(load_dataset(tmp_path, "trainval")) == 4  # train + val, VOC's name (rcnn train's default)
    assert len(load_dataset(tmp_path)) == 6 and load_dataset(tmp_path).issues == []
    with pytest.raises(ValueError, match=r"unknown split 'nope'.*\['test', 'train', 'trainval', 'val'\]"):
        load_dataset(tmp_path, "nope")
    # the yaml file itself is a dataset path too; names as a list
    (tmp_path / "other.yaml").write_text("train: images/train\nnames: [a, b, c]\n")
    assert load_dataset(tmp_path / "other.yaml", "train").classes == ["a", "b", "c"]


def test_roboflow_export_layout(tmp_path):
    # data.yaml beside train/images, valid/images; entries written as ../train/images
    image(tmp_path / "train" / "images" / "x.jpg")
    label(tmp_path / "train" / "labels" / "x.txt", "0 0.5 0.5 1 1\n")
    image(tmp_path / "valid" / "images" / "y.jpg")
    label(tmp_path / "valid" / "labels" / "y.txt", "0 0.5 0.5 1 1\n")
    (tmp_path / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                        "nc: 1\nnames: ['cell']\n")
    ds = load_dataset(tmp_path, "val")
    assert [r.image_id for r in ds] == ["y"] and np.allclose(ds.records[0].boxes, [[0, 0, 100, 50]])
    with pytest.raises(FileNotFoundError, match=r"data\.yaml: test: \.\./test/images not found"):
        load_dataset(tmp_path, "test")
    all_ = load_dataset(tmp_path)
    assert len(all_) == 2 and [i.action for i in all_.issues] == ["ignored split entry"]


def test_split_subfolders_without_yaml_splits(tmp_path):
    image(tmp_path / "images" / "train" / "a.jpg")
    image(tmp_path / "images" / "val" / "a.jpg")  # the same stem in two splits: ids keep them apart
    label(tmp_path / "labels" / "train" / "a.txt", "0 0.5 0.5 0.5 0.5\n")
    label(tmp_path / "labels" / "val" / "a.txt", "1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    ds = load_dataset(tmp_path, "val")
    assert [r.image_id for r in ds] == ["images/val/a.jpg"] and ds.records[0].labels.tolist() == [1]
    assert sorted(r.image_id for r in load_dataset(tmp_path)) == ["images/train/a.jpg", "images/val/a.jpg"]


def test_bad_input_issues(tmp_path):
    image(tmp_path / "images" / "a.jpg", (100, 50))
    image(tmp_path / "images" / "nolabel.jpg")
    label(tmp_path / "labels" / "a.txt", "\n".join([
        "0 0.5 0.5 0.2 0.4",      # 1 fine
        "5 0.5 0.5 0.2 0.2",      # 2 class index out of range
        "0 0.95 0.5 0.2 0.2",     # 3 reaches past the right edge: clipped to [85, 20, 100, 30]
        "0 1.5 0.5 0.2 0.2",      # 4 entirely outside: dropped
        "0 0.5 0.5 0 0.2",        # 5 zero width: dropped
        "0 0.5 0.5",              # 6 malformed: too few numbers
        "cat 0.5 0.5 0.2 0.2",    # 7 malformed: not a number
        "0 nan 0.5 0.2 0.2",      # 8 malformed: not finite
        "1.5 0.5 0.5 0.2 0.2",    # 9 class not an integer
        "1 0.1 0.1 0.3 0.1 0.3 0.5",  # 10 a polygon: its bounds [10, 5, 30, 25]
    ]) + "\n")
    label(tmp_path / "labels" / "orphan.txt", "0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "labels" / "classes.txt").write_text("cat\ndog\n")  # LabelImg writes it here
    ds = load_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    a = next(r for r in ds if r.image_id == "a")
    assert np.allclose(a.boxes, [[40, 15, 60, 35], [85, 20, 100, 30], [10, 5, 30, 25]])
    assert a.labels.tolist() == [0, 0, 1]
    assert len(next(r for r in ds if r.image_id == "nolabel").boxes) == 0
    lab = str(tmp_path / "labels" / "a.txt")
    acts = by_action(ds)
    assert sorted(acts["dropped object"]) == [f"{lab}:{n}" for n in (2, 6, 7, 8, 9)]
    assert acts["clipped box"] == [f"{lab}:3"] and sorted(acts["dropped box"]) == [f"{lab}:4", f"{lab}:5"]
    assert acts["kept image without objects"] == [str(tmp_path / "images" / "nolabel.jpg")]
    assert acts["ignored label file"] == [str(tmp_path / "labels" / "orphan.txt")]
    assert ds.annotated_objects == 10 and ds.num_objects == 3
    assert all("\n" not in str(i) for i in ds.issues)
    assert "class index 5 outside the 2 classes 0..1" in str(next(i for i in ds.issues if i.file.endswith(":2")))


def test_no_class_names_and_bad_yaml(tmp_path):
    image(tmp_path / "images" / "a.jpg")
    label(tmp_path / "labels" / "a.txt", "3 0.5 0.5 0.2 0.2\n")
    ds = load_dataset(tmp_path)
    assert ds.classes == ["0", "1", "2", "3"] and [i.action for i in ds.issues] == ["named classes by index"]
    (tmp_path / "data.yaml").write_text("names: [a, b\n")
    with pytest.raises(AnnotationError, match=r"data\.yaml: not a readable YAML file"):
        load_dataset(tmp_path)
    (tmp_path / "data.yaml").write_text("names: {x: a}\n")
    with pytest.raises(AnnotationError, match="class indices"):
        load_dataset(tmp_path)
    (tmp_path / "data.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")  # safe_load refuses
    with pytest.raises(AnnotationError):
        load_dataset(tmp_path)


def test_exif_oriented_size_and_unreadable_image(tmp_path):
    image(tmp_path / "images" / "r.jpg", (100, 50), exif_orientation=6)  # displayed 50 wide, 100 high
    label(tmp_path / "labels" / "r.txt", "0 0.5 0.5 1 1\n")
    (tmp_path / "images" / "bad.jpg").write_text("not an image")
    label(tmp_path / "labels" / "bad.txt", "0 0.5 0.5 1 1\n")
    ds = read_yolo(tmp_path, classes=["x"])
    r = ds.records[0]
    assert [x.image_id for x in ds] == ["r"] and (r.width, r.height) == (50, 100)
    assert np.allclose(r.boxes, [[0, 0, 50, 100]])
    assert [i.action for i in ds.issues] == ["dropped image"] and "bad.jpg" in str(ds.issues[0])


def test_bccd_as_yolo_matches_voc(tmp_path):
    """BCCD written out as YOLO labels reads back to the VOC reader's boxes."""
    voc = load_dataset(data_path("BCCD"), "test")
    root = tmp_path / "bccd-yolo"
    for r in voc.records:
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / r.path.name).symlink_to(r.path)
        b = r.boxes.astype(np.float64)
        cx, cy = (b[:, 0] + b[:, 2]) / 2 / r.width, (b[:, 1] + b[:, 3]) / 2 / r.height
        w, h = (b[:, 2] - b[:, 0]) / r.width, (b[:, 3] - b[:, 1]) / r.height
        label(root / "labels" / f"{r.path.stem}.txt",
              "".join(f"{c} {x:.6f} {y:.6f} {ww:.6f} {hh:.6f}\n" for c, x, y, ww, hh in zip(r.labels, cx, cy, w, h, strict=True)))
    (root / "data.yaml").write_text("names: [" + ", ".join(voc.classes) + "]\n")
    ds = load_dataset(root)
    assert ds.format == "yolo" and ds.classes == voc.classes and len(ds) == len(voc) and ds.issues == []
    by_id = {r.image_id: r for r in ds}
    for r in voc.records:
        y = by_id[r.image_id]
        assert y.labels.tolist() == r.labels.tolist() and np.allclose(y.boxes, r.boxes, atol=1e-2)


def test_cli_info_yolo_with_val_fraction(tmp_path):
    from typer.testing import CliRunner

    from rcnn.cli import app

    for i in range(10):
        image(tmp_path / "images" / "train" / f"im{i}.jpg")
        label(tmp_path / "labels" / "train" / f"im{i}.txt", "0 0.5 0.5 0.2 0.2\n" * (1 + i % 2))
    label(tmp_path / "labels" / "train" / "im0.txt", "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cell]\n")
    r = CliRunner().invoke(app, ["info", str(tmp_path), "--split", "train", "--val-fraction", "0.3"])
    assert r.exit_code == 0, r.output
    assert "(yolo, split train)" in r.output and "images: 10" in r.output
    assert "train-train 7 images" in r.output and "train-val 3 images" in r.output
    assert "im0.txt:2: class index 7 outside the 1 classes 0..0" in r.output
    r = CliRunner().invoke(app, ["info", str(tmp_path), "--split", "train", "--val-fraction", "0.01"])
    assert r.exit_code == 2 and "leaves no validation image" in r.output
