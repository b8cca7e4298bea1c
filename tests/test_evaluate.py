"""VOC AP exactly as the devkit: hand-computed cases, file formats, pycocotools cross-check."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import data_path
from rcnn.cli import app
from rcnn.data import Dataset, ImageRecord, load_dataset
from rcnn.evaluate import (
    Detections,
    evaluate_detections,
    ground_truth_as_detections,
    read_coco_results,
    read_comp4,
    voc_ap,
    write_coco_gt,
    write_coco_results,
    write_comp4,
)


def rec(image_id, boxes, labels, difficult=None):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    d = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult, bool)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), 100, 100, boxes, np.array(labels, np.int64), d)


def dets(rows):
    """rows: (image_id, box, score, label)"""
    return Detections(np.array([r[0] for r in rows], dtype=object), np.array([r[1] for r in rows], np.float32),
                      np.array([r[2] for r in rows], np.float32), np.array([r[3] for r in rows], np.int64))


A, B, C, D = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [70, 70, 80, 80]


@pytest.fixture
def known_case():
    """3 positives + 1 difficult. In score order: TP, FP (empty area), TP, duplicate (FP),
    match to the difficult object (ignored), TP. Hand-computed:
    recall 1/3,1/3,2/3,2/3,(2/3),1 ; precision 1,1/2,2/3,1/2,(1/2),3/5.
    VOC07 = (4*1 + 3*2/3 + 4*3/5)/11 = 8.4/11 ; VOC2010 area = (1 + 2/3 + 3/5)/3 = 34/45."""
    ds = Dataset(Path("."), "test", ["cat"], [rec("1", [A, B], [0, 0]), rec("2", [C, D], [0, 0], [False, True])])
    d = dets([("1", A, 0.9, 0), ("1", [40, 40, 45, 45], 0.8, 0), ("1", B, 0.7, 0), ("1", A, 0.6, 0),
              ("2", D, 0.5, 0), ("2", C, 0.4, 0)])
    return ds, d


def test_hand_computed_pr_curve(known_case):
    ds, d = known_case
    r07 = evaluate_detections(ds, d, "voc07").classes[0]
    assert r07.npos == 3
    assert r07.tp.tolist() == [True, False, True, False, False, True]
    assert r07.fp.tolist() == [False, True, False, True, False, False]  # difficult match: neither
    assert r07.ap == pytest.approx(8.4 / 11)
    assert evaluate_detections(ds, d, "voc2010").classes[0].ap == pytest.approx(34 / 45)


def test_voc_ap_edge_cases():
    assert voc_ap(np.array([1.0]), np.array([1.0]), "voc07") == pytest.approx(1.0)
    assert voc_ap(np.array([]), np.array([]), "voc2010") == 0.0
    with pytest.raises(ValueError):
        voc_ap(np.array([1.0]), np.array([1.0]), "coco")


def test_iou_threshold_is_inclusive_and_uses_best_gt():
    # det [0,0,10,5] vs gt [0,0,10,10]: IoU exactly 0.5 -> TP (ovmax >= 0.5)
    ds = Dataset(Path("."), None, ["a"], [rec("1", [[0, 0, 10, 10]], [0])])
    assert evaluate_detections(ds, dets([("1", [0, 0, 10, 5], 1.0, 0)])).classes[0].ap == pytest.approx(1.0)


def test_class_without_positives_is_undefined(known_case):
    ds, d = known_case
    ds.classes = ["cat", "dog"]
    res = evaluate_detections(ds, d)
    assert np.isnan(res.classes[1].ap) and res.mean_ap == pytest.approx(8.4 / 11)
    assert res.as_dict()["classes"]["dog"]["ap"] is None


def test_file_formats_roundtrip(tmp_path, known_case):
    ds, d = known_case
    write_comp4(d, ds.classes, tmp_path / "comp4", "test")
    back = read_comp4(tmp_path / "comp4", ds.classes)
    assert np.allclose(back.boxes, d.boxes) and np.allclose(back.scores, d.scores)
    write_coco_results(d, [1], tmp_path / "res.json")
    back = read_coco_results(tmp_path / "res.json", ds)
    assert np.allclose(back.boxes, d.boxes) and list(back.image_ids) == list(d.image_ids)
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"bad\.json"):
        read_coco_results(tmp_path / "bad.json", ds)


def test_area_ap_matches_pycocotools(tmp_path):
    """Conventions coincide when GT boxes do not overlap (VOC's and COCO's matching agree),
    boxes are pixel-edge (no +1 on either side) and there are enough positives that COCO's
    101-point interpolation approximates the area under the envelope."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(1)
    records, rows = [], []
    for i in range(40):  # 40 images x 5 non-overlapping objects = 200 positives
        gts = [[20 * k + 1, 10, 20 * k + 16, 40] for k in range(5)]
        records.append(rec(str(i + 1), gts, [0] * 5))
        for g in gts:
            if rng.uniform() < 0.8:  # a jittered hit with IoU well above 0.5
                rows.append((str(i + 1), np.add(g, rng.uniform(-1.5, 1.5, 4)).tolist(), rng.uniform(0.3, 1), 0))
        for _ in range(3):  # background false positives
            x = rng.uniform(0, 60)
            rows.append((str(i + 1), [x, 60, x + 15, 90], rng.uniform(0, 0.8), 0))
    ds = Dataset(Path("."), None, ["thing"], records)
    d = dets(rows)
    ours = evaluate_detections(ds, d, "voc2010").mean_ap
    write_coco_gt(ds, tmp_path / "gt.json")
    write_coco_results(d, [1], tmp_path / "res.json", {r.image_id: int(r.image_id) for r in records})
    gt = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "res.json")), "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
    ev.params.maxDets = [1000]
    ev.evaluate()
    ev.accumulate()
    coco_ap = float(ev.eval["precision"][0, :, 0, 0, 0].mean())
    assert 0.5 < ours < 0.95
    assert ours == pytest.approx(coco_ap, abs=0.01)


