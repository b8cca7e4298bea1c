"""``rcnn fp-analysis`` / ``sensitivity`` / ``report`` on the real VOC sample with detections
built from its ground truth, so the expected error types are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rcnn.cli import app
from rcnn.data import load_dataset
from rcnn.evaluate import Detections, write_coco_results

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "VOC2007-test-sample"


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not found")
    ds = load_dataset(DATA, "test")
    cat, dog, horse, car, person = (ds.classes.index(c) for c in ("cat", "dog", "horse", "car", "person"))
    ids, boxes, scores, labels = [], [], [], []
    for r in ds.records:
        for b, lab, d in zip(r.boxes, r.labels, r.difficult, strict=True):
            if d:
                continue
            ids.append(r.image_id), boxes.append(b), scores.append(0.9), labels.append(int(lab))  # exact: TP
            if lab == dog:  # a dog also called a cat: Sim for cat (VOC animals group)
                ids.append(r.image_id), boxes.append(b), scores.append(0.95), labels.append(cat)
            if lab == car:  # a car called a person: Oth for person
                ids.append(r.image_id), boxes.append(b), scores.append(0.95), labels.append(person)
            if lab == horse:  # a duplicate: Loc for horse
                ids.append(r.image_id), boxes.append(b + 2), scores.append(0.5), labels.append(int(lab))
        ids.append(r.image_id), boxes.append([0, 0, 3, 3]), scores.append(0.1), labels.append(person)  # a corner: BG
    dets = Detections(np.array(ids, dtype=object), np.array(boxes, np.float32), np.array(scores, np.float32), np.array(labels))
    tmp = tmp_path_factory.mktemp("voc")
    path = write_coco_results(dets, list(range(1, 21)), tmp / "dets.json")
    return ds, path, tmp


def test_fp_analysis_cli(voc):
    _ds, dets, tmp = voc
    r = CliRunner().invoke(app, ["fp-analysis", str(dets), str(DATA), "--split", "test", "-o", str(tmp / "fa")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp / "fa" / "fp_analysis.json").read_text())
    cls = d["classes"]
    assert cls["cat"]["fp_counts"]["Sim"] == 4 and cls["horse"]["fp_counts"]["Loc"] == 3
    assert cls["person"]["fp_counts"]["Oth"] == 8 and cls["person"]["fp_counts"]["BG"] == 19
    assert (tmp / "fa" / "fp_types.png").stat().st_size > 1000
    # one bad group: a clear error
    r = CliRunner().invoke(app, ["fp-analysis", str(dets), str(DATA), "-s", "test", "-g", "pets=cat,unicorn", "-o", str(tmp / "x")])
    assert r.exit_code == 2 and "unicorn" in r.output


def test_sensitivity_and_report_cli(voc):
    _ds, dets, tmp = voc
    r = CliRunner().invoke(app, ["sensitivity", str(DATA), f"gt={dets}", "--split", "test", "-o", str(tmp / "s")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp / "s" / "sensitivity.json").read_text())[0]
    assert set(s["characteristics"]) == {"area", "aspect"}  # the sample has no truncated/pose fields
    r = CliRunner().invoke(app, ["report", str(dets), str(DATA), "--split", "test", "-o", str(tmp / "rep"), "--units", "none"])
    assert r.exit_code == 0, r.output
    html = (tmp / "rep" / "index.html").read_text()
    assert "diningtable" in html and "sensitivity.png" in html
    r = CliRunner().invoke(app, ["report", str(tmp / "missing.json"), str(DATA), "-o", str(tmp / "rep2")])
    assert r.exit_code == 2 and "missing.json" in r.output


@pytest.mark.parametrize("source", ["detections", "model"])
def test_report_cli_with_one_unreadable_image(tmp_path, source):
    """One test image that cannot be read: one warning line naming it, the rest of the report written."""
    from rcnn.evaluate import ground_truth_as_detections
    from test_cli_detect import _hog_model, _tiny_voc

    data = _tiny_voc(tmp_path / "voc", n=8)  # test split: the last 2 images
    ds = load_dataset(data, "test")
    if source == "detections":
        model = write_coco_results(ground_truth_as_detections(ds), [1, 2], tmp_path / "dets.json")
    else:
        model = _hog_model(tmp_path)
    bad = ds.records[0].path
    bad.write_bytes(bad.read_bytes()[:200])  # cut inside the JPEG header: nothing to decode
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["report", str(model), str(data), "--split", "test", "-o", str(out), "--units", "none",
                                 "--samples", "1"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if "left out of the report" in ln]
    assert len(lines) == 1 and bad.name in lines[0]
    doc = json.loads((out / "report.json").read_text())
    assert list(doc["skipped_images"]) == [ds.records[0].image_id]
    assert (out / "index.html").is_file() and (out / "det_best_0.png").is_file()
