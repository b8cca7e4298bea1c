"""rcnn.tightness: the class-agnostic IoU regressor on small synthetic features, and its file."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.data import ImageRecord
from rcnn.tightness import IOU_BINS, TightnessScorer, fit_tightness, region_overlaps, sample_regions


class _Source:
    """A feature source whose 'feature' of a box encodes its IoU with the image's object (plus noise)."""

    layer = "pool5"
    blocks = None

    def __init__(self, rng):
        self.rng = rng

    def options(self):
        return {"backbone": "squeezenet1_1", "layer": "pool5", "mode": "shared"}

    def _feats(self, record, boxes):
        iou = region_overlaps(record, boxes)
        noise = self.rng.normal(0, 0.05, (len(boxes), 7))
        return np.concatenate([iou[:, None] * 3.0, 1 + noise], 1).astype(np.float32)

    def regions(self, record):
        b = _boxes(record, self.rng)
        return b, self._feats(record, b)

    def gt_features(self, record):
        return self._feats(record, record.boxes)


def _record(k: int) -> ImageRecord:
    return ImageRecord(f"im{k}", f"/nonexistent/{k}.png", 200, 200, np.array([[50, 50, 150, 150]], np.float32),
                       np.array([0]), np.array([False]))


def _boxes(record, rng):
    """Jittered copies of the object box (IoU 0..1) and far-away background boxes."""
    g = record.boxes[0]
    jit = g + rng.normal(0, 25, (120, 4)).astype(np.float32)
    jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 5)
    bg = np.array([[160, 160, 195, 195], [0, 160, 30, 199]], np.float32)
    return np.concatenate([jit, bg])


def test_region_overlaps_any_class_and_empty():
    r = ImageRecord("a", "/x.png", 100, 100, np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), np.array([0, 1]),
                    np.array([False, False]))
    iou = region_overlaps(r, np.array([[0, 0, 10, 20], [50, 50, 60, 60], [80, 80, 90, 90]], np.float32))
    assert iou.tolist() == pytest.approx([0.5, 1.0, 0.0])
    empty = ImageRecord("b", "/y.png", 10, 10, np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, bool))
    assert region_overlaps(empty, np.array([[0, 0, 5, 5]], np.float32)).tolist() == [0.0]


def test_sample_is_balanced_over_iou_bins_and_skips_background():
    rng = np.random.default_rng(0)
    X, y, counts = sample_regions([([_record(k) for k in range(6)], _Source(rng))], per_bin=20, seed=0)
    assert len(X) == len(y) and X.dtype == np.float16
    assert y.min() >= 0.1  # background boxes (IoU 0) are not training regions
    assert set(counts) == {"<0.3", "<0.5", "<0.7", "<0.9", "gt/≥0.9"} and len(counts) == len(IOU_BINS)
    assert all(c["kept"] <= 20 for c in counts.values()) and counts["gt/≥0.9"]["seen"] >= 6  # the gt boxes
    # no bin holds more than the cap although low IoUs are far more common
    assert counts["<0.3"]["seen"] > counts["<0.3"]["kept"]


def test_fit_predicts_iou_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    src = _Source(rng)
    X, y, _ = sample_regions([([_record(k) for k in range(10)], src)], per_bin=200, seed=0)
    sc = fit_tightness(X, y, src, lam=1.0, training={"data": "synthetic"})
    r = _record(99)
    boxes, feats = src.regions(r)
    pred, true = sc.predict(feats), region_overlaps(r, boxes)
    assert pred.min() >= 0 and pred.max() <= 1
    assert np.corrcoef(pred, true)[0, 1] > 0.9
    path = sc.save(tmp_path / "t.safetensors")
    back = TightnessScorer.load(path)
    assert np.allclose(back.predict(feats), pred) and back.layer == "pool5" and back.training["data"] == "synthetic"
    assert back.feature_config().layer == "pool5"
    with pytest.raises(ValueError, match="expects"):
        back.predict(feats[:, :3])


def test_bad_scorer_file_one_line(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError) as e:
        TightnessScorer.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