# ------------------------------------------------------------------------- real data


@pytest.mark.parametrize("name,split", [("VOC2007-test-sample", "test"), ("BCCD", "test")])
def test_ground_truth_scores_perfect(name, split, tmp_path):
    ds = load_dataset(data_path(name), split)
    gt = ground_truth_as_detections(ds)
    for metric in ("voc07", "voc2010"):
        res = evaluate_detections(ds, gt, metric)
        for c in res.classes:
            assert np.isnan(c.ap) if c.npos == 0 else c.ap == pytest.approx(1.0), c.name


def test_cli_info_and_evaluate_dets(tmp_path):
    root = data_path("VOC2007-test-sample")
    runner = CliRunner()
    out = runner.invoke(app, ["info", str(root), "--split", "test"])
    assert out.exit_code == 0, out.output
    assert "images: 19" in out.output and "81" in out.output
    ds = load_dataset(root, "test")
    write_coco_results(ground_truth_as_detections(ds), list(range(1, 21)), tmp_path / "gt_dets.json")
    out = runner.invoke(app, ["evaluate-dets", str(tmp_path / "gt_dets.json"), str(root), "--split", "test",
                              "--metric", "voc2010", "-o", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "r.json").read_text())["mAP"] == pytest.approx(1.0)
    out = runner.invoke(app, ["evaluate-dets", str(tmp_path / "nope.json"), str(root)])
    assert out.exit_code == 2


def test_cli_info_bccd_names_degenerate_boxes():
    out = CliRunner().invoke(app, ["info", str(data_path("BCCD"))])
    assert out.exit_code == 0
    assert "images: 364" in out.output and "4888" in out.output
    assert "BloodImage_00338" in out.output and "BloodImage_00343" in out.output
