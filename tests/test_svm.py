"""SVM solver, feature scaling and hard-negative mining on synthetic features."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rcnn.svm import (
    SVMConfig,
    feature_stats,
    negative_overlaps,
    score_regions,
    solve_dual_reference,
    svm_objective,
    train_detector,
    train_svm,
)
from synthetic_regions import CLASSES, SyntheticSource, synthetic_records


def _toy(seed=0, P=40, N=260, D=12, shift=0.5):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=D)
    Xp = (rng.normal(size=(P, D)) + shift * mu).astype(np.float32)
    Xn = (rng.normal(size=(N, D)) - 0.2 * shift * mu).astype(np.float32)
    s = 20 / np.linalg.norm(np.concatenate([Xp, Xn]), axis=1).mean()
    return Xp * s, Xn * s


def test_liblinear_objective_matches_independent_dual_solver():
    Xp, Xn = _toy()
    w, b = train_svm(Xp, Xn, tol=1e-5)
    w2, b2 = solve_dual_reference(Xp, Xn)
    o1, o2 = svm_objective(w, b, Xp, Xn), svm_objective(w2, b2, Xp, Xn)
    assert abs(o1.total - o2.total) / o2.total < 0.01
    assert abs(b - b2) < 0.05 * max(1.0, abs(b2))
    # the default tolerance is within 1% of the optimum too
    w3, b3 = train_svm(Xp, Xn)
    assert abs(svm_objective(w3, b3, Xp, Xn).total - o2.total) / o2.total < 0.01


def test_bias_is_regularised_like_an_augmented_column():
    """-B 10 == an extra constant feature 10 whose weight is regularised (released rcnn_train.m)."""
    from sklearn.svm import LinearSVC

    Xp, Xn = _toy(1)
    w, b = train_svm(Xp, Xn, tol=1e-6, max_iter=100000)
    X = np.concatenate([Xp, Xn]).astype(np.float64)
    Xa = np.concatenate([X, np.full((len(X), 1), 10.0)], axis=1)
    y = np.r_[np.ones(len(Xp)), -np.ones(len(Xn))]
    clf = LinearSVC(C=1e-3, loss="hinge", class_weight={1: 2.0, -1: 1.0}, fit_intercept=False, tol=1e-6, max_iter=100000,
                    random_state=0).fit(Xa, y)
    np.testing.assert_allclose(w, clf.coef_[0, :-1], rtol=1e-3, atol=1e-4)
    assert b == pytest.approx(clf.coef_[0, -1] * 10, rel=1e-3, abs=1e-4)


def test_objective_terms_by_hand():
    Xp = np.array([[1.0, 0.0]], np.float32)
    Xn = np.array([[0.0, 1.0], [0.0, -1.0]], np.float32)
    o = svm_objective(np.array([0.5, 0.5]), 1.0, Xp, Xn, C=0.1, bias_mult=10, pos_weight=2)
    # pos: z=1.5 -> 0; neg: z=1.5 -> 2.5, z=0.5 -> 1.5 ; reg: 0.5*0.5 + 0.5*0.01
    assert o.pos == 0
    assert o.neg == pytest.approx(0.1 * 4.0)
    assert o.reg == pytest.approx(0.25 + 0.005)


def test_feature_stats_fixed_seed_and_scale():
    src = SyntheticSource()
    recs = synthetic_records(12)
    m1 = feature_stats(recs, src, n_images=5, boxes_per_image=20, seed=0)
    m2 = feature_stats(recs, src, n_images=5, boxes_per_image=20, seed=0)
    m3 = feature_stats(recs, src, n_images=5, boxes_per_image=20, seed=1)
    assert m1 == m2 and m1 != m3 and m1 > 0


class _Joined:
    """The synthetic features plus a second block 100x larger and uninformative (a joined tap)."""

    name, layer, mode, weights_hash = "synthetic", "fc7+big", "shared", "0" * 64

    def __init__(self):
        self.src = SyntheticSource()
        self.blocks = (self.src.mu.shape[1], 4)

    def _big(self, n: int, seed: int) -> np.ndarray:
        return (100 + np.random.default_rng(seed).normal(size=(n, 4))).astype(np.float32)

    def regions(self, r):
        b, f = self.src.regions(r)
        return b, np.concatenate([f, self._big(len(f), int(r.image_id))], 1)

    def gt_features(self, r):
        f = self.src.gt_features(r)
        return np.concatenate([f, self._big(len(f), 1000 + int(r.image_id))], 1)


def test_joined_taps_scaled_block_by_block():
    """Each block of a joined layer is brought to a mean norm of 20/sqrt(B), so the large
    uninformative block does not swamp the other (with one scalar it would: 99.9 % of the norm)."""
    src, recs = _Joined(), synthetic_records(30)
    norms = feature_stats(recs, src, n_images=10, blocks=src.blocks)
    assert norms.shape == (2,) and norms[1] > 50 * norms[0]
    res = train_detector(recs, CLASSES, src, SVMConfig(retrain_limit=20, stats_images=10))
    assert res.feature_scale.shape == (sum(src.blocks),)
    _, f = src.regions(recs[0])
    scaled = f * res.feature_scale
    d = src.blocks[0]
    for part in (scaled[:, :d], scaled[:, d:]):
        assert np.linalg.norm(part, axis=1).mean() == pytest.approx(20 / math.sqrt(2), rel=0.2)
    # the informative block still separates: held-out class-0 objects outscore background regions
    from rcnn.boxes import box_iou

    r = next(x for x in synthetic_records(10, start=500) if (x.labels == 0).any())
    boxes, f = src.regions(r)
    bg = score_regions(f * res.feature_scale, res.W, res.b)[box_iou(boxes, r.boxes).max(1) < 0.1, 0]
    obj = score_regions(src.gt_features(r) * res.feature_scale, res.W, res.b)[r.labels == 0, 0]
    assert len(bg) and obj.min() > bg.mean() + 1


def test_negative_overlaps_grey_zone():
    from rcnn.data import ImageRecord

    r = ImageRecord("0", Path("x"), 100, 100, np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32),
                    np.array([0, 1]), np.array([False, True]))
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [50, 50, 60, 60], [80, 80, 90, 90]], np.float32)
    ov = negative_overlaps(boxes, r, 3)
    np.testing.assert_allclose(ov[:, 0], [1, 0.5, 0, 0])
    np.testing.assert_allclose(ov[:, 1], [0, 0, 1, 0])  # difficult instances still block negatives
    assert (ov[:, 2] == 0).all()


def test_train_detector_mines_and_separates():
    src = SyntheticSource()
    recs = synthetic_records(30)
    events = []
    cfg = SVMConfig(retrain_limit=20, stats_images=10)
    res = train_detector(recs, CLASSES, src, cfg, progress=events.append)
    assert res.trained.tolist() == [True, True, False]  # class 2 has no positives -> skipped
    assert any("absent" in w for w in res.warnings)
    assert res.feature_scale * res.mean_norm == pytest.approx(20.0)
    # positives exclude difficult ones
    npos = [sum(int(((r.labels == c) & ~r.difficult).sum()) for r in recs) for c in range(3)]
    assert res.num_pos == npos
    for c in (0, 1):
        h = res.history[c]
        assert len(h) >= 3  # first image, retrain-limit retrains, final
        assert h[0]["image"] == 1 and h[-1]["image"] == len(recs)
        assert all(e["num_neg_after_evict"] <= e["num_neg"] for e in h)
        assert all(np.isfinite(e["objective"]) and e["objective"] > 0 for e in h)
    mining = [e for e in events if e.task == "hard-negative mining"]
    assert mining[-1].done == mining[-1].total == len(recs)
    assert mining[-1].info.startswith("cache cell:") and "absent:0" in mining[-1].info  # cache sizes per class
    # on held-out images, GT-like regions outscore background for their class
    test = synthetic_records(10, start=500)
    hits = []
    for r in test:
        boxes, feats = src.regions(r)
        s = score_regions(np.asarray(feats, np.float32) * res.feature_scale, res.W, res.b)
        from rcnn.boxes import box_iou

        iou = box_iou(boxes, r.boxes)
        for c in (0, 1):
            m = r.labels == c
            if m.any():
                good = iou[:, m].max(1) >= 0.7
                bad = iou.max(1) < 0.1
                if good.any():
                    hits.append(np.median(s[good, c]) > np.percentile(s[bad, c], 99))
    assert np.mean(hits) > 0.9


def test_cache_bound_keeps_memory_limited():
    src = SyntheticSource()
    recs = synthetic_records(15)
    cfg = SVMConfig(max_cache_mb=200 * 4 * 24 / 1e6, retrain_limit=100, stats_images=5)  # 200 negatives
    res = train_detector(recs, CLASSES, src, cfg)
    for c in (0, 1):
        assert max(e["num_neg_after_evict"] for e in res.history[c]) <= 200
        assert all(e["num_neg"] <= 200 + 100 + 400 for e in res.history[c][1:])


def test_max_new_neg_per_image_cap_and_two_passes():
    src = SyntheticSource()
    recs = synthetic_records(8)
    res = train_detector(recs, CLASSES, src, SVMConfig(max_new_neg_per_image=10, passes=2, stats_images=4))
    assert res.history[0][0]["num_neg"] <= 10
    assert res.history[0][-1]["image"] == len(recs)
    assert all(not math.isnan(v) for v in res.b[:2])


def test_all_images_without_regions_is_an_error():
    class Empty(SyntheticSource):
        def regions(self, record):
            return np.zeros((0, 4), np.float32), np.zeros((0, 24), np.float16)

    with pytest.raises(ValueError, match="no proposal features"):
        train_detector(synthetic_records(3), CLASSES, Empty())


def test_scaled_csr_is_the_scaled_rows_as_sparse_and_trains_the_same_svm():
    """The sparse training matrix holds exactly the scaled float64 rows, and liblinear returns the
    same weights from it as from the dense rows."""
    import scipy.sparse as sp

    from rcnn.svm import fit_liblinear, scaled_csr, scaled_rows

    rng = np.random.default_rng(0)
    pos = np.maximum(rng.standard_normal((60, 40)) + 0.4, 0).astype(np.float16)
    neg = np.maximum(rng.standard_normal((500, 40)) - 0.3, 0).astype(np.float16)
    scale = rng.uniform(0.5, 2, 40).astype(np.float32)
    M, dense = scaled_csr([pos, neg], scale, chunk=64), scaled_rows([pos, neg], scale, np.float64)
    ref = sp.csr_matrix(dense)
    assert M.shape == dense.shape and M.nnz == ref.nnz < dense.size
    assert np.array_equal(M.indptr, ref.indptr) and np.array_equal(M.indices, ref.indices)
    assert np.array_equal(M.data, ref.data)
    w_sparse, b_sparse = fit_liblinear(M, len(pos))
    w_dense, b_dense = fit_liblinear(dense, len(pos))
    assert np.array_equal(w_sparse, w_dense) and b_sparse == b_dense
