"""Bounding-box regression: targets, ridge solver, per-class fitting, model-file round trip, NMS hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcnn.bbox_regression import (
    BoxRegressor,
    apply_deltas,
    box_targets,
    ridge_fit,
    train_box_regressor,
    training_pairs,
)
from rcnn.data import ImageRecord
from rcnn.detect import RCNNModel, postprocess
from rcnn.sources import FeatureSource


def test_targets_roundtrip_and_values():
    p = np.array([[10, 20, 30, 60], [0, 0, 5, 5]], np.float32)
    g = np.array([[12, 18, 32, 58], [1, 1, 11, 6]], np.float32)
    t = box_targets(p, g)
    # centre moved by +2,-2 on a 20x40 box; same size
    np.testing.assert_allclose(t[0], [0.1, -0.05, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(t[1, 2:], [np.log(2.0), 0.0], atol=1e-6)
    np.testing.assert_allclose(apply_deltas(p, t), g, atol=1e-4)
    # per-class deltas (N,C,4)
    d = np.stack([np.zeros_like(t), t], 1)
    out = apply_deltas(p, d)
    assert out.shape == (2, 2, 4)
    np.testing.assert_allclose(out[:, 0], p, atol=1e-5)
    np.testing.assert_allclose(out[:, 1], g, atol=1e-4)


def test_ridge_matches_closed_form_primal_and_dual():
    rng = np.random.default_rng(0)
    for n, d in ((50, 10), (10, 50)):
        X = rng.normal(size=(n, d)).astype(np.float32)
        Y = rng.normal(size=(n, 4))
        W, b = ridge_fit(X, Y, lam=3.0)
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        ref = np.linalg.solve(Xc.T @ Xc + 3.0 * np.eye(d), Xc.T @ Yc)
        np.testing.assert_allclose(W, ref, atol=1e-4)
        np.testing.assert_allclose(b, Y.mean(0) - X.mean(0) @ ref, atol=1e-4)
    # λ → 0 with n > d recovers an exact linear map
    W_true = rng.normal(size=(6, 4))
    X = rng.normal(size=(100, 6)).astype(np.float32)
    W, b = ridge_fit(X, X @ W_true + 0.5, lam=1e-6)
    np.testing.assert_allclose(W, W_true, atol=1e-3)
    np.testing.assert_allclose(b, 0.5, atol=1e-3)


def _record(boxes, labels) -> ImageRecord:
    return ImageRecord(image_id="x", path=Path("x.jpg"), width=100, height=100,
                       boxes=np.asarray(boxes, np.float32), labels=np.asarray(labels, np.int64),
                       difficult=np.zeros(len(labels), bool))


def test_training_pairs_iou_threshold():
    rec = _record([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1])
    boxes = np.array([[10, 10, 50, 50],   # IoU 1 with gt 0
                      [12, 12, 52, 52],   # ~0.82 with gt 0
                      [30, 30, 70, 70],   # < 0.6
                      [61, 61, 90, 92]],  # ~0.87 with gt 1
                     np.float32)
    sel, lab, tgt = training_pairs(rec, boxes, 0.6)
    assert sel.tolist() == [0, 1, 3]
    assert lab.tolist() == [0, 0, 1]
    np.testing.assert_allclose(tgt[0], 0, atol=1e-6)


class _Source(FeatureSource):
    """Synthetic features that encode each box's offset to its object linearly (+ noise)."""

    layer = "pool5"
    dim = 12

    def __init__(self, recs, rng):
        self.data = {}
        for r in recs:
            gt = r.boxes
            jitter = rng.uniform(-3, 3, size=(40, 4)).astype(np.float32)
            k = rng.integers(len(gt), size=40)
            boxes = gt[k] + jitter
            t = box_targets(boxes, gt[k])
            feats = np.concatenate([t @ rng.normal(size=(4, 4)) * 0 + t, rng.normal(size=(40, 8)) * 0.01], 1)
            self.data[r.image_id] = (boxes, feats.astype(np.float16), k)

    def regions(self, r):
        return self.data[r.image_id][:2]

    def gt_features(self, r):
        return np.zeros((len(r.boxes), self.dim), np.float16)

    def options(self):
        return {"layer": "pool5"}


