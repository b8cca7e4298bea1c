"""Semantic segmentation (paper §4): mask proposals, region features, SVR + pasting, VOC measure."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rcnn.data import ImageRecord
from rcnn.segmentation import (
    MaskError,
    MaskProposalConfig,
    RegionFeatureConfig,
    RegionMasks,
    SegmentationEvaluator,
    SegmentationModel,
    choose_threshold,
    class_label_map,
    class_masks,
    hierarchical_grouping,
    mask_proposals,
    mask_recall,
    paste,
    read_voc_segmentation,
    region_features,
    train_segmenter,
    warp_masks,
)
from rcnn.segmentation.features import fg_crops, mask_boxes
from rcnn.segmentation.masks import VOID, MaskWarning, colorize, voc_palette
from rcnn.segmentation.model import ImageRegions, class_targets

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PENN = DATA / "PennFudanPed"


# ------------------------------------------------------------------ grouping / proposals


def _blocks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 superpixels in a 2x2 layout; 0 and 1 share a colour, 2 and 3 another."""
    labels = np.zeros((20, 20), np.int32)
    labels[:10, 10:] = 1
    labels[10:, :10] = 2
    labels[10:, 10:] = 3
    colour = np.zeros((4, 4), np.float32)
    colour[[0, 1], 0] = 1.0
    colour[[2, 3], 3] = 1.0
    return labels, colour, colour.copy()


def test_hierarchical_grouping_merges_most_similar_neighbours_first():
    labels, col, tex = _blocks()
    members, level = hierarchical_grouping(labels, col, tex, ("colour",))
    assert members.shape == (7, 4)  # n superpixels + n-1 merges
    first, second, last = members[4], members[5], members[6]
    assert {frozenset(np.flatnonzero(first)), frozenset(np.flatnonzero(second))} == {frozenset({0, 1}), frozenset({2, 3})}
    assert last.all()
    assert level[6] == 1 and level[4] == 3 and level[:4].min() > level[4:].max()


def test_hierarchical_grouping_rejects_unknown_similarity():
    labels, col, tex = _blocks()
    with pytest.raises(ValueError, match="similarities"):
        hierarchical_grouping(labels, col, tex, ("shape",))


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 110, (120, 160, 3)).astype(np.uint8)
    obj = np.zeros((120, 160), bool)
    obj[30:90, 50:100] = True
    img[obj] = (220, 40, 40)
    return img, obj


def test_mask_proposals_find_a_uniform_object():
    img, obj = _scene()
    cfg = MaskProposalConfig(top_k=30, method="grouping")  # the grouping itself (ranked: test_segmentation_proposals)
    regions = mask_proposals(img, cfg)
    assert 0 < len(regions) <= 30
    iou = regions.iou(obj[None])[:, 0]
    assert iou.max() > 0.9
    masks = regions.masks()
    assert masks.shape == (len(regions), 120, 160)
    # deduplicated: no two kept regions overlap at the dedup threshold
    m = masks.reshape(len(masks), -1).astype(np.float32)
    inter = m @ m.T
    pair_iou = inter / (m.sum(1)[:, None] + m.sum(1)[None] - inter)
    np.fill_diagonal(pair_iou, 0)
    assert pair_iou.max() < cfg.dedup_iou
    # boxes are the masks' tight boxes, areas their pixel counts
    np.testing.assert_array_equal(regions.boxes, mask_boxes(masks))
    np.testing.assert_array_equal(regions.areas, masks.sum((1, 2)))


def test_region_masks_storage_round_trip_and_iou():
    seg = np.array([[0, 0, 1], [2, 2, 1]], np.int32)
    members = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)
    r = RegionMasks(seg, members)
    back = RegionMasks.from_arrays(r.to_arrays())
    np.testing.assert_array_equal(back.members, members)
    np.testing.assert_array_equal(back.segments, seg)
    gt = np.array([[[1, 1, 1], [0, 0, 0]]], bool)  # top row
    # region 0 = 2 px inside gt: IoU 2/3; region 1 = segs 0,1: 4 px, inter 3: 3/4; region 2: 4 px, inter 1: 1/6
    np.testing.assert_allclose(r.iou(gt)[:, 0], [2 / 3, 3 / 4, 1 / 6], rtol=1e-6)
    np.testing.assert_array_equal(r.boxes, [[0, 0, 2, 1], [0, 0, 3, 2], [0, 0, 3, 2]])
    s = mask_recall([0.2, 0.6, 0.9])
    assert s["instances"] == 3 and s["recall@0.5"] == pytest.approx(2 / 3) and s["mean_best_iou"] == pytest.approx(17 / 30)


