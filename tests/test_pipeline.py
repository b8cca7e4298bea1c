"""rcnn.pipeline: the workflow API (train → detect → evaluate → save/load), recipes and sizes from the data."""

from __future__ import annotations

import numpy as np
import pytest

import rcnn
from rcnn.data import ImageRecord
from rcnn.pipeline import PRESETS, SHORT_SIDE_RANGE, TARGET_OBJECT_PX, data_geometry, recipe, resolve
from test_cli_detect import _tiny_voc


def _records(sizes, image=(640, 480)):
    """One record per object size (px, square boxes) in images of ``image`` (w, h)."""
    w, h = image
    return [ImageRecord(f"{i}", f"/x/{i}.jpg", w, h, np.array([[10, 10, 10 + s, 10 + s]], np.float32),
                        np.zeros(1, np.int64), np.zeros(1, bool)) for i, s in enumerate(sizes)]


def test_trunk_size_follows_the_objects_relative_size():
    """Small objects get a larger trunk image, large ones a smaller one; photos of any resolution
    with the same framing get the same trunk size; the bounds hold."""
    small = data_geometry(_records([40] * 9 + [100]))  # cells-like: ~1/12 of the shorter side
    large = data_geometry(_records([300] * 10))  # an animal filling most of the frame
    assert small.short_side > 480 > large.short_side
    assert small.short_side == min(SHORT_SIDE_RANGE[1], round(TARGET_OBJECT_PX / (40 / 480) / 32) * 32)
    hires = data_geometry(_records([1200] * 10, image=(4000, 3000)))  # same framing as 'large' (0.4 of the side)
    lores = data_geometry(_records([120] * 10, image=(400, 300)))
    assert hires.short_side == lores.short_side
    tiny = data_geometry(_records([4] * 10))
    assert tiny.short_side == SHORT_SIDE_RANGE[1] and tiny.min_size == 4.0
    assert data_geometry(_records([300] * 10)).min_size == 20.0  # large objects: the paper's 20 px
    with pytest.raises(ValueError, match="no objects"):
        data_geometry([])


def test_presets_and_overrides():
    paper = PRESETS["paper"]
    assert (paper.mode, paper.layer, paper.bbox_reg) == ("warp", "fc7", False)
    pc, fc, resolved = resolve(paper, _records([50] * 3))
    # the paper preset resolves to exactly the settings the faithful pipeline always used
    from rcnn.features import FeatureConfig
    from rcnn.proposals import ProposalConfig

    assert pc == ProposalConfig() and resolved == {}
    assert fc.key() == FeatureConfig(layer="fc7", mode="warp", with_gt=True).key()
    _, fc, resolved = resolve(PRESETS["default"], _records([50] * 3))
    assert fc.mode == "shared" and fc.short_side == resolved["short_side"]
    assert recipe("paper", layer="pool5").layer == "pool5"
    with pytest.raises(ValueError, match="unknown preset"):
        recipe("fastest")
    with pytest.raises(ValueError, match="unknown recipe setting"):
        recipe("default", colour="red")
    with pytest.raises(ValueError, match="needs box regression"):
        recipe("default", bbox_reg=False, relocalize=1)


def test_api_train_detect_evaluate_save_load(tmp_path):
    """The README's Python API, end to end on a tiny dataset with the default recipe."""
    from rcnn.data import load_image

    data = _tiny_voc(tmp_path / "voc", n=6)
    model = rcnn.train(data, split="trainval", workers=1, proposals="fast", resize_width=0, min_size=0)
    assert model.classes == ["a", "b"] and model.model.bbox_reg is not None
    assert model.recipe["name"] == "default" and model.recipe["resolved"]["short_side"] >= SHORT_SIDE_RANGE[0]
    image = load_image(data / "JPEGImages" / "0005.jpg")
    dets = model.detect(image)
    assert dets.boxes.shape[1] == 4 and len(dets.scores) == len(dets.labels) == len(dets.names)
    assert np.all(np.diff(dets.scores) <= 0)
    res = rcnn.evaluate(model, data, split="test")
    assert 0 <= res.map <= 1 + 1e-9 and set(res.per_class) == {"a", "b"} and "mAP@[.5:.95]" in res.coco
    model.save(tmp_path / "m.rcnn")
    again = rcnn.load(tmp_path / "m.rcnn")
    np.testing.assert_array_equal(again.detect(image).boxes, dets.boxes)
    assert rcnn.evaluate(again, data, split="test").map == res.map


