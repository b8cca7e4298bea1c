"""The learned mask head (mask proposals ``"cnn"``): shapes, snapping, training, file, key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from rcnn.segmentation import MaskProposalConfig, class_masks, mask_proposals
from rcnn.segmentation.maskhead import OUT, MaskHead, MaskPredictor, paste_probs, snap, train_mask_head


def _scene(seed: int, h: int = 120, w: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Bright upright rectangles ("people") on a noisy dark background; (H,W,3), (G,H,W)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 12, (h, w, 3))
    masks = []
    for x0, y0, bw, bh in ((20 + 5 * seed, 20, 30, 70), (100 - 4 * seed, 30, 28, 60)):
        m = np.zeros((h, w), bool)
        m[y0:y0 + bh, x0:x0 + bw] = True
        img[m] = (200, 120 + 10 * seed, 90)
        masks.append(m)
    return np.clip(img, 0, 255).astype(np.uint8), np.stack(masks)


def test_head_outputs_probabilities_of_the_right_shape():
    torch.manual_seed(0)
    pred = MaskPredictor(MaskHead(512, 16))
    img, _ = _scene(0)
    probs, obj = pred.predict(img, np.array([[10, 10, 60, 100], [90, 20, 140, 110], [0, 0, 160, 120]], np.float32))
    assert probs.shape == (3, OUT, OUT) and probs.dtype == np.float32 and obj.shape == (3,)
    assert (probs >= 0).all() and (probs <= 1).all() and (obj >= 0).all() and (obj <= 1).all()
    # flip averaging: the mirrored image's prediction, mirrored back, is averaged in
    maps = pred.maps(img, flip=True)
    box = np.array([[10, 10, 60, 100]], np.float32)
    pf, _ = pred.predict(maps, box, flip=True)
    pm, _ = pred.predict(maps.mirrored, np.array([[160 - 60, 10, 160 - 10, 100]], np.float32))
    np.testing.assert_allclose(pf[0], (probs[0] + pm[0, :, ::-1]) / 2, atol=1e-5)
    p0, o0 = pred.predict(img, np.zeros((0, 4), np.float32))
    assert p0.shape == (0, OUT, OUT) and o0.shape == (0,)


def test_snap_keeps_the_cells_the_mask_covers():
    segments = np.zeros((40, 40), np.int32)  # four 20x20 cells
    segments[:, 20:] += 1
    segments[20:, :] += 2
    probs = np.zeros((2, OUT, OUT), np.float32)
    probs[0] = 1.0  # box 0 over the top-left cell: all of it
    probs[1, :, : OUT // 2] = 0.9  # box 1 over the top half: left half of the box only
    boxes = np.array([[0, 0, 20, 20], [0, 0, 40, 20]], np.float32)
    rows = snap(probs, boxes, segments, (0.5, 0.95))
    assert rows.shape == (4, 4)
    assert rows[0].tolist() == [True, False, False, False]
    assert rows[1].tolist() == [True, False, False, False]  # mean 1.0 > 0.95
    assert rows[2].tolist() == [True, False, False, False]  # top-left cell at 0.9
    assert not rows[3].any()  # 0.9 does not pass 0.95
    p, win = paste_probs(probs[0], boxes[0], segments.shape)
    assert win == (0, 0, 20, 20) and p.shape == (20, 20) and p.min() > 0.99


def test_training_learns_rectangles_and_the_file_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("RCNN_THREADS", "1")  # tiny batches: threads only contend
    threads = torch.get_num_threads()
    data = [_scene(s) for s in range(2)]
    try:
        pred = train_mask_head([d[0] for d in data], [d[1] for d in data], epochs=12, jitters=6, negatives=8, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
    log = pred.info["log"]
    assert len(log) == 12 and log[-1]["mask_loss"] < 0.7 * log[0]["mask_loss"]
    img, gt = _scene(4)  # unseen placement
    box = np.array([[17, 15, 52, 95]], np.float32)  # loose box on the first rectangle
    probs, obj = pred.predict(img, box)
    p, (x0, y0, x1, y1) = paste_probs(probs[0], box[0], img.shape[:2])
    inside = gt[0, y0:y1, x0:x1]
    # the object's pixels are predicted far more likely than the box's background
    assert p[inside].mean() > p[~inside].mean() + 0.3, (p[inside].mean(), p[~inside].mean())
    path = pred.save(tmp_path / "h.safetensors")
    back = MaskPredictor.load(path)
    p2, o2 = back.predict(img, box)
    assert np.abs(p2 - probs).max() < 0.02 and np.abs(o2 - obj).max() < 0.02  # float16 file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        MaskPredictor.load(bad)


def test_cnn_key_depends_on_its_settings_and_leaves_ranked_alone():
    ranked = MaskProposalConfig(method="ranked")
    assert ranked.key() == MaskProposalConfig(method="ranked", cnn_boxes=7, cnn_thresholds=(0.4,)).key()
    cnn = MaskProposalConfig(method="cnn")
    assert cnn.key() != ranked.key()
    assert cnn.key() != MaskProposalConfig(method="cnn", cnn_boxes=7).key()
    with pytest.raises(ValueError, match="cnn_score"):
        MaskProposalConfig(cnn_score="best")
    with pytest.raises(FileNotFoundError, match="no such mask head"):
        MaskProposalConfig(method="cnn", mask_head="missing.safetensors").key()


PENN = SHARED_DATA / "PennFudanPed"


@pytest.mark.skipif(not PENN.is_dir(), reason="Penn-Fudan not found in ../shared/data")
def test_cnn_proposals_on_a_pennfudan_test_image():
    from rcnn.data import load_dataset, load_image

    rec = load_dataset(PENN, "test").records[1]
    img = load_image(rec.path)
    gt, _ = class_masks(rec, 1)
    cnn = mask_proposals(img, MaskProposalConfig(method="cnn"))
    assert 0 < len(cnn) <= 150 and cnn.shape == img.shape[:2]
    assert cnn.masks().any((1, 2)).all()
    best = cnn.iou(gt).max(0)
    assert best.min() > 0.5, best


def test_models_saved_with_ranked_proposals_keep_their_cache_key(tmp_path):
    from dataclasses import asdict

    from conftest import write_old_segmentation_model
    from rcnn.segmentation import SegmentationModel
    from rcnn.segmentation.regions import CNN_FIELDS

    # a session-2 model: its mask settings predate the cnn fields
    mc = {k: v for k, v in asdict(MaskProposalConfig(method="ranked")).items() if k not in CNN_FIELDS}
    write_old_segmentation_model(tmp_path / "m.safetensors", mc)
    m = SegmentationModel.load(tmp_path / "m.safetensors")
    assert m.mask_config.method == "ranked"
    assert m.mask_config.key() == MaskProposalConfig(method="ranked").key()