def test_mask_proposals_bad_image():
    with pytest.raises(ValueError, match="uint8"):
        mask_proposals(np.zeros((10, 10), np.uint8))


# ----------------------------------------------------------------------------- features


def test_warp_masks_follow_the_image_warp():
    from rcnn.features import warp_regions

    mask = np.zeros((40, 60), bool)
    mask[5:30, 10:50] = True
    mask[5:15, 10:20] = False
    box = mask_boxes(mask[None])
    as_img = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, 2)
    ref = warp_regions(as_img, box, 32)[0, ..., 0] >= 128
    wm = warp_masks(mask[None], box, 32)[0]
    assert (wm == ref).mean() > 0.98
    crop = np.full((1, 32, 32, 3), 7, np.uint8)
    fg = fg_crops(crop, wm[None], (100, 110, 120))
    assert (fg[0][~wm] == (100, 110, 120)).all() and (fg[0][wm] == 7).all()


def test_warp_masks_keep_a_sliver():
    mask = np.zeros((50, 400), bool)
    mask[0, :] = True  # one pixel high, 50 px box: still visible after the warp
    mask[49, 0] = True
    wm = warp_masks(mask[None], mask_boxes(mask[None]), 16)
    assert wm.any()


@pytest.mark.parametrize("mode", ["warp", "shared"])
def test_fg_of_a_full_box_mask_equals_full(mode):
    img, _ = _scene()
    masks = np.zeros((2, 120, 160), bool)
    masks[0, 30:90, 50:100] = True  # mask = its whole box: fg must equal full
    masks[1, 30:90, 50:100] = True
    masks[1, 30:60, 50:75] = False  # an L shape: fg differs from full
    cfg = RegionFeatureConfig(mode=mode, taps=("fc6", "fc7"))
    f = region_features(img, masks, None, cfg)
    assert f["full"]["fc7"].shape == (2, 512) and f["fg"]["fc6"].shape == (2, 512)
    np.testing.assert_allclose(f["fg"]["fc7"][0], f["full"]["fc7"][0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(f["fg"]["fc7"][1], f["full"]["fc7"][1], atol=1e-3)
    with pytest.raises(ValueError, match="empty"):
        region_features(img, np.zeros((1, 120, 160), bool), None, cfg)
    with pytest.raises(ValueError, match="matching"):
        region_features(img, np.ones((1, 10, 10), bool), None, cfg)


def test_region_features_bf16_option():
    img, _ = _scene()
    masks = np.zeros((2, 120, 160), bool)
    masks[0, 30:90, 50:100] = True
    masks[1, 20:70, 10:60] = True
    masks[1, 20:40, 10:30] = False
    fp32 = RegionFeatureConfig(mode="warp", taps=("fc7",))
    bf16 = RegionFeatureConfig(mode="warp", taps=("fc7",), precision="bf16")
    # fp32 keeps the key caches had before the option existed; bf16 is a separate cache
    from dataclasses import asdict

    from rcnn.cache import settings_hash
    from rcnn.segmentation.features import FEATURE_VERSION

    d = asdict(fp32)
    d.pop("batch_size"), d.pop("precision")
    assert fp32.key() == settings_hash("region-features", FEATURE_VERSION, d)
    assert bf16.key() != fp32.key()
    a, b = region_features(img, masks, None, fp32), region_features(img, masks, None, bf16)
    for s in ("full", "fg"):
        assert b[s]["fc7"].dtype == np.float32
        err = np.linalg.norm(a[s]["fc7"] - b[s]["fc7"]) / np.linalg.norm(a[s]["fc7"])
        assert 0 < err < 0.05, (s, err)  # bf16 arithmetic really ran, and stays close
    with pytest.raises(ValueError, match="precision"):
        RegionFeatureConfig(precision="fp16")


# ------------------------------------------------------------------ learning + pasting


def test_paste_best_last_and_threshold():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :, :2] = True
    masks[1, :2, :] = True
    masks[2, 3, 3] = True
    scores = np.array([[0.9, 0.1], [0.2, 0.6], [0.05, 0.0]])  # region 2 below threshold
    out = paste(masks, scores, 0.3)
    expect = np.zeros((4, 4), np.uint8)
    expect[:2, :] = 2  # region 1 (class 1, score .6) painted first
    expect[:, :2] = 1  # region 0 (class 0, score .9) painted last, wins the overlap
    np.testing.assert_array_equal(out, expect)
    seg = np.arange(16, dtype=np.int32).reshape(4, 4)
    rm = RegionMasks(seg, masks.reshape(3, 16))
    np.testing.assert_array_equal(paste(rm, scores, 0.3), expect)
    assert not paste(masks, scores, 0.95).any()


def test_class_targets():
    iou = np.array([[0.2, 0.7, 0.1], [0.0, 0.0, 0.5]])
    t = class_targets(iou, np.array([0, 0, 1]), 3)
    np.testing.assert_allclose(t, [[0.7, 0.1, 0], [0.0, 0.5, 0]])


def _synthetic_items(rng, w, n_img=6, k=40):
    """8x8 images whose regions are unions of pixel columns; features encode the IoU along ``w``."""
    items = []
    d = len(w)
    for i in range(n_img):
        seg = np.repeat(np.arange(8, dtype=np.int32)[None], 8, 0)
        members = rng.random((k, 8)) < 0.3
        members[np.flatnonzero(~members.any(1)), 0] = True
        regions = RegionMasks(seg, members)
        gt = np.zeros((1, 8, 8), bool)
        gt[0, :, 2:5] = True
        target = regions.iou(gt)
        x = rng.normal(size=(k, d)).astype(np.float32)
        x += ((target[:, 0] * 3 - x @ w / (w @ w))[:, None] * w[None]).astype(np.float32)  # x.w/|w|^2 = 3*IoU
        lm = gt[0].astype(np.uint8)
        items.append(ImageRegions(ImageRecord(f"im{i}", Path(f"im{i}.png"), 8, 8, np.zeros((0, 4)), np.zeros(0), np.zeros(0)),
                                  regions, {"full": {"fc6": x}, "fg": {"fc6": x[:, ::-1].copy()}}, target, 0, lm))
    return items


def test_train_segmenter_learns_iou_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=16)
    train, val = _synthetic_items(rng, w), _synthetic_items(rng, w, 3)
    for strategy in ("full", "fg", "full+fg"):
        model = train_segmenter(train, ["person"], strategy, "fc6", C=1.0)
        pred = np.concatenate([model.score(it.feats)[:, 0] for it in val])
        truth = np.concatenate([it.targets[:, 0] for it in val])
        assert np.corrcoef(pred, truth)[0, 1] > 0.95, strategy
    th, table = choose_threshold(model, val)
    assert table[th] == max(table.values())
    model.threshold = th
    p = model.save(tmp_path / "m.safetensors")
    back = SegmentationModel.load(p)
    assert back.strategy == "full+fg" and back.threshold == th and back.classes == ["person"]
    np.testing.assert_allclose(back.score(val[0].feats), model.score(val[0].feats), rtol=1e-5)
    assert back.mask_config == model.mask_config and back.feature_config == model.feature_config
    (tmp_path / "bad.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        SegmentationModel.load(tmp_path / "bad.safetensors")


def test_out_of_fold_threshold_pooled_with_val():
    from rcnn.segmentation.model import choose_threshold_pooled, out_of_fold_items

    rng = np.random.default_rng(2)
    w = rng.normal(size=16)
    train, val = _synthetic_items(rng, w, 8), _synthetic_items(rng, w, 3)
    oof = out_of_fold_items(train, ["person"], "full+fg", "fc6", C=1.0, folds=4)
    assert len(oof) == 8 and all(o.feats["oof"]["fc6"].shape == (40, 1) for o in oof)
    # a held-out image's scores come from a model trained without it, yet still track its IoU
    pred = np.concatenate([o.feats["oof"]["fc6"][:, 0] for o in oof])
    truth = np.concatenate([it.targets[:, 0] for it in train])
    assert np.corrcoef(pred, truth)[0, 1] > 0.9
    full = train_segmenter(train, ["person"], "full+fg", "fc6", C=1.0)
    assert not np.allclose(full.score(train[0].feats), oof[0].feats["oof"]["fc6"])
    th, table = choose_threshold_pooled(full, val, oof)
    assert table[th] == max(table.values())
    # with no training images it is choose_threshold on val
    assert choose_threshold_pooled(full, val, [])[1] == choose_threshold(full, val)[1]
    with pytest.raises(ValueError, match="folds"):
        out_of_fold_items(train[:2], ["person"], "fg", "fc6", C=1.0, folds=4)


def test_train_segmenter_full_weight():
    rng = np.random.default_rng(1)
    w = rng.normal(size=16)
    train = _synthetic_items(rng, w)
    # make the fg half uninformative: a large full weight must then fit better than a small one
    for it in train:
        it.feats["fg"]["fc6"] = rng.normal(size=it.feats["fg"]["fc6"].shape).astype(np.float32)
    val = _synthetic_items(rng, w, 3)
    base = train_segmenter(train, ["person"], "full+fg", "fc6", C=1.0)
    assert base.info["full_weight"] == 1.0
    corr = {}
    for fw in (0.05, 3.0):
        m = train_segmenter(train, ["person"], "full+fg", "fc6", C=0.001, full_weight=fw)
        assert m.scales["full"] == pytest.approx(fw * base.scales["full"]) and m.scales["fg"] == base.scales["fg"]
        pred = np.concatenate([m.score(it.feats)[:, 0] for it in val])
        corr[fw] = np.corrcoef(pred, np.concatenate([it.targets[:, 0] for it in val]))[0, 1]
    assert corr[3.0] > corr[0.05] + 0.05
    # single-half strategies ignore the weight
    assert train_segmenter(train, ["person"], "full", "fc6", full_weight=5.0).scales == \
        train_segmenter(train, ["person"], "full", "fc6").scales
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="full_weight"):
            train_segmenter(train, ["person"], "full+fg", "fc6", full_weight=bad)


