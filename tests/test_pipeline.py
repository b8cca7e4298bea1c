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
