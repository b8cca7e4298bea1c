"""Sensitivity analysis (normalized AP per object subset) on hand-built cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rcnn.analysis.sensitivity import (
    normalized_ap,
    object_characteristics,
    sensitivity,
    sensitivity_figure,
    subsets_figure,
)
from rcnn.data import ImageRecord
from rcnn.evaluate import Detections, voc_ap


def rec(image_id, boxes, labels, truncated=None, pose=None):
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), 1000, 1000, b, np.array(labels, np.int64), np.zeros(len(b), bool),
                       truncated=None if truncated is None else np.array(truncated, bool), pose=pose)


def test_normalized_ap_hand_computed():
    lab = np.array([1, -1, 1])
    # N = npos: P_n = P = [1, .5, 2/3], envelope [1, 2/3, 2/3] -> (1 + 2/3) / 2
    assert normalized_ap(lab, 2, 2) == pytest.approx((1 + 2 / 3) / 2)
    # N = 2 npos: tp_n = 2 tp -> P_n = [1, 2/3, 4/5], envelope [1, .8, .8] -> 0.9
    assert normalized_ap(lab, 2, 4) == pytest.approx(0.9)
    # ignored rows count for nothing
    assert normalized_ap(np.array([1, 0, -1, 0, 1]), 2, 2) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(normalized_ap(lab, 0, 2))


def test_normalized_ap_equals_voc2010_when_n_is_npos():
    rng = np.random.default_rng(1)
    lab = np.where(rng.random(40) < 0.4, 1, -1)
    npos = int((lab == 1).sum()) + 5
    tp, fp = np.cumsum(lab == 1), np.cumsum(lab == -1)
    assert normalized_ap(lab, npos, npos) == pytest.approx(voc_ap(tp / npos, tp / (tp + fp), "voc2010"))


def squares(n, c=0, x0=0):
    # n squares of areas (10k)^2, k = 1..n, side by side
    out, x = [], x0
    for k in range(1, n + 1):
        out.append([x, 0, x + 10 * k, 10 * k])
        x += 10 * k + 5
    return out


def test_area_percentiles_and_small_objects_missed():
    boxes = squares(10)
    r = rec("a", boxes, [0] * 10, truncated=[0] * 5 + [1] * 5)
    ch = {c.name: c for c in object_characteristics([r], 1)}
    assert set(ch) == {"area", "aspect", "truncation"}  # no pose, no occlusion annotated
    assert list(ch["area"].labels["a"]) == [0, 1, 1, 2, 2, 2, 2, 3, 3, 4]  # Hoiem's 10/30/70/90 %
    # the detector finds the 5 largest objects only (all exactly), plus 5 background FPs below
    rows = [(b, 0.9 - 0.01 * i) for i, b in enumerate(boxes[5:])] + [([900, 900, 950, 950], 0.1 - 0.01 * i) for i in range(5)]
    d = Detections(np.array(["a"] * 10, dtype=object), np.array([b for b, _ in rows], np.float32),
                   np.array([s for _, s in rows], np.float32), np.zeros(10, np.int64))
    s = sensitivity(["c"], [r], d, model="m", normalized_count=10)
    area = s.characteristics["area"]
    assert area["XS"] == 0 and area["S"] == 0 and area["XL"] == pytest.approx(1.0) and area["L"] == pytest.approx(1.0)
    assert s.extremes("area")[0] in ("XS", "S") and s.extremes("area")[2] in ("L", "XL")
    assert s.characteristics["truncation"]["none"] == 0 and s.characteristics["truncation"]["truncated"] == pytest.approx(1.0)
    # overall: 5 of 10 found first -> P_n = 1 over them -> 0.5
    assert s.overall == pytest.approx(0.5)
    assert s.counts["area"] == {"XS": 1, "S": 2, "M": 4, "L": 2, "XL": 1}


def test_viewpoint_from_pose(tmp_path):
    r1 = rec("a", [[0, 0, 10, 20], [50, 0, 70, 10]], [0, 0], pose=["Left", "Frontal"])
    r2 = rec("b", [[0, 0, 10, 20]], [0], pose=["Unspecified"])
    ch = {c.name: c for c in object_characteristics([r1, r2], 1)}
    assert ch["viewpoint"].subsets == ["Frontal", "Left"]
    assert list(ch["viewpoint"].labels["b"]) == [-1]
    d = Detections(np.array(["a"], dtype=object), np.array([[0, 0, 10, 20]], np.float32), np.ones(1, np.float32), np.zeros(1, np.int64))
    s1 = sensitivity(["c"], [r1, r2], d, model="one")
    s2 = sensitivity(["c"], [r1, r2], Detections.empty(), model="none")
    assert s1.characteristics["viewpoint"]["Left"] == pytest.approx(1.0)
    assert s1.characteristics["viewpoint"]["Frontal"] == 0
    p = sensitivity_figure([s1, s2], tmp_path / "s.png")
    assert p.stat().st_size > 1000
    assert subsets_figure(s1, tmp_path / "d.png").stat().st_size > 1000
    assert s1.as_dict()["characteristics"]["viewpoint"]["highest"] == "Left"