# ------------------------------------------------------------------------ VOC measure


def test_voc_segmentation_measure_known_confusion():
    gt = np.array([[0, 0, 1, 1], [0, VOID, 1, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 2, 2, 2]], np.uint8)
    ev = SegmentationEvaluator(3)
    ev.process(gt, pred)
    # bg: tp 2, fp 0, fn 1 -> 2/3; class1: tp 2, fp 1, fn 1 -> 2/4; class2: tp 1, fp 1 -> 1/2 (void ignored)
    np.testing.assert_allclose(ev.iou(), [2 / 3, 0.5, 0.5])
    res = ev.evaluate(["background", "a", "b"])
    assert res["mean_iou"] == pytest.approx((2 / 3 + 1) / 3) and res["pixels"] == 7
    ev.process(np.zeros((1, 2), np.uint8), np.zeros((1, 2), np.uint8))  # accumulated over all pixels
    assert ev.iou()[0] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="labels"):
        ev.process(np.zeros((1, 1), np.uint8), np.full((1, 1), 5))
    with pytest.raises(ValueError, match="ground truth"):
        ev.process(np.zeros((2, 2), np.uint8), np.zeros((1, 2), np.uint8))
    empty = SegmentationEvaluator(3)
    empty.process(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))
    assert np.isnan(empty.iou()[1]) and empty.evaluate()["mean_iou"] == 1.0


