"""rcnn.zoo and `rcnn models` / `rcnn detect NAME`: the shipped detectors, their files and manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from rcnn import zoo
from rcnn.cache import file_sha256
from rcnn.cli import app

runner = CliRunner()


def test_manifest_entries_are_complete_and_files_match():
    m = zoo.manifest()
    assert {"imagenet", "person"} <= set(m)
    for e in m.values():
        assert e.kind in ("imagenet", "rcnn") and e.classes and e.trained_on and e.recipe and e.licence
        if e.kind == "rcnn":
            assert e.path.is_file() and file_sha256(e.path) == e.sha256
            assert e.path.stat().st_size < 5 * 2**20  # weights only: no backbone copy
    assert "research" in m["person"].licence.lower()  # Penn-Fudan: research use (its readme)
    assert m["person"].classes == ["person"] and len(m["person"].calibration["platt"]) == 2
    assert {"val", "test"} <= set(m["person"].numbers)
    assert m["imagenet"].heads == ["person"] and "person" in m["imagenet"].classes


def test_person_model_references_the_packaged_backbone_by_hash():
    from rcnn.detect import RCNNModel
    from rcnn.features import FeatureConfig

    model = zoo.load("person")
    assert isinstance(model, RCNNModel) and model.classes == ["person"] and model.bbox_reg is not None
    assert model.backbone == "squeezenet1_1" and model.layer == "pool5+fire5"
    assert model.weights_hash == FeatureConfig(backbone="squeezenet1_1").weights_hash()
    assert model.feature_options.get("weights") is None  # the packaged weights, not a copied file


def test_unknown_name_and_tampered_file(tmp_path, monkeypatch):
    with pytest.raises(zoo.ZooError, match="shipped: imagenet, person"):
        zoo.info("nope")
    # a shipped file that does not match the manifest's sha256 is refused in one line
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.ZOO_DIR, copy)
    with open(copy / "person.rcnn", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    monkeypatch.setattr(zoo, "ZOO_DIR", copy)
    monkeypatch.setattr(zoo, "MANIFEST_PATH", copy / "manifest.json")
    with pytest.raises(zoo.ZooError, match="sha256"):
        zoo.load("person")
    (copy / "manifest.json").write_text(json.dumps({"manifest_version": 99, "models": {}}))
    with pytest.raises(zoo.ZooError, match="manifest version 99"):
        zoo.manifest()


def test_rcnn_models_lists_every_shipped_detector():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    for name in zoo.names():
        assert name in r.output
    assert "Penn-Fudan" in r.output


def test_imagenet_detector_carries_the_person_head():
    det = zoo.load("imagenet")
    assert det.class_names[-1] == "person" and len(det.heads) == 1
    assert det.class_names[:-1] == list(det.vocabulary.names)
    bare = zoo.load("imagenet", heads=False)
    assert "person" not in bare.class_names


def test_detect_with_the_shipped_person_model(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(img)
    r = runner.invoke(app, ["detect", "person", str(img), "-o", str(tmp_path / "out"), "--no-png"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "detections_coco.json").read_text()) is not None
    r = runner.invoke(app, ["detect", "no-such-model", str(img), "-o", str(tmp_path / "out2")])
    assert r.exit_code == 2 and "no-such-model" in r.output


def test_rcnn_load_takes_a_shipped_name():
    import rcnn
    from rcnn.pipeline import Detector

    person = rcnn.load("person")
    assert isinstance(person, Detector) and person.classes == ["person"]
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    dets = person.detect(img)
    assert dets.boxes.shape[1:] == (4,) and len(dets.scores) == len(dets.labels)
    assert rcnn.load("bccd").classes == ["Platelets", "RBC", "WBC"]
    assert zoo.info("bccd").licence == "BCCD: MIT" and zoo.info("bccd").numbers["test"]["value"] > 0
    with pytest.raises(Exception, match="no-such-model"):
        rcnn.load("no-such-model")
