"""Region warping geometry (to the pixel), both extraction modes, and the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

from rcnn.backbones import get_backbone
from rcnn.features import FeatureConfig, extract_features, features_for_dataset, get_features, warp_regions

FILL = (7, 8, 9)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def coded_image(h: int = 60, w: int = 80) -> np.ndarray:
    """Every pixel distinct: R = x, G = y, B = x + y (so misplaced pixels are caught)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, y, x + y], -1).astype(np.uint8)


def test_tight_warp_is_the_box_itself():
    img = coded_image()
    out = warp_regions(img, np.array([[10, 5, 26, 21]]), 16)
    assert out.shape == (1, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], img[5:21, 10:26])


def test_warp_takes_only_box_pixels_any_aspect():
    img = np.zeros((60, 80, 3), np.uint8)
    img[10:20, 10:50] = 255  # a 40×10 box, warped anisotropically to 16×16
    out = warp_regions(img, np.array([[10, 10, 50, 20], [0, 0, 80, 60]], np.float32), 16)
    assert (out[0] == 255).all()  # no bleed from outside the tight box
    assert out[1].min() == 0 and out[1].max() == 255  # whole image: both present


def test_context_padding_p_pixels_in_warped_frame():
    img = coded_image()
    # box 16×16, size 20, p = 2: the window grows by 2 px each side (scale 1: identity resize)
    out = warp_regions(img, np.array([[20, 20, 36, 36]]), 20, context_pad=2)
    np.testing.assert_array_equal(out[0], img[18:38, 18:38])


def test_context_outside_image_is_mean_fill():
    img = coded_image()
    out = warp_regions(img, np.array([[0, 0, 16, 16]]), 20, context_pad=2, fill=FILL)[0]
    assert (out[:2] == FILL).all() and (out[:, :2] == FILL).all()
    np.testing.assert_array_equal(out[2:, 2:], img[0:18, 0:18])


def test_tightest_square_with_and_without_context():
    img = coded_image()
    box = np.array([[20, 20, 28, 36]])  # 8 wide, 16 tall -> 16×16 square centred at x = 24
    sq = warp_regions(img, box, 16, method="square")[0]
    np.testing.assert_array_equal(sq, img[20:36, 16:32])
    nc = warp_regions(img, box, 16, method="square_nocontext", fill=FILL)[0]
    np.testing.assert_array_equal(nc[:, 4:12], img[20:36, 20:28])
    assert (nc[:, :4] == FILL).all() and (nc[:, 12:] == FILL).all()


def test_square_with_padding_at_border():
    img = coded_image()
    # 16×16 box at the right edge, size 20, p = 2: window x 62..82 clipped to 62..80
    out = warp_regions(img, np.array([[64, 30, 80, 46]]), 20, context_pad=2, method="square", fill=FILL)[0]
    np.testing.assert_array_equal(out[:, :18], img[28:48, 62:80])
    assert (out[:, 18:] == FILL).all()


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="uint8"):
        warp_regions(np.zeros((5, 5)), np.zeros((1, 4)), 8)
    with pytest.raises(ValueError, match="NaN"):
        warp_regions(coded_image(), np.array([[0, 0, np.nan, 4]]), 8)
    with pytest.raises(ValueError, match="method"):
        warp_regions(coded_image(), np.array([[0, 0, 4, 4]]), 8, method="crop")


def test_degenerate_box_still_one_pixel():
    out = warp_regions(coded_image(), np.array([[5, 5, 5, 5], [79.6, 59.6, 80, 60]]), 8)
    assert (out[0] == coded_image()[5, 5]).all() and (out[1] == coded_image()[59, 79]).all()


@pytest.fixture(scope="module")
def squeeze():
    return get_backbone("squeezenet1_1")


def test_warp_and_shared_same_shapes_and_logits_classify(squeeze):
    img = data.chelsea()
    h, w = img.shape[:2]
    boxes = np.array([[0, 0, w, h], [50, 30, 250, 200], [100, 100, 140, 130]], np.float32)
    cats = {"tabby", "tiger cat", "Egyptian cat"}
    for mode in ("warp", "shared"):
        out = extract_features(img, boxes, squeeze, ["fc7", "logits", "pool5"], mode)
        assert out["fc7"].shape == (3, 512) and out["logits"].shape == (3, 1000)
        assert out["pool5"].shape == (3, 512 * 36)
        top = {squeeze.categories[i] for i in np.argsort(-out["logits"][0])[:5]}
        assert cats & top, (mode, top)
        single = extract_features(img, boxes, squeeze, "fc7", mode)
        np.testing.assert_allclose(single, out["fc7"], rtol=1e-4, atol=1e-4)
    # batching does not change warp features
    b1 = extract_features(img, boxes, squeeze, "fc6", "warp", batch_size=1)
    b3 = extract_features(img, boxes, squeeze, "fc6", "warp", batch_size=3)
    np.testing.assert_allclose(b1, b3, rtol=1e-4, atol=1e-4)
    # grid option changes pool5's size; empty input gives an empty (0, D) array
    assert extract_features(img, boxes, squeeze, "pool5", "shared", grid=3).shape == (3, 512 * 9)
    assert extract_features(img, boxes[:0], squeeze, "fc7", "shared").shape == (0, 512)