def test_image_confusions_and_paired_bootstrap():
    from rcnn.segmentation import image_confusions, mean_iou, paired_bootstrap

    rng = np.random.default_rng(0)
    gts = [(rng.random((6, 8)) < 0.4).astype(np.uint8) for _ in range(12)]
    good = [np.where(rng.random(g.shape) < 0.9, g, 1 - g).astype(np.uint8) for g in gts]  # 10 % pixels flipped
    bad = [np.where(rng.random(g.shape) < 0.6, g, 1 - g).astype(np.uint8) for g in gts]  # 40 % flipped
    ca, cb = image_confusions(gts, good, 2), image_confusions(gts, bad, 2)
    assert ca.shape == (12, 2, 2) and ca.sum() == 12 * 48
    ev = SegmentationEvaluator(2)
    for g, p in zip(gts, good, strict=True):
        ev.process(g, p)
    assert mean_iou(ca.sum(0)) == pytest.approx(ev.evaluate()["mean_iou"])
    r = paired_bootstrap(ca, cb, n_boot=300)
    assert r["difference"] > 0 and r["ci95"][0] > 0 and r["p_a_better"] == 1.0
    same = paired_bootstrap(ca, ca, n_boot=50)
    assert same["difference"] == 0 and same["p_a_better"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(ca, cb[:3])


# ------------------------------------------------------------------- masks / bad input


def _record(tmp_path, mask: np.ndarray | None, ids, size=(6, 4), name="a") -> ImageRecord:
    img = tmp_path / f"{name}.png"
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(img)
    mp = None
    if mask is not None:
        mp = tmp_path / f"{name}_mask.png"
        Image.fromarray(mask.astype(np.uint8), mode="L").save(mp)
    ids = None if ids is None else np.array(ids)
    n = 0 if ids is None else len(ids)
    return ImageRecord(name, img, size[0], size[1], np.zeros((n, 4), np.float32), np.zeros(n, np.int64),
                       np.zeros(n, bool), mask_path=mp, mask_ids=ids)


def test_instance_masks_rules(tmp_path):
    m = np.zeros((4, 6), np.uint8)
    m[:2, :2] = 1
    m[2:, 3:] = 2
    m[0, 5] = 7  # names no annotated object -> void
    rec = _record(tmp_path, m, [1, 2])
    with pytest.warns(MaskWarning, match="void"):
        lm = class_label_map(rec, 1)
    assert lm[0, 0] == 1 and lm[3, 5] == 1 and lm[0, 5] == VOID and lm[3, 0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks, _ = class_masks(rec, 1)
    assert masks.shape == (2, 4, 6) and masks[0].sum() == 4 and masks[1].sum() == 6
    # an image without instances: all background, no masks
    rec0 = _record(tmp_path, np.zeros((4, 6)), [], name="b")
    assert not class_label_map(rec0, 1).any() and class_masks(rec0, 1)[0].shape == (0, 4, 6)
    # an annotated instance with no pixels is left out
    rec_missing = _record(tmp_path, m * (m != 7), [1, 2, 3], name="c")
    assert class_masks(rec_missing, 1)[0].shape[0] == 2
    # mask size differs from the image: one clear error naming the file
    bad = _record(tmp_path, np.zeros((5, 5)), [1], name="d")
    with pytest.raises(MaskError, match=r"d_mask.png: mask is 5x5 but image d is 6x4"):
        class_label_map(bad, 1)
    garbage = _record(tmp_path, None, [1], name="e")
    garbage.mask_path = tmp_path / "e_mask.png"
    garbage.mask_path.write_bytes(b"nope")
    with pytest.raises(MaskError, match=r"e_mask\.png"):
        class_masks(garbage, 1)


def test_voc_segmentation_layout(tmp_path):
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("x1\nx2\n")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "JPEGImages" / "x1.jpg")
    lm = np.zeros((4, 5), np.uint8)
    lm[1:3, 1:3] = 15  # person
    lm[0, :] = 255
    lm[3, 4] = 40  # not a VOC class -> void
    im = Image.fromarray(lm, mode="P")
    im.putpalette(voc_palette().ravel().tolist())
    im.save(tmp_path / "SegmentationClass" / "x1.png")
    ds = read_voc_segmentation(tmp_path, "val")
    assert len(ds) == 1 and len(ds.issues) == 1 and "x2" in ds.issues[0].file
    with pytest.warns(MaskWarning):
        out = class_label_map(ds.records[0], 20)
    assert out[1, 1] == 15 and out[0, 0] == VOID and out[3, 4] == VOID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks, labels = class_masks(ds.records[0], 20)
    assert labels.tolist() == [14] and masks[0].sum() == 4
    assert (colorize(out)[1, 1] == voc_palette()[15]).all()


@pytest.mark.skipif(not PENN.is_dir(), reason="Penn-Fudan not found in ../shared/data")
def test_pennfudan_masks():
    from rcnn.data import load_dataset

    ds = load_dataset(PENN, "train")
    rec = next(r for r in ds.records if r.image_id == "FudanPed00001")
    masks, labels = class_masks(rec, 1)
    assert masks.shape == (2, rec.height, rec.width) and (labels == 0).all()
    lm = class_label_map(rec, 1)
    assert set(np.unique(lm).tolist()) == {0, 1}
    from rcnn.segmentation.masks import images_and_masks

    images, gts = images_and_masks(ds, limit=2)  # what the packaged ranker and mask head learn from
    assert len(images) == len(gts) == 2 and all(g.shape[1:] == im.shape[:2] and g.dtype == bool for im, g in
                                                zip(images, gts, strict=True))


def test_cli_errors(tmp_path):
    from rcnn.cli import app

    runner = CliRunner()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    r = runner.invoke(app, ["segment", str(bad), str(tmp_path)])
    assert r.exit_code == 2 and "bad.safetensors" in r.output
    r = runner.invoke(app, ["segment-evaluate", str(bad), str(tmp_path / "none")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["segment-train", str(tmp_path), "-o", str(tmp_path / "m.st"), "--strategy", "bogus"])
    assert r.exit_code == 2 and "strategy" in r.output
    r = runner.invoke(app, ["segment-train", str(tmp_path), "-o", str(tmp_path / "m.st"), "--full-weight", "0"])
    assert r.exit_code == 2 and "full-weight" in r.output
    r = runner.invoke(app, ["segment-train", str(tmp_path), "-o", str(tmp_path / "m.st"), "--precision", "fp16"])
    assert r.exit_code == 2 and "precision" in r.output
    r = runner.invoke(app, ["segment-train", str(tmp_path), "-o", str(tmp_path / "m.st"), "--threshold-on", "test"])
    assert r.exit_code == 2 and "threshold-on" in r.output


@pytest.mark.slow
@pytest.mark.skipif(not PENN.is_dir(), reason="Penn-Fudan not found in ../shared/data")
def test_cli_end_to_end_on_a_pennfudan_subset(tmp_path, monkeypatch):
    """segment-proposals / segment-train / segment-evaluate / segment on 8 Penn-Fudan images
    (copied to tmp_path: 5 train / 1 val / 2 test by the fixed split rule; shared mode for speed)."""
    import shutil

    from rcnn.cli import app

    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "PennFudanPed"
    for sub in ("Annotation", "PNGImages", "PedMasks"):
        (root / sub).mkdir(parents=True)
    for ann in sorted((PENN / "Annotation").glob("*.txt"))[:8]:
        shutil.copy(ann, root / "Annotation")
        shutil.copy(PENN / "PNGImages" / f"{ann.stem}.png", root / "PNGImages")
        shutil.copy(PENN / "PedMasks" / f"{ann.stem}_mask.png", root / "PedMasks")
    runner = CliRunner()
    r = runner.invoke(app, ["segment-proposals", str(root), "--split", "val", "-o", str(tmp_path / "recall.json")])
    assert r.exit_code == 0, r.output
    model = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["segment-train", str(root), "-o", str(model), "--mode", "shared", "--train-regions", "30"])
    assert r.exit_code == 0, r.output
    # the default places the threshold on val + the 5 training images' out-of-fold scores; --threshold-on val: val only
    assert "out-of-fold" in SegmentationModel.load(model).info["threshold_on"]
    val_only = tmp_path / "val.safetensors"
    r = runner.invoke(app, ["segment-train", str(root), "-o", str(val_only), "--mode", "shared", "--train-regions", "30",
                            "--threshold-on", "val"])
    assert r.exit_code == 0, r.output
    assert "threshold_on" not in SegmentationModel.load(val_only).info
    r = runner.invoke(app, ["segment-evaluate", str(model), str(root), "--split", "val", "-o", str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["iou"]["background"] > 0.5 and res["images"] == 1
    r = runner.invoke(app, ["segment", str(model), str(root / "PNGImages" / "FudanPed00001.png"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "FudanPed00001_overlay.png").is_file()
    # prepare_image(extract=...): the training images' features are cached now; another region
    # count is a miss, which "none" and "gt" refuse and "all" computes (and records)
    from rcnn.segmentation import FeatureCacheMiss, load_segmentation_dataset, prepare_image

    m = SegmentationModel.load(model)
    rec = load_segmentation_dataset(root, "train").records[0]
    done: list[dict] = []
    it = prepare_image(rec, 1, m.mask_config, m.feature_config, 30, with_gt=True, extract="none", extracted=done)
    assert done == [] and len(it.regions) == 30 and it.n_gt >= 1
    for extract in ("none", "gt"):
        with pytest.raises(FeatureCacheMiss, match="regions"):
            prepare_image(rec, 1, m.mask_config, m.feature_config, 20, with_gt=True, extract=extract)
    prepare_image(rec, 1, m.mask_config, m.feature_config, 20, with_gt=True, extract="all", extracted=done)
    assert [(d["kind"], d["masks"]) for d in done] == [("regions", 20)]