@pytest.mark.slow
def test_train_with_finetuning_references_the_finetuned_net(tmp_path):
    """`finetune=N`: the network is fine-tuned first, written to net_path, and the model's features come from it."""
    data = _tiny_voc(tmp_path / "voc", n=6)
    net = tmp_path / "m.net.safetensors"
    model = rcnn.train(data, split="trainval", workers=1, proposals="fast", resize_width=0, min_size=0, finetune=2,
                       net_path=net)
    assert net.is_file() and model.model.feature_options["weights"] == str(net.resolve())
    from rcnn.backbones import SQUEEZENET_SHA256

    assert model.model.weights_hash != SQUEEZENET_SHA256 and model.recipe["finetune"] == 2


def _voc(root, images):
    """A VOC-layout dataset from ``[(image_id, (H,W,3) uint8, [(class, x1, y1, x2, y2) 0-based edges])]``,
    every image in ``trainval``."""
    from PIL import Image

    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for iid, img, objs in images:
        Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.jpg", quality=92)
        (root / "Annotations" / f"{iid}.xml").write_text(
            f"<annotation><size><width>{img.shape[1]}</width><height>{img.shape[0]}</height><depth>3</depth></size>"
            + "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{a + 1}</xmin><ymin>{b + 1}"
                      f"</ymin><xmax>{x}</xmax><ymax>{y}</ymax></bndbox></object>" for c, a, b, x, y in objs)
            + "</annotation>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{iid}\n" for iid, _, _ in images))
    return root


def test_default_recipe_on_a_100_px_and_a_4000_px_photo_and_a_class_with_one_example(tmp_path):
    """Awkward data a user has: images from 100 to 4000 px, a class with a single example, and a
    one-image dataset — each trains the default recipe and detects without an error."""
    import cv2

    from rcnn.data import load_dataset

    rng = np.random.default_rng(0)
    small = (np.full((75, 100, 3), 190) + rng.integers(-8, 8, (75, 100, 3))).clip(0, 255).astype(np.uint8)
    cv2.circle(small, (30, 35), 14, (40, 40, 140), -1)
    small[10:65, 70:80] = (250, 250, 60)
    large = np.full((3000, 4000, 3), 180, np.uint8)
    cv2.circle(large, (1500, 1400), 600, (40, 40, 140), -1)
    data = _voc(tmp_path / "voc", [("small", small, [("disc", 16, 21, 44, 49), ("bar", 70, 10, 80, 65)]),
                                   ("large", large, [("disc", 900, 800, 2100, 2000)])])
    model = rcnn.train(data, split="trainval", workers=1)
    assert model.classes == ["bar", "disc"] and model.model.trained.all()  # "bar": one example
    side = model.recipe["resolved"]["short_side"]
    assert SHORT_SIDE_RANGE[0] <= side <= SHORT_SIDE_RANGE[1]
    for img in (small, large):
        dets = model.detect(img)
        assert np.all(dets.boxes[:, 2:] <= np.array([img.shape[1], img.shape[0]]) + 1e-3)
    one = load_dataset(data, "trainval")
    one.records = one.records[:1]
    assert rcnn.train(one, None, workers=1).classes == ["bar", "disc"]


def test_relocalisation_reuses_the_trunk_maps_with_the_same_result(tmp_path, monkeypatch):
    """Iterative localisation re-scores boxes of the image the detector just saw: pooled from the
    trunk maps already computed, the detections equal those of a second trunk pass, and the trunk
    runs once."""
    from rcnn import features
    from rcnn.data import load_image

    data = _tiny_voc(tmp_path / "voc", n=6)
    model = rcnn.train(data, split="trainval", workers=1, proposals="fast", resize_width=0, min_size=0)
    assert model.recipe["relocalize"] == 1
    image = load_image(data / "JPEGImages" / "0005.jpg")
    calls = []
    real = features.trunk_maps
    monkeypatch.setattr(features, "trunk_maps", lambda *a, **k: calls.append(1) or real(*a, **k))
    reused = model.detect(image)
    assert len(calls) == 1
    from rcnn.detect import detect_image

    source = model.source()
    real_regions = source.image_regions

    def regions_then_forget(img):  # the same proposals and features, but no trunk maps kept
        out = real_regions(img)
        source._image_maps = None
        return out

    monkeypatch.setattr(source, "image_regions", regions_then_forget)
    boxes, scores, labels = detect_image(model.model, image, source, relocalize_rounds=1)
    assert len(calls) == 3  # the trunk ran again for the re-scored boxes
    np.testing.assert_array_equal(boxes, reused.boxes)
    np.testing.assert_array_equal(scores, reused.scores)
    np.testing.assert_array_equal(labels, reused.labels)


def test_a_voc_layout_dataset_of_one_voc_class_has_that_class_only(tmp_path):
    from rcnn.data import load_dataset

    img = np.full((60, 80, 3), 128, np.uint8)
    data = _voc(tmp_path / "people", [("p1", img, [("person", 10, 10, 40, 50)]), ("p2", img, [("person", 5, 5, 30, 40)])])
    assert load_dataset(data, "trainval").classes == ["person"]
