"""Detection and evaluation with models of any number of classes (rcnn.detect over rcnn.scoring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rcnn.data import Dataset
from rcnn.detect import (
    FULL_SCORES_MAX,
    RCNNModel,
    detect_dataset,
    detect_image,
    fit,
    postprocess,
)
from rcnn.evaluate import evaluate_model
from rcnn.scoring import score_topk
from rcnn.svm import SVMConfig
from synthetic_regions import CLASSES, SyntheticSource, synthetic_records


def test_postprocess_of_topk_candidates_equals_postprocess_of_the_full_matrix():
    rng = np.random.default_rng(0)
    N, C = 400, 7
    xy = rng.uniform(0, 200, (N, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (N, 2))], 1).astype(np.float32)
    boxes[5] = [10, 10, 10, 30]  # zero area: never a detection
    feats = rng.normal(size=(N, 16)).astype(np.float32)
    W, b = rng.normal(size=(16, C)).astype(np.float32), rng.normal(size=C).astype(np.float32)
    active = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    full = feats @ W + b
    for threshold in (None, 0.5):
        ref = postprocess(boxes, full, 0.3, threshold, None, 100, active)
        got = postprocess(boxes, score_topk(feats, W, b, k=None, threshold=threshold), 0.3, threshold, None, 100, active)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], atol=1e-5)
        np.testing.assert_array_equal(got[2], ref[2])
        assert 2 not in got[2] and len(got[2]) > 20


def _dataset(n, start):
    return Dataset(Path("/nonexistent"), "x", list(CLASSES), synthetic_records(n, start))


def _embedded_model_matches(C_extra: int) -> None:
    """The 3 trained classes embedded among ``C_extra`` distractor classes: detection goes through
    the bounded top-k path (N x C > FULL_SCORES_MAX) and gives the same detections and APs."""
    from rcnn import detect

    src = SyntheticSource()
    small, _ = fit(_dataset(20, 0), src, SVMConfig(retrain_limit=200, stats_images=10))
    rng = np.random.default_rng(3)
    W = np.concatenate([small.W, rng.normal(size=(small.W.shape[0], C_extra)).astype(np.float32) * 0.01], 1)
    b = np.concatenate([small.b, np.full(C_extra, -100.0, np.float32)])  # distractors never pass the threshold
    big = RCNNModel(**{**small.__dict__, "classes": [*small.classes, *(f"distractor{i}" for i in range(C_extra))],
                       "W": W, "b": b, "trained": np.concatenate([small.trained, np.ones(C_extra, bool)])})
    test = _dataset(5, 1000)
    boxes, _ = src.regions(test.records[0])
    assert len(boxes) * len(big.classes) > detect.FULL_SCORES_MAX and big.candidates_per_class(len(boxes), 20) == 60
    kw = {"threshold": -50.0, "max_per_class": 20}
    d_small, d_big = detect_dataset(small, test, src, **kw), detect_dataset(big, test, src, **kw)
    assert len(d_small) > 0
    np.testing.assert_array_equal(d_big.labels, d_small.labels)
    np.testing.assert_array_equal(d_big.boxes, d_small.boxes)
    np.testing.assert_allclose(d_big.scores, d_small.scores, atol=1e-4)
    r_small, _ = evaluate_model(small, test, d_small)
    r_big, warns = evaluate_model(big, test, d_big)
    assert [c.ap for c in r_big.classes] == [c.ap for c in r_small.classes]
    assert any(f"and {C_extra - 10} more" in w for w in warns) and max(len(w) for w in warns) < 400


def test_a_many_class_model_detects_and_evaluates_like_its_3_classes(monkeypatch):
    from rcnn import detect

    monkeypatch.setattr(detect, "FULL_SCORES_MAX", 50_000)  # take the top-k path with 3k classes
    _embedded_model_matches(3_000)


@pytest.mark.slow  # 100k classes x 5 images: ~15 s of CPU, a minute on a busy machine
def test_a_100k_class_model_detects_and_evaluates_like_its_3_classes():
    assert FULL_SCORES_MAX < 200 * 100_000
    _embedded_model_matches(100_000)


def test_detect_image_uses_the_same_path():
    src = SyntheticSource()
    model, _ = fit(_dataset(12, 0), src, SVMConfig(retrain_limit=200, stats_images=10))
    rec = synthetic_records(1, 500)[0]
    boxes, feats = src.regions(rec)

    class OneImage:
        def image_regions(self, image):
            return boxes, feats

    got = detect_image(model, np.zeros((8, 8, 3), np.uint8), OneImage())
    ref = postprocess(boxes, model.score(feats), model.nms_iou, None, None, 100, model.trained)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[2], ref[2])
