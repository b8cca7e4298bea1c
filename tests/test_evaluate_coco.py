"""COCO metrics (pycocotools COCOeval on an in-memory ground truth): hand-computed cases,
difficult objects ignored, quiet stdout, and the CLI's JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import data_path
from rcnn.cli import app
from rcnn.data import Dataset, ImageRecord, load_dataset
from rcnn.evaluate import Detections, coco_metrics, ground_truth_as_detections, write_coco_results


def rec(image_id, boxes, labels, difficult=None, size=200):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    d = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult, bool)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), size, size, boxes, np.array(labels, np.int64), d)


def dets(rows):
    """rows: (image_id, box, score, label)"""
    if not rows:
        return Detections.empty()
    return Detections(np.array([r[0] for r in rows], dtype=object), np.array([r[1] for r in rows], np.float32),
                      np.array([r[2] for r in rows], np.float32), np.array([r[3] for r in rows], np.int64))


SMALL, MEDIUM = [0, 0, 10, 10], [50, 50, 100, 100]  # areas 100 (< 32²) and 2500 (32²..96²)


def test_perfect_detections_score_one(capsys):
    ds = Dataset(Path("."), "test", ["a", "b"], [rec("1", [SMALL, MEDIUM], [0, 1]), rec("2", [MEDIUM], [0])])
    m = coco_metrics(ds, ground_truth_as_detections(ds))
    assert (m.ap, m.ap50, m.ap75, m.ap_small, m.ap_medium) == pytest.approx((1, 1, 1, 1, 1))
    assert math.isnan(m.ap_large) and m.as_dict()["APl"] is None  # no large object: undefined, not 0
    assert (m.images, m.detections) == (2, 3)
    assert capsys.readouterr().out == ""  # pycocotools' "creating index..." etc. swallowed


def test_one_box_at_iou_062():
    # gt [0,0,10,10], det [0,0,10,6.2]: IoU 0.62 -> a hit at IoU 0.50, 0.55, 0.60 of the 10 thresholds
    ds = Dataset(Path("."), "test", ["a"], [rec("1", [SMALL], [0])])
    m = coco_metrics(ds, dets([("1", [0, 0, 10, 6.2], 0.9, 0)]))
    assert m.ap50 == pytest.approx(1.0) and m.ap75 == pytest.approx(0.0)
    assert m.ap == pytest.approx(0.3) and m.ap_small == pytest.approx(0.3)
    assert math.isnan(m.ap_medium) and "AP50 1.000 · AP75 0.000" in m.line()


def test_difficult_objects_are_ignored_and_fps_count():
    ds = Dataset(Path("."), "test", ["a"], [rec("1", [SMALL, MEDIUM], [0, 0], [False, True])])
    # the higher-scored detection hits the difficult object: ignored, so AP stays 1
    assert coco_metrics(ds, dets([("1", MEDIUM, 0.95, 0), ("1", SMALL, 0.9, 0)])).ap == pytest.approx(1.0)
    # a false positive scored above the hit halves the precision: 101-point AP = 0.5
    m = coco_metrics(ds, dets([("1", [150, 150, 160, 160], 0.95, 0), ("1", SMALL, 0.9, 0)]))
    assert m.ap50 == pytest.approx(0.5)


def test_no_detections_and_foreign_labels():
    ds = Dataset(Path("."), "test", ["a", "b"], [rec("1", [SMALL], [0])])
    m = coco_metrics(ds, Detections.empty())
    assert m.ap == 0.0 and m.detections == 0
    # labels index a model's classes, matched by name: the model has no "a", so only "b" is
    # averaged, and "b" has no ground truth here: undefined, not 0
    m = coco_metrics(ds, dets([("1", SMALL, 0.9, 0)]), det_classes=["b", "zebra"])
    assert math.isnan(m.ap) and m.detections == 1


def test_det_classes_remap():
    ds = Dataset(Path("."), "test", ["a", "b"], [rec("1", [SMALL], [1])])
    m = coco_metrics(ds, dets([("1", SMALL, 0.9, 1), ("9", SMALL, 0.9, 1)]), det_classes=["zebra", "b", "a"])
    assert m.ap == pytest.approx(1.0) and m.detections == 1  # image "9" is not in the dataset


def test_voc_sample_perfect_and_cli(tmp_path):
    root = data_path("VOC2007-test-sample")
    ds = load_dataset(root, "test")
    assert coco_metrics(ds, ground_truth_as_detections(ds)).ap == pytest.approx(1.0)
    d = ground_truth_as_detections(ds)
    d = Detections(d.image_ids, d.boxes + np.float32([0, 0, 0, 4]), d.scores, d.labels)  # taller: lower IoU
    write_coco_results(d, list(range(1, 21)), tmp_path / "dets.json")
    out = CliRunner().invoke(app, ["evaluate-dets", str(tmp_path / "dets.json"), str(root), "--split", "test",
                                   "-o", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert "COCO mAP@[.5:.95]" in out.output and "AP50 1.000" in out.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["mAP"] == pytest.approx(1.0) and doc["coco"]["AP50"] == pytest.approx(1.0)
    assert 0.3 < doc["coco"]["mAP@[.5:.95]"] < 1.0 and doc["coco"]["AP75"] < 1.0


def test_cli_evaluate_writes_coco_metrics(tmp_path):
    from test_cli_detect import _hog_model, _tiny_voc

    data = _tiny_voc(tmp_path / "voc")
    model = _hog_model(tmp_path)  # untrained random SVMs: the numbers are low, the keys are what counts
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", str(model), str(data), "--split", "test", "-o", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    assert "COCO mAP@[.5:.95]" in r.output
    coco = json.loads((out / "results.json").read_text())["coco"]
    assert {"mAP@[.5:.95]", "AP50", "AP75", "APs", "APm", "APl"} <= set(coco) and coco["images"] == 2
