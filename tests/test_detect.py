"""Model file, post-processing, dataset detection and evaluation (synthetic features, real HOG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rcnn.data import Dataset
from rcnn.detect import (
    FORMAT_VERSION,
    DetectStats,
    ModelError,
    RCNNModel,
    check_backbone,
    detect_dataset,
    fit,
    postprocess,
)
from rcnn.evaluate import evaluate_model, save_pr_curves
from rcnn.sources import FeatureSource, hog_features
from rcnn.svm import SVMConfig
from synthetic_regions import CLASSES, SyntheticSource, synthetic_records


def _model(C=3, D=8, trained=None):
    rng = np.random.default_rng(0)
    return RCNNModel(classes=CLASSES[:C], W=rng.normal(size=(D, C)).astype(np.float32), b=np.arange(C, dtype=np.float32),
                     trained=np.ones(C, bool) if trained is None else np.asarray(trained), feature_scale=0.5,
                     backbone="squeezenet1_1", weights_hash="ab" * 32, layer="fc7", mode="shared",
                     feature_options={"backbone": "squeezenet1_1", "layer": "fc7", "mode": "shared"},
                     proposal_options={"mode": "rcnn-fast", "ks": [50, 100]}, training={"split": "trainval"})


def test_model_roundtrip_and_scoring(tmp_path):
    m = _model()
    p = m.save(tmp_path / "m.rcnn")
    m2 = RCNNModel.load(p)
    np.testing.assert_array_equal(m2.W, m.W)
    np.testing.assert_array_equal(m2.b, m.b)
    assert m2.classes == m.classes and m2.feature_scale == 0.5 and m2.nms_iou == 0.3
    assert m2.proposal_config().ks == (50, 100)
    f = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float16)
    np.testing.assert_allclose(m2.score(f), (f.astype(np.float32) * 0.5) @ m.W + m.b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="expects"):
        m2.score(np.zeros((2, 7), np.float32))


def test_model_with_per_block_scale_roundtrips(tmp_path):
    """Joined taps (pool5+fire5) store one scale per block: [[dim, scale], ...] in the metadata."""
    from rcnn.sources import block_scale

    scale = block_scale([4.0, 40.0], (5, 3))
    assert scale.shape == (8,) and scale[0] == pytest.approx(20 / np.sqrt(2) / 4) and scale[-1] == pytest.approx(20 / np.sqrt(2) / 40)
    m = RCNNModel(**{**_model().__dict__, "feature_scale": scale, "layer": "pool5+fire5"})
    m2 = RCNNModel.load(m.save(tmp_path / "m.rcnn"))
    assert m2.metadata()["feature_scale"] == [[5, pytest.approx(scale[0])], [3, pytest.approx(scale[-1])]]
    np.testing.assert_array_equal(m2.feature_scale, scale)
    f = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(m2.score(f), (f * scale) @ m.W + m.b, rtol=1e-5, atol=1e-5)


def test_model_load_rejects_bad_files(tmp_path):
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.rcnn"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not an rcnn model file"):
        RCNNModel.load(junk)
    with pytest.raises(ModelError, match="no such model file"):
        RCNNModel.load(tmp_path / "missing.rcnn")
    plain = tmp_path / "plain.rcnn"
    save_file({"W": np.zeros((2, 2), np.float32)}, str(plain))
    with pytest.raises(ModelError, match="without rcnn model metadata"):
        RCNNModel.load(plain)
    m = _model()
    m.format_version = FORMAT_VERSION + 1
    m.save(tmp_path / "future.rcnn")
    with pytest.raises(ModelError, match="format version"):
        RCNNModel.load(tmp_path / "future.rcnn")


def test_check_backbone_hash_mismatch():
    class BB:
        name = "squeezenet1_1"
        weights_hash = "cd" * 32

    with pytest.raises(ModelError, match="weights"):
        check_backbone(_model(), BB())
    BB.weights_hash = "ab" * 32
    check_backbone(_model(), BB())
    BB.name = "efficientnet_lite0"
    with pytest.raises(ModelError, match="trained on backbone"):
        check_backbone(_model(), BB())


def test_postprocess_nms_per_class_threshold_and_caps():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.5, -2.0], [0.2, 0.95]], np.float32)
    b, s, lab = postprocess(boxes, scores)
    # class 0: box0 suppresses box1 (IoU 0.82) and box3 (identical); box2 kept. class 1: box3, box0 suppressed, box2 kept
    got = sorted(zip(lab.tolist(), s.tolist(), strict=True))
    assert [g[0] for g in got] == [0, 0, 1, 1]
    assert [g[1] for g in got] == pytest.approx([0.5, 0.9, -2.0, 0.95])
    assert (np.diff(s) <= 0).all()
    b, s, lab = postprocess(boxes, scores, threshold=0.0)
    assert (s > 0).all() and len(s) == 3
    b, s, lab = postprocess(boxes, scores, top_k=2)
    assert s.tolist() == pytest.approx([0.95, 0.9])
    b, s, lab = postprocess(boxes, scores, max_per_class=1)
    assert sorted(lab.tolist()) == [0, 1]
    b, s, lab = postprocess(boxes, scores, active=np.array([False, True]))
    assert set(lab.tolist()) == {1}
    b, s, lab = postprocess(np.zeros((0, 4)), np.zeros((0, 2)))
    assert b.shape == (0, 4) and s.shape == (0,)
    # degenerate boxes never become detections
    b, s, lab = postprocess(np.array([[5, 5, 5, 9]], np.float32), np.array([[3.0, 3.0]]))
    assert len(s) == 0


def _synthetic_dataset(n, start):
    return Dataset(Path("/nonexistent"), "x", list(CLASSES), synthetic_records(n, start))


def test_fit_detect_evaluate_end_to_end(tmp_path):
    src = SyntheticSource()
    train = _synthetic_dataset(30, 0)
    model, _ = fit(train, src, SVMConfig(retrain_limit=200, stats_images=10))
    assert model.trained.tolist() == [True, True, False]
    assert model.training["images"] == 30 and "absent" in " ".join(model.training["warnings"])
    p = model.save(tmp_path / "synthetic.rcnn")
    model = RCNNModel.load(p)
    test = _synthetic_dataset(12, 1000)
    stats = DetectStats()
    dets = detect_dataset(model, test, src, stats=stats)
    assert stats.images == 12 and len(dets) > 0
    assert 2 not in set(dets.labels.tolist())  # the untrained class is never detected
    result, warns = evaluate_model(model, test, dets)
    aps = {c.name: c.ap for c in result.classes}
    assert aps["cell"] > 0.8 and aps["blob"] > 0.8
    assert math.isnan(aps["absent"]) and any("absent" in w for w in warns)
    paths = save_pr_curves(result, tmp_path / "pr")
    assert [q.name for q in paths] == ["pr_cell.png", "pr_blob.png"]
    # a model whose weights are random does much worse: the test can fail
    bad = RCNNModel(**{**model.__dict__, "W": np.random.default_rng(0).normal(size=model.W.shape).astype(np.float32)})
    r_bad, _ = evaluate_model(bad, test, detect_dataset(bad, test, src))
    assert r_bad.mean_ap < result.mean_ap - 0.3


def test_evaluate_class_missing_from_model():
    src = SyntheticSource()
    m = _model(C=3, D=24)
    test = _synthetic_dataset(4, 2000)
    test.classes = ["cell", "blob", "absent", "extra"]
    dets = detect_dataset(m, test, src)
    result, warns = evaluate_model(m, test, dets)
    assert math.isnan(result.classes[3].ap)
    assert any("'extra' is not in the model" in w for w in warns)


def test_empty_proposals_image_gives_no_detections():
    class NoBoxes(SyntheticSource):
        def regions(self, record):
            return np.zeros((0, 4), np.float32), np.zeros((0, 24), np.float16)

    m = _model(C=3, D=24)
    stats = DetectStats()
    dets = detect_dataset(m, _synthetic_dataset(3, 0), NoBoxes(), stats=stats)
    assert len(dets) == 0 and len(stats.no_proposals) == 3


def test_hog_features_shape_and_localisation():
    img = np.zeros((100, 120, 3), np.uint8)
    img[20:60, 30:70] = 255  # a bright square
    boxes = np.array([[30, 20, 70, 60], [25, 15, 75, 65], [80, 70, 110, 95]], np.float32)
    f = hog_features(img, boxes)
    assert f.shape == (3, 7 * 7 * 4 * 9) and f.dtype == np.float32
    assert np.linalg.norm(f[0] - f[1]) < np.linalg.norm(f[0] - f[2])
    assert np.abs(f[2]).sum() == 0  # a flat region has no gradients
    assert hog_features(img, np.zeros((0, 4))).shape == (0, 1764)


def test_model_metadata_is_json(tmp_path):
    from safetensors import safe_open

    p = _model().save(tmp_path / "m.rcnn")
    with safe_open(str(p), framework="numpy") as f:
        meta = json.loads(f.metadata()["rcnn"])
    for k in ("format_version", "classes", "backbone", "weights_hash", "layer", "mode", "feature_scale", "proposal_options",
              "nms_iou", "training"):
        assert k in meta
    assert meta["classes"] == CLASSES[:3] and meta["format_version"] == FORMAT_VERSION and meta["feature_scale"] == 0.5


def test_cnn_features_gt_rows_and_one_pass_fill(tmp_path):
    """Warp mode: a joined layer fills each tap's cache in one pass (uncompressed on request), where a
    single tap's source then finds it. Shared mode: CNNFeatures splits the ground-truth rows off and they equal a
    direct extraction of the GT boxes (shared mode)."""
    from dataclasses import replace

    from rcnn.data import load_dataset, load_image
    from rcnn.features import FeatureConfig, feature_path, get_features, is_cached
    from rcnn.proposals import ProposalConfig
    from rcnn.sources import CNNFeatures
    from test_cli_detect import _tiny_voc

    data = _tiny_voc(tmp_path / "voc", n=3)
    ds = load_dataset(data, "trainval")
    rec = ds.records[0]
    pc = ProposalConfig(mode="fast", resize_width=0, max_boxes=40)
    warp = FeatureConfig(backbone="squeezenet1_1", mode="warp", grid=3, with_gt=True)
    joined = replace(warp, layer="pool5+fc6")  # warp mode caches every tap's region features
    assert not is_cached(rec, pc, joined, data)
    get_features(rec, pc, joined, data, compress=False)
    assert is_cached(rec, pc, replace(warp, layer="pool5"), data) and is_cached(rec, pc, replace(warp, layer="fc6"), data)
    files = CNNFeatures(pc, joined, data).cache_files(rec)  # one file per tap of a joined layer
    assert len(files) == 2 and all(f.is_file() for f in files)
    with np.load(feature_path(rec, pc, replace(warp, layer="fc6"), data)) as z:
        assert z.zip.getinfo("feats.npy").compress_type == 0  # stored, not deflated
    fc = replace(warp, mode="shared")  # shared mode caches the trunk maps: one file for every tap
    assert len(CNNFeatures(pc, replace(fc, layer="pool5+fc6"), data).cache_files(rec)) == 1
    src = CNNFeatures(pc, replace(fc, layer="fc6"), data)
    boxes, feats = src.regions(rec)
    gt = src.gt_features(rec)
    assert len(boxes) == len(feats) <= 40 and gt.shape == (len(rec.boxes), 512)
    all_boxes, _ = get_features(rec, pc, src.feature_config, data)  # a cache hit: the GT rows come first
    np.testing.assert_allclose(all_boxes[: len(rec.boxes)], rec.boxes)
    direct = src.extract(load_image(rec.path), rec.boxes)
    np.testing.assert_allclose(gt.astype(np.float32), direct, rtol=2e-2, atol=2e-2)


def test_feature_source_flip_override_reaches_the_box_regressor():
    """``feature_source(flip=True)``: test-time flip averaging for a model trained without it (a
    different cache key), also for the box regressor's features; HOG has no such option."""
    from rcnn.bbox_regression import BoxRegressor

    class BB:
        name = "squeezenet1_1"
        weights_hash = "ab" * 32

    m = _model()
    plain, flipped = m.feature_source(backbone=BB()), m.feature_source(backbone=BB(), flip=True)
    assert not plain.feature_config.flip and flipped.feature_config.flip
    assert plain.feature_config.key() != flipped.feature_config.key()
    reg = BoxRegressor(classes=m.classes, W=np.zeros((3, 8, 4), np.float32), b=np.zeros((3, 4), np.float32),
                       trained=np.ones(3, bool), feature_scale=1.0, layer="pool5",
                       feature_options={"backbone": "squeezenet1_1", "layer": "pool5", "mode": "shared", "grid": 3})
    assert flipped.with_options(reg.feature_options).feature_config.flip
    assert not plain.with_options(reg.feature_options).feature_config.flip
    assert flipped.with_options(reg.feature_options).feature_config.grid == 3  # the regressor's own settings
    hog = RCNNModel(**{**m.__dict__, "backbone": "hog", "feature_options": {}})
    with pytest.raises(ModelError, match="HOG"):
        hog.feature_source(flip=True)