def test_train_regressor_learns_offsets_and_reduces_error():
    rng = np.random.default_rng(1)
    recs = []
    for i in range(6):
        r = _record([[20, 20, 60, 70], [5, 50, 40, 90]], [0, 1])
        recs.append(ImageRecord(**{**r.__dict__, "image_id": f"im{i}"}))
    src = _Source(recs, rng)
    reg = train_box_regressor(recs, ["a", "b"], src, lam=1e-3)
    assert reg.trained.all() and reg.W.shape == (2, 12, 4)
    boxes, feats, k = src.data["im0"]
    refined = reg.refine(boxes, feats.astype(np.float32), 100, 100)
    gt = recs[0].boxes[k]
    before = np.abs(boxes - gt).mean()
    after = np.abs(refined[np.arange(len(k)), recs[0].labels[k]] - gt).mean()
    assert after < 0.25 * before
    # a class with no samples stays untrained and predicts zero offsets
    reg2 = train_box_regressor(recs, ["a", "b", "c"], _SourceLabels(src), lam=1.0)
    assert not reg2.trained[2]
    np.testing.assert_allclose(reg2.predict(feats.astype(np.float32))[:, 2], 0)


class _SourceLabels(_Source):
    def __init__(self, src):
        self.data = src.data


def test_model_file_roundtrip_and_per_class_nms(tmp_path):
    C, D = 2, 5
    reg = BoxRegressor(classes=["a", "b"], W=np.random.default_rng(0).normal(size=(C, D, 4)).astype(np.float32),
                       b=np.ones((C, 4), np.float32), trained=np.array([True, False]), feature_scale=2.0, layer="pool5",
                       feature_options={"backbone": "squeezenet1_1", "layer": "pool5"})
    m = RCNNModel(classes=["a", "b"], W=np.zeros((3, C), np.float32), b=np.zeros(C, np.float32), trained=np.ones(C, bool),
                  feature_scale=1.0, backbone="squeezenet1_1", weights_hash="h", layer="fc7", mode="shared", bbox_reg=reg)
    p = m.save(tmp_path / "m.rcnn")
    m2 = RCNNModel.load(p)
    assert m2.bbox_reg is not None and m2.bbox_reg.layer == "pool5"
    np.testing.assert_array_equal(m2.bbox_reg.W, reg.W)
    np.testing.assert_array_equal(m2.bbox_reg.trained, [True, False])
    assert m2.bbox_reg.feature_scale == 2.0
    # without a regressor the file has none
    m.bbox_reg = None
    assert RCNNModel.load(m.save(tmp_path / "n.rcnn")).bbox_reg is None
    # per-class boxes (N,C,4): region 1's class-0 box coincides with region 0's → suppressed by NMS;
    # its class-1 box is elsewhere → kept
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]]], np.float32)
    scores = np.array([[0.9, 0.8], [0.7, 0.6]], np.float32)
    b, s, lab = postprocess(boxes, scores)
    assert lab.tolist() == [0, 1, 1]
    np.testing.assert_allclose(s, [0.9, 0.8, 0.6])
    np.testing.assert_array_equal(b[2], [50, 50, 60, 60])


def test_cv_lambda_picks_by_held_out_error_grouped_by_image():
    from rcnn.bbox_regression import cv_lambda

    rng = np.random.default_rng(3)
    n, d = 600, 20
    X = rng.normal(size=(n, d)).astype(np.float32)
    groups = np.repeat(np.arange(60), 10)
    W = rng.normal(size=(d, 4))
    clean = X @ W + 0.01 * rng.normal(size=(n, 4))
    lams = [1e-3, 1.0, 1e3, 1e6]
    best, errs = cv_lambda(X, clean, groups, lams)
    assert best <= 1.0 and errs[0] < errs[-1]  # a clean linear map: little shrinkage wins
    noise = rng.normal(size=(n, 4))  # targets unrelated to the features: shrink everything
    best, errs = cv_lambda(X, noise, groups, lams)
    assert best >= 1e3 and errs[-1] < errs[0]
    # train_box_regressor with a list of candidates records each class's choice
    recs = []
    for i in range(6):
        r = _record([[20, 20, 60, 70], [5, 50, 40, 90]], [0, 1])
        recs.append(ImageRecord(**{**r.__dict__, "image_id": f"im{i}"}))
    reg = train_box_regressor(recs, ["a", "b"], _Source(recs, np.random.default_rng(1)), lam=[1e-3, 1e6], cv_folds=2)
    assert isinstance(reg.lam, list) and len(reg.lam) == 2 and set(reg.training["cv_error"]) == {"a", "b"}
    assert reg.lam[0] == 1e-3  # the synthetic features determine the offsets exactly
