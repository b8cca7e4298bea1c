"""Ranked mask proposals (CPMC-style learned ranking, paper §4): masks, ranker, cache, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.segmentation import MaskProposalConfig, get_mask_proposals, mask_proposals
from rcnn.segmentation import regions as regions_mod
from rcnn.segmentation.ranking import FEATURES, ForestRanker, SegmentStats, describe, train_ranker


def _ellipse_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A filled ellipse (two-tone, like a person's shirt and trousers) on a textured background."""
    rng = np.random.default_rng(seed)
    h, w = 160, 200
    yy, xx = np.mgrid[0:h, 0:w]
    # background: smooth stripes plus noise, so superpixels are not trivial
    bg = 110 + 30 * np.sin(xx / 7.0)[..., None] * np.array([1.0, 0.6, 0.3]) + rng.normal(0, 6, (h, w, 3))
    obj = ((xx - 95) / 32.0) ** 2 + ((yy - 80) / 60.0) ** 2 <= 1.0
    img = bg.copy()
    img[obj & (yy < 80)] = (200, 60, 50)
    img[obj & (yy >= 80)] = (40, 60, 150)
    return np.clip(img, 0, 255).astype(np.uint8), obj


def test_ranked_proposals_find_an_ellipse_on_texture():
    img, obj = _ellipse_scene()
    cfg = MaskProposalConfig(top_k=40, method="ranked")
    assert MaskProposalConfig().method == "cnn"  # the default: ranked + the learned mask head
    regions = mask_proposals(img, cfg)
    masks = regions.masks()
    assert masks.dtype == bool and masks.shape == (len(regions), *obj.shape)
    assert 0 < len(regions) <= 40
    assert masks.any((1, 2)).all()  # no empty region
    iou = regions.iou(obj[None])[:, 0]
    assert iou.max() > 0.85
    # the ranking puts a good region of the object near the top, not just somewhere in the 40
    assert iou[:10].max() > 0.7
    # deduplicated at the configured threshold
    m = masks.reshape(len(masks), -1).astype(np.float32)
    inter = m @ m.T
    pair = inter / (m.sum(1)[:, None] + m.sum(1)[None] - inter)
    np.fill_diagonal(pair, 0)
    assert pair.max() < cfg.dedup_iou


def test_forest_ranker_matches_sklearn_and_round_trips(tmp_path):
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, len(FEATURES))).astype(np.float32)
    y = (X[:, 0] > 0) * 0.5 + 0.3 * np.tanh(X[:, 3]) + rng.normal(0, 0.05, 300)
    rf = RandomForestRegressor(n_estimators=5, max_depth=6, random_state=0).fit(X, y)
    r = ForestRanker.from_sklearn(rf)
    np.testing.assert_allclose(r.predict(X), rf.predict(X), rtol=1e-6, atol=1e-9)
    r.save(tmp_path / "r.npz")
    back = ForestRanker.load(tmp_path / "r.npz")
    np.testing.assert_allclose(back.predict(X), rf.predict(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features"):
        back.predict(X[:, :3])
    # train_ranker learns the target (better than the mean on held-out rows)
    t = train_ranker(X[:200], y[:200], n_trees=5)
    err = np.abs(t.predict(X[200:]) - y[200:]).mean()
    assert err < 0.5 * np.abs(y[200:] - y[:200].mean()).mean()


def test_describe_cues_of_known_regions():
    img = np.full((40, 40, 3), 100, np.uint8)
    img[10:30, 10:20] = (250, 20, 20)
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:20] = 1
    st = SegmentStats.from_labels(img, labels)
    X = describe(np.array([[False, True], [True, True]]), st)
    f = {name: X[:, i] for i, name in enumerate(FEATURES)}
    np.testing.assert_allclose(f["fill"], [1.0, 1.0])
    np.testing.assert_allclose(f["box_w"], [10 / 40, 1.0])
    np.testing.assert_allclose(f["log_aspect"][0], np.log(2.0), rtol=1e-6)
    assert f["touch_left"][0] == 0 and f["touch_left"][1] == 1
    assert f["colour_contrast"][0] > 0.9  # red block vs grey rest
    assert f["boundary_grad"][0] > f["interior_grad"][0]


def test_ranked_proposals_are_cached_and_reused(tmp_path, monkeypatch):
    import cv2

    img, _ = _ellipse_scene(1)
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = MaskProposalConfig(top_k=20)
    first = get_mask_proposals(path, cfg)
    assert list((tmp_path / "cache" / "mask_proposals").rglob("*.npz"))

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(regions_mod, "mask_proposals", boom)
    again = get_mask_proposals(path, cfg)
    np.testing.assert_array_equal(again.masks(), first.masks())
    # a changed setting is a different cache entry (computed, not reused)
    with pytest.raises(AssertionError, match="recomputed"):
        get_mask_proposals(path, MaskProposalConfig(top_k=10))
    # the grouping method keeps the session-1 key; the ranked key depends on the ranker
    assert MaskProposalConfig(method="grouping").key() != cfg.key()


def test_mask_proposal_config_bad_input(tmp_path):
    with pytest.raises(ValueError, match="method"):
        MaskProposalConfig(method="cpmc-matlab")
    with pytest.raises(FileNotFoundError, match="no such mask ranker"):
        MaskProposalConfig(ranker=str(tmp_path / "missing.npz")).key()
    with pytest.raises(ValueError, match="uint8"):
        mask_proposals(np.zeros((10, 10, 3), np.float32))


def test_models_saved_before_the_ranked_method_keep_the_grouping_proposals(tmp_path):
    from conftest import write_old_segmentation_model
    from rcnn.segmentation import SegmentationModel

    old_mc = {"color_spaces": ["hsv", "lab"], "ks": [30, 60], "sigma": 0.8, "min_size": 30,
              "similarity_sets": [["colour", "texture", "size", "fill"], ["texture", "size", "fill"]],
              "top_k": 150, "dedup_iou": 0.8, "min_area_frac": 0.005, "max_area_frac": 0.7, "seed": 0, "max_side": 320}
    write_old_segmentation_model(tmp_path / "old.safetensors", old_mc)
    m = SegmentationModel.load(tmp_path / "old.safetensors")
    assert m.mask_config.method == "grouping"
    assert m.mask_config.key() == MaskProposalConfig(method="grouping").key()  # the session-1 cache