def test_mirror_augmented_training_sees_both_views(tmp_path):
    """MirrorAugmented: each training image twice (itself, then mirrored: same boxes, the mirrored
    image's features); the model it trains scores plain features and says it was augmented."""
    from rcnn.data import load_dataset, load_image
    from rcnn.features import FeatureConfig, extract_features
    from rcnn.proposals import ProposalConfig
    from rcnn.sources import CNNFeatures, MirrorAugmented
    from test_cli_detect import _tiny_voc

    data = _tiny_voc(tmp_path / "voc", n=5)
    ds = load_dataset(data, "trainval")
    pc = ProposalConfig(mode="fast", resize_width=0, max_boxes=20)
    src = MirrorAugmented(CNNFeatures(pc, FeatureConfig(backbone="squeezenet1_1", layer="fc6", mode="shared", grid=3), data))
    recs = src.augment(ds.records[:2])
    assert [r.image_id for r in recs] == [ds.records[0].image_id] * 2 + [ds.records[1].image_id] * 2
    (b0, f0), (b1, f1) = src.regions(recs[0]), src.regions(recs[1])
    np.testing.assert_allclose(b0, b1)  # same labelled boxes...
    assert not np.allclose(f0, f1, atol=1e-2)  # ...described by another view
    img = load_image(recs[1].path)
    w = img.shape[1]
    gt = recs[1].boxes
    mirrored = np.stack([w - gt[:, 2], gt[:, 1], w - gt[:, 0], gt[:, 3]], 1)
    ref = extract_features(np.ascontiguousarray(img[:, ::-1]), mirrored, src.plain.backbone, "fc6", "shared", grid=3)
    np.testing.assert_allclose(src.gt_features(recs[1]).astype(np.float32), ref, rtol=2e-2, atol=2e-2)
    model, _ = fit(ds, src, SVMConfig(retrain_limit=50, stats_images=4))
    assert model.training["augment"] == "mirror" and model.training["images"] == len(ds.records)
    assert "mirror" not in {k for k, v in model.feature_options.items() if v}  # tested on plain features