def test_bf16_precision_close_to_fp32_and_in_the_key(squeeze):
    img = data.chelsea()
    boxes = np.array([[0, 0, 451, 300], [50, 30, 250, 200], [100, 100, 140, 130]], np.float32)
    for mode in ("warp", "shared"):
        ref = extract_features(img, boxes, squeeze, "fc7", mode)
        fast = extract_features(img, boxes, squeeze, "fc7", mode, precision="bf16")
        assert not np.array_equal(ref, fast)  # it really ran in another arithmetic
        rel = np.linalg.norm(fast - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert rel.max() < 0.03, (mode, rel)
    # RoI max pooling under bf16 autocast (torchvision's roi_pool has no CPU autocast rule)
    ref = extract_features(img, boxes, squeeze, "pool5", "shared", grid=3, pool="max")
    fast = extract_features(img, boxes, squeeze, "pool5", "shared", grid=3, pool="max", precision="bf16")
    assert (np.linalg.norm(fast - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() < 0.03
    with pytest.raises(ValueError, match="precision"):
        extract_features(img, boxes, squeeze, "fc7", "warp", precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        FeatureConfig(precision="half")
    assert FeatureConfig(precision="bf16").key() != FeatureConfig().key()
    assert "bf16" in FeatureConfig(precision="bf16").describe()


def test_shared_multiscale_keeps_box_order(squeeze):
    img = data.coffee()[::2, ::2].copy()  # 300×200
    boxes = np.array([[0, 0, 300, 200], [10, 10, 40, 40], [100, 50, 250, 190], [5, 5, 25, 30]], np.float32)
    multi = extract_features(img, boxes, squeeze, "fc7", "shared", scales=(1.0, 2.0))
    small = extract_features(img, boxes[[1, 3]], squeeze, "fc7", "shared", scales=(2.0,))
    big = extract_features(img, boxes[[0, 2]], squeeze, "fc7", "shared", scales=(1.0,))
    np.testing.assert_allclose(multi[[1, 3]], small, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(multi[[0, 2]], big, rtol=1e-4, atol=1e-4)
    # max_side caps the scale: the same as running on the image pre-shrunk to that size
    import cv2

    capped = extract_features(img, boxes, squeeze, "fc7", "shared", scales=(1.5,), max_side=150)
    half = cv2.resize(img, (150, 100), interpolation=cv2.INTER_AREA)
    ref = extract_features(half, boxes / 2, squeeze, "fc7", "shared", scales=(1.0,))
    np.testing.assert_allclose(capped, ref, rtol=1e-4, atol=1e-4)


def test_shared_context_pad_pools_the_warp_window(squeeze):
    from rcnn.features import crop_geometry, dilate_boxes

    box = np.array([[100, 50, 150, 90]], np.float32)
    big = dilate_boxes(box, 227, 16)
    # the window warp mode crops: 16 px of context at 227 px, same centre, per axis
    x1, y1, x2, y2 = big[0]
    assert (x1 + x2) / 2 == pytest.approx(125) and (y1 + y2) / 2 == pytest.approx(70)
    assert (x2 - x1) * (227 - 32) / 227 == pytest.approx(50, rel=1e-5)
    (a, b, c, d), _ = crop_geometry(box[0], 227, 16, "warp", 1000, 1000)
    np.testing.assert_allclose([a, b, c, d], big[0], atol=1)
    img = data.coffee()[::2, ::2].copy()
    padded = extract_features(img, box, squeeze, "pool5", "shared", context_pad=16, grid=3)
    np.testing.assert_allclose(padded, extract_features(img, big, squeeze, "pool5", "shared", grid=3), rtol=1e-5)
    assert not np.allclose(padded, extract_features(img, box, squeeze, "pool5", "shared", grid=3))
    with pytest.raises(ValueError, match="context_pad"):
        dilate_boxes(box, 227, 114)
    # shared keys: context 0 keeps the old key, context 16 is a different cache
    assert FeatureConfig(mode="shared", context_pad=16).key() != FeatureConfig(mode="shared").key()
    assert FeatureConfig(mode="shared", method="square").key() == FeatureConfig(mode="shared").key()


def test_flip_averaging_is_mirror_equivariant(squeeze):
    """Flip-averaged features of the mirrored image at the mirrored box are the original's with
    the pool5 grid mirrored (fc7, a global mean, unchanged) — in both modes."""
    img = data.coffee()[::2, ::2].copy()  # 300×200
    w = img.shape[1]
    boxes = np.array([[10, 10, 120, 90], [100, 50, 250, 190], [5, 5, 45, 60]], np.float32)
    mirrored = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    for mode in ("warp", "shared"):
        a = extract_features(img, boxes, squeeze, ["pool5", "fc7"], mode, grid=3, flip=True)
        b = extract_features(np.ascontiguousarray(img[:, ::-1]), mirrored, squeeze, ["pool5", "fc7"], mode, grid=3, flip=True)
        np.testing.assert_allclose(b["fc7"], a["fc7"], rtol=1e-3, atol=1e-3)
        grid_a = a["pool5"].reshape(3, 512, 3, 3)[..., ::-1].reshape(3, -1)
        np.testing.assert_allclose(b["pool5"], grid_a, rtol=1e-3, atol=2e-3)
        plain = extract_features(img, boxes, squeeze, "pool5", mode, grid=3)
        assert not np.allclose(plain, a["pool5"], atol=1e-2)  # it really averaged another view
        # mirror: the mirrored image's features at the mirrored boxes
        m = extract_features(img, boxes, squeeze, "pool5", mode, grid=3, mirror=True)
        ref = extract_features(np.ascontiguousarray(img[:, ::-1]), mirrored, squeeze, "pool5", mode, grid=3)
        np.testing.assert_allclose(m, ref, rtol=1e-4, atol=1e-4)
        assert not np.allclose(m, plain, atol=1e-2)
    assert FeatureConfig(flip=True).key() != FeatureConfig().key() != FeatureConfig(mirror=True).key()
    assert "flip-averaged" in FeatureConfig(flip=True).describe()


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_feature_cache_roundtrip_and_keys(monkeypatch):
    voc = DATA / "VOC2007-test-sample"
    if not voc.is_dir():
        pytest.skip(f"{voc} absent")
    from rcnn import proposals
    from rcnn.data import load_dataset

    ds = load_dataset(voc, "test")
    ds.records = ds.records[:2]
    # made-up proposals keep this test fast and independent of selective search
    fake = {r.image_id: np.array([[0, 0, 50, 40], [10, 20, 100, 90], [5, 5, r.width, r.height]], np.float32)
            for r in ds.records}
    monkeypatch.setattr(proposals, "get_proposals", lambda rec, cfg, root: fake[rec.image_id])
    fc = FeatureConfig(mode="shared", with_gt=True)
    summ = features_for_dataset(ds, None, fc)
    assert summ.computed == 2 and summ.cached == 0 and summ.cache_mb > 0
    rec = ds.records[0]
    boxes, feats = get_features(rec, None, fc, voc)
    assert feats.dtype == np.float16 and feats.shape == (len(rec.boxes) + 3, 512)
    np.testing.assert_array_equal(boxes[: len(rec.boxes)], rec.boxes)
    img_feats = extract_features(__import__("rcnn.data").data.load_image(rec.path), boxes, "squeezenet1_1", "fc7",
                                 "shared")
    np.testing.assert_allclose(feats.astype(np.float32), img_feats, rtol=1e-2, atol=1e-2)
    # a temporary file left by a killed run is cleaned up once it is old; a fresh one is kept
    import os

    from rcnn.features import feature_dir

    folder = feature_dir(__import__("rcnn.proposals").proposals.ProposalConfig(), fc, voc)
    old, new = folder / ".a.npz.x1.tmp", folder / ".b.npz.x2.tmp"
    old.write_bytes(b"partial")
    new.write_bytes(b"partial")
    os.utime(old, (1, 1))
    again = features_for_dataset(ds, None, fc)
    assert again.cached == 2 and again.computed == 0
    assert not old.exists() and new.exists()
    assert fc.weights_hash() == get_backbone("squeezenet1_1").weights_hash
    # every setting is in the key
    keys = {FeatureConfig().key(), fc.key(), FeatureConfig(mode="shared").key(), FeatureConfig(layer="fc6").key(),
            FeatureConfig(context_pad=16).key(), FeatureConfig(mode="shared", scales=(1.0,)).key(),
            FeatureConfig(backbone="efficientnet_lite0").key()}
    assert len(keys) == 7
    assert FeatureConfig(batch_size=7).key() == FeatureConfig().key()


def test_cli_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from rcnn.cli import app

    voc = DATA / "VOC2007-test-sample"
    if not voc.is_dir():
        pytest.skip(f"{voc} absent")
    r = CliRunner().invoke(app, ["features", str(voc), "--split", "test", "--backbone", "alexnet"])
    assert r.exit_code == 2 and "--weights" in r.output
    r = CliRunner().invoke(app, ["features", str(voc), "--split", "test", "--mode", "fast"])
    assert r.exit_code == 2 and "mode" in r.output
    r = CliRunner().invoke(app, ["features", str(voc), "--split", "test", "--layer", "pool5+fire9"])
    assert r.exit_code == 2 and "unknown layer(s) ['fire9']" in r.output


def test_hypercolumn_joins_taps_from_one_pass(squeeze):
    """``pool5+fire5`` is pool5 and SqueezeNet's stride-8 fire5 map pooled to the same grid,
    concatenated; the split trunk leaves pool5 unchanged; shared-mode fire5 cells are RoIAlign
    on the stride-8 map; flip averaging mirrors its grid like pool5's."""
    import cv2
    import torch
    from torchvision.ops import roi_align

    from rcnn.features import check_layer, layer_dim, split_layer

    img = data.coffee()[::2, ::2].copy()  # 300×200
    h, w = img.shape[:2]
    boxes = np.array([[10, 10, 120, 90], [100, 50, 250, 190], [5, 5, 45, 60]], np.float32)
    for mode in ("warp", "shared"):
        got = extract_features(img, boxes, squeeze, ["pool5", "fire5", "pool5+fire5"], mode, grid=3)
        assert got["fire5"].shape == (3, 256 * 9) and layer_dim(squeeze, "pool5+fire5", 3) == 512 * 9 + 256 * 9
        np.testing.assert_array_equal(got["pool5+fire5"], np.concatenate([got["pool5"], got["fire5"]], 1))
        alone = extract_features(img, boxes, squeeze, "pool5", mode, grid=3)
        np.testing.assert_allclose(got["pool5"], alone, rtol=1e-5, atol=1e-5)
        assert got["fire5"].std() > 0 and not np.allclose(got["fire5"][0], got["fire5"][1])
    # shared mode: the image ×1.5 (SHARED_SCALES), fire5 = trunk[:8], stride 8, kept as float16 (TRUNK_DTYPE)
    big = cv2.resize(img, (round(w * 1.5), round(h * 1.5)), interpolation=cv2.INTER_CUBIC)
    with torch.inference_mode():
        fmap = squeeze.trunk[:8](squeeze.preprocess(big[None])).half().float()
        ref = roi_align(fmap, [torch.from_numpy(boxes * 1.5)], 3, 1 / 8, sampling_ratio=2, aligned=True).flatten(1)
    np.testing.assert_allclose(got["fire5"], ref.numpy(), rtol=1e-4, atol=1e-4)
    mirrored = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    a = extract_features(img, boxes, squeeze, "fire5", "shared", grid=3, flip=True)
    b = extract_features(np.ascontiguousarray(img[:, ::-1]), mirrored, squeeze, "fire5", "shared", grid=3, flip=True)
    np.testing.assert_allclose(b, a.reshape(3, 256, 3, 3)[..., ::-1].reshape(3, -1), rtol=1e-3, atol=2e-3)
    # bad names: one clear line
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['conv9'\].*joined by"):
        check_layer(squeeze, "pool5+conv9")
    with pytest.raises(ValueError, match="each once"):
        split_layer("pool5++fire5")
    with pytest.raises(ValueError, match="unknown layer"):
        extract_features(img, boxes, squeeze, "fc6+fire9", "shared")
    # the grid is in the key of every gridded tap, also in warp mode
    assert FeatureConfig(layer="fire5", grid=3).key() != FeatureConfig(layer="fire5", grid=6).key()
    assert FeatureConfig(layer="fc7", grid=3).key() == FeatureConfig(layer="fc7", grid=6).key()


def _one_image(tmp_path, monkeypatch):
    import cv2

    from rcnn import proposals
    from rcnn.data import ImageRecord

    path = tmp_path / "a.png"
    cv2.imwrite(str(path), data.coffee()[::3, ::3, ::-1])
    rec = ImageRecord("a", path, 200, 134, np.array([[20, 20, 90, 80]], np.float32), np.zeros(1, np.int64),
                      np.zeros(1, bool))
    monkeypatch.setattr(proposals, "get_proposals", lambda r, c, root: np.array([[0, 0, 50, 40], [60, 30, 190, 120]],
                                                                                    np.float32))
    return rec


def test_joined_layer_cached_tap_by_tap_in_warp_mode(tmp_path, monkeypatch, squeeze):
    """Warp mode: a joined layer reads each tap's own cache; a missing tap is computed alone and the other reused."""
    from rcnn import features, proposals
    from rcnn.features import feature_path, tap_configs

    rec = _one_image(tmp_path, monkeypatch)
    fc = FeatureConfig(layer="pool5+fire5", mode="warp", grid=3, with_gt=True)
    pool5, fire5 = tap_configs(fc)
    assert (pool5.layer, fire5.layer) == ("pool5", "fire5")
    boxes, feats = get_features(rec, None, fc, tmp_path)
    assert feats.shape == (3, 512 * 9 + 256 * 9) and feats.dtype == np.float16
    np.testing.assert_array_equal(boxes[0], rec.boxes[0])
    _, p5 = get_features(rec, None, pool5, tmp_path)  # the pool5 tap alone: its cache, no recompute
    np.testing.assert_array_equal(p5, feats[:, : 512 * 9])
    feature_path(rec, proposals.ProposalConfig(), fire5, tmp_path).unlink()
    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    _, again = get_features(rec, None, fc, tmp_path)
    assert calls == [["fire5"]]  # only the missing tap
    np.testing.assert_allclose(again.astype(np.float32), feats.astype(np.float32), atol=1e-2)


def test_shared_mode_caches_trunk_maps_not_regions(tmp_path, monkeypatch, squeeze):
    """Shared mode stores each image's trunk maps once (float16 + zstd) and pools any boxes from
    them: the same features as extracting from the image, every tap of one trunk pass, a side tap
    missing from the cache added by one recompute, stale or damaged entries recomputed."""
    from rcnn import features
    from rcnn.data import load_image
    from rcnn.features import feature_path, get_trunk_maps, pooled_features

    rec = _one_image(tmp_path, monkeypatch)
    runs = []
    real = features.trunk_maps
    monkeypatch.setattr(features, "trunk_maps", lambda *a, **k: runs.append(list(a[2])) or real(*a, **k))
    p5 = FeatureConfig(layer="pool5", mode="shared", grid=3, with_gt=True)
    joined = FeatureConfig(layer="pool5+fire5", mode="shared", grid=3, with_gt=True)
    assert p5.trunk_key() == joined.trunk_key() != FeatureConfig(mode="shared", scales=(1.0,)).trunk_key()
    boxes, f5 = get_features(rec, None, p5, tmp_path)
    assert runs == [[]] and f5.shape == (3, 512 * 9) and f5.dtype == np.float16
    path = feature_path(rec, None, p5, tmp_path)
    assert path.is_file() and path.stat().st_size < 0.5 * (3 * 512 * 9 * 2 + 512 * 13 * 19 * 2)
    boxes2, fj = get_features(rec, None, joined, tmp_path)  # fire5 missing from the cache: one pass adds it
    assert runs == [[], ["fire5"]]
    np.testing.assert_array_equal(boxes2, boxes)
    np.testing.assert_array_equal(fj[:, : 512 * 9], f5)
    get_features(rec, None, p5, tmp_path)
    get_features(rec, None, joined, tmp_path)
    assert len(runs) == 2  # both read the same cached maps
    direct = extract_features(load_image(rec.path), boxes, squeeze, "pool5+fire5", "shared", grid=3)
    np.testing.assert_allclose(direct, pooled_features(rec, boxes, joined, tmp_path), rtol=1e-6, atol=1e-6)
    path.write_bytes(b"damaged")  # a damaged entry is recomputed, not an error
    runs.clear()
    assert get_trunk_maps(rec, joined, tmp_path).names() == {"trunk", "fire5"} and runs == [["fire5"]]


def test_roi_cells_in_threads_equal_one_thread():
    """Boxes pooled in chunks on several threads give exactly the one-thread cells."""
    import torch

    from rcnn.features import roi_cells

    rng = np.random.default_rng(0)
    fmap = torch.from_numpy(rng.standard_normal((1, 8, 20, 30)).astype(np.float32))
    xy = rng.uniform(0, 400, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 150, (300, 2))], 1).astype(np.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = roi_cells(fmap, boxes, 3, 16)
        torch.set_num_threads(1)
        serial = roi_cells(fmap, boxes, 3, 16)
    finally:
        torch.set_num_threads(before)
    assert threaded.shape == (300, 8, 3, 3) and torch.equal(threaded, serial)
