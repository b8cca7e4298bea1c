"""``rcnn detect`` / ``rcnn evaluate`` / ``rcnn train`` on small real inputs and bad input."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rcnn.cli import app
from rcnn.detect import FORMAT_VERSION, RCNNModel
from rcnn.sources import hog_features

runner = CliRunner()


def _hog_model(tmp_path, **kw):
    d = hog_features(np.zeros((8, 8, 3), np.uint8), np.array([[0, 0, 8, 8]], np.float32)).shape[1]
    rng = np.random.default_rng(0)
    m = RCNNModel(classes=["a", "b"], W=rng.normal(size=(d, 2)).astype(np.float32) * 0.1, b=np.array([0.5, -0.2], np.float32),
                  trained=np.ones(2, bool), feature_scale=1.0, backbone="hog", weights_hash="none", layer="hog", mode="warp",
                  feature_options={}, proposal_options={"mode": "fast", "resize_width": 0}, **kw)
    return m.save(tmp_path / "hog.rcnn")


def _image(tmp_path, name="img.png"):
    rng = np.random.default_rng(1)
    a = np.full((64, 80, 3), 200, np.uint8)
    a[10:40, 15:50] = (40, 60, 200)
    a[45:60, 55:75] = (220, 40, 40)
    a = (a.astype(int) + rng.integers(-10, 10, a.shape)).clip(0, 255).astype(np.uint8)
    p = tmp_path / name
    Image.fromarray(a).save(p)
    return p


def test_detect_writes_coco_comp4_and_png(tmp_path):
    model = _hog_model(tmp_path)
    img = _image(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["detect", str(model), str(img), "-o", str(out), "--threshold", "-100", "--top-k", "5"])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "detections_coco.json").read_text())
    assert 0 < len(rows) <= 5 and {"image_id", "category_id", "bbox", "score"} <= set(rows[0])
    assert (out / "comp4_det_detect_a.txt").exists() and (out / "comp4_det_detect_b.txt").exists()
    png = np.asarray(Image.open(out / "img.png"))
    assert png.shape == (64, 80, 3)
    assert not np.array_equal(png, np.asarray(Image.open(img)))  # boxes were drawn


def test_detect_bad_inputs(tmp_path):
    junk = tmp_path / "junk.rcnn"
    junk.write_text("nope")
    img = _image(tmp_path)
    r = runner.invoke(app, ["detect", str(junk), str(img), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not an rcnn model file" in r.output
    m = RCNNModel.load(_hog_model(tmp_path))
    m.format_version = FORMAT_VERSION + 1
    m.save(tmp_path / "v2.rcnn")
    r = runner.invoke(app, ["detect", str(tmp_path / "v2.rcnn"), str(img), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "format version" in r.output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    r = runner.invoke(app, ["detect", str(_hog_model(tmp_path)), str(bad), str(img), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "bad.jpg" in r.output and "1 image(s) could not be read" in r.output
    assert (tmp_path / "o" / "img.png").exists()  # the good image was still processed


def test_model_from_other_weights_is_refused(tmp_path):
    m = RCNNModel.load(_hog_model(tmp_path))
    m.backbone, m.weights_hash, m.layer, m.mode = "squeezenet1_1", "0" * 64, "fc7", "shared"
    m.feature_options = {"backbone": "squeezenet1_1", "layer": "fc7", "mode": "shared"}
    m.W = np.zeros((512, 2), np.float32)
    m.save(tmp_path / "sq.rcnn")
    r = runner.invoke(app, ["detect", str(tmp_path / "sq.rcnn"), str(_image(tmp_path)), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "weights" in r.output


def test_evaluate_bad_metric_and_train_bad_layer(tmp_path):
    r = runner.invoke(app, ["evaluate", str(_hog_model(tmp_path)), str(tmp_path), "--metric", "coco"])
    assert r.exit_code == 2 and "--metric" in r.output


def _tiny_voc(root, n=6):
    """A tiny VOC-layout dataset of synthetic images: a dark disc ('a') and a bright bar ('b')."""
    import cv2

    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        img = np.full((72, 96, 3), 190, np.uint8)
        cx, cy = int(rng.integers(15, 40)), int(rng.integers(15, 55))
        cv2.circle(img, (cx, cy), 12, (40, 40, 140), -1)
        bx = int(rng.integers(55, 75))
        img[10:60, bx : bx + 10] = (250, 250, 60)
        img = (img.astype(int) + rng.integers(-8, 8, img.shape)).clip(0, 255).astype(np.uint8)
        iid = f"{i:04d}"
        Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.jpg", quality=95)
        objs = [("a", cx - 12 + 1, cy - 12 + 1, cx + 12, cy + 12), ("b", bx + 1, 11, bx + 10, 60)]
        xml = "<annotation><size><width>96</width><height>72</height><depth>3</depth></size>" + "".join(
            f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
            f"<xmax>{x}</xmax><ymax>{y}</ymax></bndbox></object>" for c, a, b, x, y in objs) + "</annotation>"
        (root / "Annotations" / f"{iid}.xml").write_text(xml)
        ids.append(iid)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids[: n - 2]) + "\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids[n - 2 :]) + "\n")
    return root


@pytest.mark.slow
def test_train_then_evaluate_hog_end_to_end(tmp_path):
    data = _tiny_voc(tmp_path / "voc")
    model = tmp_path / "m.rcnn"
    r = runner.invoke(app, ["train", str(data), "--backbone", "hog", "-o", str(model), "--proposals", "fast",
                            "--resize-width", "0", "--min-size", "0", "-j", "1", "--C", "0.1"])
    assert r.exit_code == 0, r.output
    m = RCNNModel.load(model)
    assert m.backbone == "hog" and m.training["images"] == 4 and m.trained.all()
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(model), str(data), "--split", "test", "-o", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res["classes"]) == {"a", "b"} and res["mAP"] is not None
    assert (out / "pr_a.png").exists() and (out / "comp4_det_test_b.txt").exists()


def test_detect_without_model_uses_imagenet_demo_detector(tmp_path):
    """`rcnn detect IMAGE...` (no model) runs the zero-training ImageNet-vocabulary detector."""
    import json

    from skimage import data as skdata
    from typer.testing import CliRunner

    from rcnn.cli import app
    from rcnn.visualize import save_png

    save_png(tmp_path / "chelsea.png", skdata.chelsea())
    out = CliRunner().invoke(app, ["detect", str(tmp_path / "chelsea.png"), "-o", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert "cat" in out.output
    rows = json.loads((tmp_path / "out" / "detections_coco.json").read_text())
    assert rows and (tmp_path / "out" / "chelsea.png").is_file()
    # one comp4 file per class that was detected, not one per vocabulary name
    files = sorted(f.name for f in (tmp_path / "out").glob("comp4_det_detect_*.txt"))
    assert "comp4_det_detect_cat.txt" in files and len(files) == len({r["category_id"] for r in rows})


class _FakeImagenet:
    """Stands in for rcnn.demo.ImagenetDetector: records its config, finds one 'tv monitor'."""

    seen: ClassVar[list] = []

    def __init__(self, vocabulary=None, config=None, heads=(), **parts):
        self.config = config
        self.class_names = ["cat", "tv monitor", "teddy bear"]
        _FakeImagenet.seen.append(config)

    def __call__(self, image):
        return np.array([[1, 2, 30, 40]], np.float32), np.array([0.7], np.float32), np.array([1])


def test_detect_imagenet_honours_threshold_and_max_detections(tmp_path, monkeypatch):
    import rcnn.demo

    monkeypatch.setattr(rcnn.demo, "ImagenetDetector", _FakeImagenet)
    img, out = _image(tmp_path), tmp_path / "out"
    r = runner.invoke(app, ["detect", "imagenet", str(img), "-o", str(out), "--threshold", "0.05", "--top-k", "3"])
    assert r.exit_code == 0, r.output
    cfg = _FakeImagenet.seen[-1]
    assert cfg.threshold == 0.05 and cfg.max_detections == 3
    # only the detected class gets a comp4 file, named without spaces; it reads back by class name
    assert sorted(f.name for f in out.glob("comp4*")) == ["comp4_det_detect_tv_monitor.txt"]
    from rcnn.evaluate import read_comp4

    back = read_comp4(out, ["cat", "tv monitor", "teddy bear"])
    assert back.labels.tolist() == [1] and back.image_ids.tolist() == ["img"]
    # without the options: the detector's own defaults
    r = runner.invoke(app, ["detect", str(img), "-o", str(out)])
    assert r.exit_code == 0 and _FakeImagenet.seen[-1].threshold == 0.5 and _FakeImagenet.seen[-1].max_detections == 10


@pytest.mark.parametrize("opt", [["--flip"], ["--relocalize", "1"], ["--engine", "ray"], ["--no-bbox-reg"],
                                 ["--workers", "2"], ["--address", "auto"], ["--engine", "local"]])
def test_detect_imagenet_refuses_model_options(tmp_path, opt):
    r = runner.invoke(app, ["detect", "imagenet", str(_image(tmp_path)), "-o", str(tmp_path / "o"), *opt])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and opt[0] in lines[0] and "trained model" in lines[0]
    assert not (tmp_path / "o").exists()  # refused before any work


def test_detect_imagenet_bad_threshold(tmp_path):
    r = runner.invoke(app, ["detect", str(_image(tmp_path)), "-o", str(tmp_path / "o"), "--threshold", "-0.5"])
    assert r.exit_code == 2 and "threshold" in r.output and not (tmp_path / "o").exists()


def test_relocalize_needs_a_box_regressor(tmp_path):
    r = runner.invoke(app, ["detect", str(_hog_model(tmp_path)), str(_image(tmp_path)), "-o", str(tmp_path / "o"),
                            "--relocalize", "1"])
    assert r.exit_code == 2 and "box regressor" in r.output


def test_train_and_detect_with_a_hypercolumn_layer(tmp_path):
    """`--layer pool5+fire5`: the joined taps train, save per-block scales, and detect on a new image."""
    data = _tiny_voc(tmp_path / "voc")
    model = tmp_path / "m.rcnn"
    common = ["--proposals", "fast", "--resize-width", "0", "--min-size", "0", "-j", "1"]
    r = runner.invoke(app, ["train", str(data), "--backbone", "squeezenet1_1", "--layer", "pool5+conv9", "--mode",
                            "shared", "-o", str(model), *common])
    assert r.exit_code == 2 and "unknown layer(s) ['conv9']" in r.output, r.output
    r = runner.invoke(app, ["train", str(data), "--backbone", "squeezenet1_1", "--layer", "pool5+fire5", "--mode",
                            "shared", "--grid", "2", "-o", str(model), *common])
    assert r.exit_code == 0, r.output
    m = RCNNModel.load(model)
    assert m.layer == "pool5+fire5" and m.W.shape[0] == 512 * 4 + 256 * 4
    blocks = m.metadata()["feature_scale"]
    assert [d for d, _ in blocks] == [512 * 4, 256 * 4] and blocks[0][1] != blocks[1][1]
    out = tmp_path / "det"
    img = data / "JPEGImages" / "0005.jpg"
    r = runner.invoke(app, ["detect", str(model), str(img), "-o", str(out), "--threshold", "-10"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "detections_coco.json").read_text())
