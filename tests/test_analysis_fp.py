"""False-positive analysis on hand-built cases whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rcnn.analysis.fp import (
    BG,
    FP_TYPES,
    IGNORED,
    LOC,
    OTH,
    SIM,
    TP,
    analyze_false_positives,
    coco101_ap,
    dap_figure,
    default_ticks,
    fp_figure,
    parse_groups,
)
from rcnn.data import ImageRecord
from rcnn.evaluate import Detections, evaluate_detections


def rec(image_id: str, boxes, labels, difficult=None, size=(500, 500)) -> ImageRecord:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    lab = np.array(labels, np.int64)
    d = np.zeros(len(lab), bool) if difficult is None else np.array(difficult, bool)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), size[0], size[1], b, lab, d)


def dets(rows) -> Detections:
    """rows: (image_id, label, score, x1, y1, x2, y2)."""
    return Detections(np.array([r[0] for r in rows], dtype=object), np.array([r[3:] for r in rows], np.float32),
                      np.array([r[2] for r in rows], np.float32), np.array([r[1] for r in rows], np.int64))


CLASSES = ["cat", "dog", "car"]
GROUPS = {"animals": ("cat", "dog")}


def test_each_fp_type_on_hand_built_case():
    r = rec("a", [[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300], [300, 300, 360, 360]], [0, 1, 2, 0],
            difficult=[0, 0, 0, 1])
    d = dets([
        ("a", 0, 0.9, 0, 0, 100, 100),      # TP
        ("a", 0, 0.8, 2, 2, 100, 100),      # duplicate of the detected cat -> Loc
        ("a", 0, 0.7, 200, 0, 300, 100),    # on the dog (grouped with cat) -> Sim
        ("a", 0, 0.6, 0, 200, 100, 300),    # on the car -> Oth
        ("a", 0, 0.5, 400, 400, 450, 450),  # on empty area -> BG
        ("a", 0, 0.4, 0, 0, 30, 100),       # IoU 0.3 with the cat -> Loc
        ("a", 0, 0.3, 300, 300, 360, 360),  # the difficult cat -> ignored
        ("a", 0, 0.2, 0, 0, 100, 5),        # IoU 0.05 with the cat, nothing else -> BG
    ])
    fa = analyze_false_positives(CLASSES, [r], d, groups=GROUPS)
    cat = fa.per_class[0]
    assert list(cat.outcome) == [TP, LOC, SIM, OTH, BG, LOC, IGNORED, BG]
    assert list(cat.confused_with[[2, 3]]) == [1, 2]
    assert cat.counts() == {"Loc": 2, "Sim": 1, "Oth": 1, "BG": 2}
    # without groups the dog confusion is "Oth"
    fa2 = analyze_false_positives(CLASSES, [r], d, groups={})
    assert fa2.per_class[0].outcome[2] == OTH
    # a TP first: AP is 1 for cat whatever the FPs, so nothing is gained by fixing them
    assert fa.per_class[0].ap == pytest.approx(1.0)
    assert all(v == pytest.approx(0.0) for v in cat.dap.values())


def test_ap_matches_the_evaluator():
    rng = np.random.default_rng(0)
    records, rows = [], []
    for i in range(6):
        g = rng.uniform(0, 300, (4, 2))
        boxes = np.concatenate([g, g + rng.uniform(30, 150, (4, 2))], 1)
        labels = rng.integers(0, 3, 4)
        records.append(rec(str(i), boxes, labels, difficult=rng.random(4) < 0.2))
        for _ in range(15):
            b = boxes[rng.integers(0, 4)] + rng.normal(0, 25, 4)
            rows.append((str(i), int(rng.integers(0, 3)), float(rng.random()), *b))
    d = dets(rows)
    for metric in ("voc07", "voc2010"):
        fa = analyze_false_positives(CLASSES, records, d, metric=metric)
        ev = evaluate_detections(type("DS", (), {"classes": CLASSES, "records": records})(), d, metric)
        assert fa.mean_ap == pytest.approx(ev.mean_ap)
        for c, e in zip(fa.per_class, ev.classes, strict=True):
            # every FP of the evaluator is one of the four types, every TP a TP
            assert ((c.outcome >= LOC) == e.fp).all() and ((c.outcome == TP) == e.tp).all()


def test_dap_hand_computed():
    # 2 objects; ranked: BG (0.9), TP (0.8), Loc IoU 0.3 with the other object (0.7)
    r = rec("a", [[0, 0, 100, 100], [200, 200, 300, 300]], [0, 0])
    d = dets([("a", 0, 0.9, 400, 400, 450, 450), ("a", 0, 0.8, 0, 0, 100, 100), ("a", 0, 0.7, 200, 200, 230, 300)])
    fa = analyze_false_positives(["cat"], [r], d, groups={}, metric="voc2010")
    c = fa.per_class[0]
    # base: P=0.5 at R=0.5 -> AP 0.25; fix BG: P=1 at R=0.5 -> 0.5;
    # fix Loc: P=2/3 at R=1, envelope 2/3 everywhere -> 2/3
    assert c.ap == pytest.approx(0.25)
    assert c.dap["BG"] == pytest.approx(0.25)
    assert c.dap["Loc"] == pytest.approx(2 / 3 - 0.25)
    assert c.dap["Sim"] == 0 and c.dap["Oth"] == 0
    # a Loc whose object is already detected is a duplicate: fixing it only removes it
    d2 = dets([("a", 0, 0.9, 0, 0, 30, 100), ("a", 0, 0.8, 0, 0, 100, 100)])
    c2 = analyze_false_positives(["cat"], [r], d2, groups={}, metric="voc2010").per_class[0]
    assert list(c2.outcome) == [LOC, TP]
    assert c2.ap == pytest.approx(0.25) and c2.dap["Loc"] == pytest.approx(0.25)


def test_trend_counts_total_false_positives():
    r = rec("a", [[0, 0, 100, 100]], [0])
    rows = [("a", 0, 1.0 - k / 100, 300 + k, 300, 350 + k, 350) for k in range(30)]  # 30 BG for cat
    rows += [("a", 1, 1.0 - k / 100, 0, 0, 100, 100 - k) for k in range(20)]  # 20 Oth for dog (IoU >= 0.8)
    fa = analyze_false_positives(["cat", "dog"], [r], dets(rows), groups={})
    ticks, pct = fa.trend(ticks=[2, 10, 50])
    assert list(ticks) == [2, 10, 50]
    # rank by rank: one BG and one Oth per rank while both classes have FPs
    assert pct[:, 0] == pytest.approx([0, 0, 50, 50])
    assert pct[:, 2] == pytest.approx([0, 0, 40, 60])
    assert default_ticks(3200) == [25, 50, 100, 200, 400, 800, 1600, 3200]


def test_coco101_matches_definition():
    rec_ = np.array([0.5, 0.5, 1.0])
    prec = np.array([1.0, 0.5, 2 / 3])
    # envelope: 1 up to recall .5 (51 points), then 2/3 (50 points)
    assert coco101_ap(rec_, prec) == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)


def test_unknown_group_member_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown classes"):
        analyze_false_positives(["cat"], [], Detections.empty(), groups={"g": ("cat", "zebra")})


def test_figures_written(tmp_path):
    r = rec("a", [[0, 0, 100, 100], [200, 0, 300, 100]], [0, 1])
    d = dets([("a", 0, 0.9, 0, 0, 100, 100), ("a", 0, 0.8, 200, 0, 300, 100), ("a", 1, 0.7, 400, 400, 450, 450)])
    fa = analyze_false_positives(CLASSES, [r, rec("b", [[0, 200, 100, 300]], [2])], d, groups=GROUPS)
    for p in (fp_figure(fa, tmp_path / "fp.png"), dap_figure(fa, tmp_path / "dap.png")):
        assert p.stat().st_size > 1000
    assert set(fa.as_dict()["dAP"]) == set(FP_TYPES)


# ------------------------------------------------------------- cross-check against tidecv


def _tide_errors(records, d, classes):
    tidecv = pytest.importorskip("tidecv", reason="tidecv not installed")
    gt, pr = tidecv.Data("gt"), tidecv.Data("pr")
    for n, r in enumerate(records):
        for b, lab in zip(r.boxes, r.labels, strict=True):
            gt.add_ground_truth(n, int(lab), [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])])
    ids = {r.image_id: n for n, r in enumerate(records)}
    for i in range(len(d)):
        b = d.boxes[i]
        pr.add_detection(ids[d.image_ids[i]], int(d.labels[i]), float(d.scores[i]),
                         [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])])
    t = tidecv.TIDE(pos_threshold=0.5, background_threshold=0.1)
    t.evaluate(gt, pr, mode=tidecv.TIDE.BOX, name="pr")
    return t.runs["pr"].ap, t.get_main_errors()["pr"]


def test_dap_agrees_with_tidecv():
    # class 0: BG error above a TP, a poor localisation of a missed object, an object missed;
    # class 1: a TP, and a confusion with the (already detected) class-0 object
    records = [
        rec("a", [[0, 0, 100, 100], [200, 200, 300, 300], [0, 300, 80, 380]], [0, 0, 1]),
        rec("b", [[50, 50, 150, 150], [300, 50, 400, 150], [0, 300, 100, 400]], [0, 0, 1]),
    ]
    d = dets([
        ("a", 0, 0.95, 400, 0, 480, 60),     # BG
        ("a", 0, 0.90, 0, 0, 100, 100),      # TP
        ("a", 0, 0.85, 200, 200, 240, 300),  # Loc (IoU 0.4) on a missed object
        ("b", 0, 0.80, 50, 50, 150, 150),    # TP
        ("b", 0, 0.20, 420, 420, 470, 470),  # BG, low
        ("a", 1, 0.99, 0, 300, 80, 380),     # TP of class 1
        ("a", 1, 0.70, 2, 0, 100, 98),       # class 1 on the detected class-0 object: Oth / TIDE Cls
        ("a", 1, 0.60, 400, 300, 450, 350),  # BG
        ("b", 1, 0.50, 0, 300, 100, 400),    # TP of class 1
    ])
    tide_ap, tide = _tide_errors(records, d, ["p", "q"])
    fa = analyze_false_positives(["p", "q"], records, d, groups={}, metric="coco101")
    assert list(fa.per_class[0].outcome) == [BG, TP, LOC, TP, BG]
    assert list(fa.per_class[1].outcome) == [TP, OTH, BG, TP]
    ours = fa.mean_dap()
    assert 100 * fa.mean_ap == pytest.approx(tide_ap, abs=1e-6)
    assert 100 * ours["BG"] == pytest.approx(tide["Bkg"], abs=1e-6)
    assert 100 * ours["Loc"] == pytest.approx(tide["Loc"] + tide["Dupe"], abs=1e-6)
    assert 100 * ours["Oth"] == pytest.approx(tide["Cls"], abs=1e-6)
    assert tide["Loc"] > 0 and tide["Bkg"] > 0 and tide["Cls"] > 0  # the case exercises all three
    # Sim instead of Oth when the two classes are grouped
    fs = analyze_false_positives(["p", "q"], records, d, groups={"g": ("p", "q")}, metric="coco101")
    assert fs.per_class[1].outcome[1] == SIM
    assert 100 * fs.mean_dap()["Sim"] == pytest.approx(tide["Cls"], abs=1e-6)


def test_parse_groups():
    assert parse_groups(None) is None and parse_groups([], voc_groups=False) == {}
    assert parse_groups(["pets = cat, dog,", "x=a"]) == {"pets": ("cat", "dog"), "x": ("a",)}
    with pytest.raises(ValueError, match="NAME=class1,class2"):
        parse_groups(["cat,dog"])