def test_relocalize_rescores_and_regresses_the_regressed_boxes():
    """Iterative localisation: each candidate's own-class regressed box is re-scored (its score is
    the score of the box it came from, as for proposals) and regressed again; 0 rounds changes nothing."""
    from rcnn.detect import relocalize
    from rcnn.scoring import score_topk

    class Source(FeatureSource):  # features of a box = its coordinates
        def extract(self, image, boxes, layers=None):
            return np.asarray(boxes, np.float32).reshape(-1, 4)

        def with_options(self, options):
            return self

    class Reg:  # class c moves every box c + 1 px right
        feature_options: dict = {}  # noqa: RUF012

        def refine(self, boxes, feats, w, h):
            out = np.repeat(np.asarray(boxes, np.float32)[:, None], 2, 1)
            out[:, :, [0, 2]] += np.array([1.0, 2.0], np.float32)[None, :, None]
            return out

    W = np.array([[1, 0], [0, 1], [0, 0], [0, 0]], np.float32)  # class 0 scores x1, class 1 scores y1
    m = RCNNModel(classes=["a", "b"], W=W, b=np.zeros(2, np.float32), trained=np.ones(2, bool), feature_scale=1.0,
                  backbone="x", weights_hash="x", layer="x", mode="shared", bbox_reg=Reg())
    props = np.array([[0, 0, 10, 10], [20, 5, 30, 15], [40, 1, 50, 11]], np.float32)
    cand = score_topk(props, W, np.zeros(2, np.float32), k=None)
    per_class = Reg().refine(props, props, 100, 100)  # (N,C,4) after the first regression
    img = np.zeros((100, 100, 3), np.uint8)
    boxes, top = relocalize(m, img, Source(), per_class, cand, rounds=1)
    ri, ci, sv = top.flat()
    assert len(ri) == 6 and sorted(ci.tolist()) == [0, 0, 0, 1, 1, 1]  # every (proposal, class) candidate once
    for r, c, v in zip(ri, ci, sv, strict=True):
        b1 = per_class[:, c]  # the candidates of class c after the first regression
        k = int(np.argmin(np.abs(b1 + np.array([c + 1, 0, c + 1, 0], np.float32) - boxes[r]).sum(1)))
        np.testing.assert_allclose(boxes[r], b1[k] + np.array([c + 1, 0, c + 1, 0]))  # regressed once more
        assert v == pytest.approx(b1[k, c])  # scored as the box b1 (class 0 scores x1, class 1 y1)
    assert top.scores[0].tolist() == sorted(top.scores[0].tolist(), reverse=True)
    b0, t0 = relocalize(m, img, Source(), per_class, cand, rounds=0)
    ref = postprocess(per_class, cand)
    got = postprocess(b0, t0)
    for x, y in zip(ref, got, strict=True):
        np.testing.assert_allclose(x, y)
    m.bbox_reg = None
    with pytest.raises(ModelError, match="box regressor"):
        relocalize(m, img, Source(), per_class, cand)
