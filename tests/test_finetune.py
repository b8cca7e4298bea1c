"""Fine-tuning (paper §2.3): region labels and sampling, exact resume after a kill, corrupt
checkpoints, and the fine-tuned net as a backbone (features, softmax scoring)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rcnn.backbones import FT_TAP, read_finetuned_meta
from rcnn.data import ImageRecord
from rcnn.detect import softmax_model
from rcnn.finetune import (
    CheckpointError,
    FinetuneConfig,
    batch_images,
    default_lr,
    finetune,
    label_regions,
    sample_regions,
    split_validation,
)
from rcnn.proposals import ProposalConfig


def _rec(boxes, labels, path="x.jpg", w=100, h=100, image_id="x") -> ImageRecord:
    return ImageRecord(image_id=image_id, path=Path(path), width=w, height=h, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                       labels=np.asarray(labels, np.int64), difficult=np.zeros(len(labels), bool))


def test_label_regions_iou_rule_and_degenerate_gt():
    rec = _rec([[10, 10, 50, 50], [60, 60, 90, 90], [5, 5, 5, 20]], [2, 0, 1])  # last: zero area
    props = np.array([[12, 12, 52, 52],   # IoU ~0.82 with gt0 → class 2
                      [10, 10, 40, 40],   # IoU 0.5625 → class 2
                      [30, 30, 70, 70],   # < 0.5 → background
                      [60, 60, 80, 80]],  # IoU 0.44 → background
                     np.float32)
    boxes, labels = label_regions(rec, props, 0.5)
    assert len(boxes) == 2 + 4  # the zero-area gt box is dropped
    assert labels.tolist() == [3, 1, 3, 3, 0, 0]
    # an image without objects: everything is background
    b, lab = label_regions(_rec(np.zeros((0, 4)), []), props)
    assert (lab == 0).all() and len(b) == 4


def test_sample_regions_fraction_and_edge_cases():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 100 + [0] * 1000)
    idx = sample_regions(labels, 64, 0.25, rng)
    assert len(idx) == 64 and (labels[idx] > 0).sum() == 16 and len(set(idx[:16].tolist())) == 16
    few = np.array([2] * 3 + [0] * 10)  # fewer positives than a quarter; few background → with replacement
    idx = sample_regions(few, 64, 0.25, rng)
    assert len(idx) == 64 and (few[idx] > 0).sum() == 3
    none = np.zeros(50, np.int64)  # a batch image with no positives at all
    assert (none[sample_regions(none, 64, 0.25, rng)] == 0).all()
    allpos = np.ones(10, np.int64)
    assert len(sample_regions(allpos, 64, 0.25, rng)) == 64


def test_batches_split_and_lr():
    # each epoch visits every image once, deterministically
    seen = [i for it in range(5) for i in batch_images(it, 10, 2, seed=3)]
    assert sorted(seen) == list(range(10))
    assert batch_images(7, 10, 2, 3) == batch_images(7, 10, 2, 3)
    tr, va = split_validation([_rec([], [], image_id=str(i)) for i in range(20)], 4)
    assert len(tr) == 16 and len(va) == 4 and not {r.image_id for r in tr} & {r.image_id for r in va}
    assert default_lr("alexnet") == 0.001 and default_lr("squeezenet1_1") == 0.004


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Three small synthetic images with coloured blobs (2 classes) and their records."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(3):
        img = rng.integers(90, 140, size=(96, 128, 3), dtype=np.uint8)
        boxes, labels = [], []
        for k in range(3):
            x, y = int(rng.integers(0, 80)), int(rng.integers(0, 50))
            c = k % 2
            cv2.rectangle(img, (x, y), (x + 40, y + 40), (220, 40, 40) if c == 0 else (40, 40, 220), -1)
            boxes.append([x, y, x + 41, y + 41])
            labels.append(c)
        p = root / f"im{i}.png"
        cv2.imwrite(str(p), img[:, :, ::-1])
        recs.append(_rec(boxes, labels, p, 128, 96, f"im{i}"))
    return root, recs


TINY = FinetuneConfig(mode="shared", iterations=4, rois_per_image=16, scales=(1.0,), val_images=0, val_every=2,
                      checkpoint_every=2, seed=5)
PC = ProposalConfig(resize_width=0, min_size=5)


def _run(toy, out: Path, cfg=TINY, **kw):
    root, recs = toy
    return finetune(recs[:2], ["red", "blue"], out, cfg, PC, root, val_records=recs[2:], threads=1, **kw)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_after_kill_is_identical(toy, tmp_path):
    a = _run(toy, tmp_path / "a.safetensors")
    assert a.iterations == 4 and len(a.history["train"]) == 4 and len(a.history["val"]) == 2
    # "killed" after 2 iterations (the checkpoint is what a kill leaves), then resumed
    b1 = _run(toy, tmp_path / "b.safetensors", stop_after=2)
    assert b1.iterations == 2 and not (tmp_path / "b.safetensors").exists()
    b2 = _run(toy, tmp_path / "b.safetensors")
    assert b2.resumed_from == 2 and b2.iterations == 4
    ta, tb = _tensors(tmp_path / "a.safetensors"), _tensors(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert [h["loss"] for h in a.history["train"]] == [h["loss"] for h in b2.history["train"]]
    assert a.history["val"] == b2.history["val"]
    # the new classifier moved away from its initialisation; curve files are written
    assert (tmp_path / "a.curve.png").stat().st_size > 0 and (tmp_path / "a.curve.json").exists()
    meta = read_finetuned_meta(tmp_path / "a.safetensors")
    assert meta["classes"] == ["__background__", "red", "blue"] and meta["base"] == "squeezenet1_1"


def test_corrupt_checkpoint_is_reported(toy, tmp_path):
    out = tmp_path / "c.safetensors"
    _run(toy, out, stop_after=2)
    ck = out.with_name(out.name + ".ckpt")
    data = bytearray(ck.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor payload
    ck.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        _run(toy, out)
    ck.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        _run(toy, out)
    # a checkpoint of different settings is refused too
    ck.unlink()
    _run(toy, out, stop_after=2)
    with pytest.raises(CheckpointError, match="different"):
        _run(toy, out, cfg=replace(TINY, seed=6))


def test_finetuned_net_is_a_backbone(toy, tmp_path):
    from rcnn.backbones import get_backbone
    from rcnn.data import load_image
    from rcnn.features import FeatureConfig, extract_features

    _root, recs = toy
    out = tmp_path / "net.safetensors"
    _run(toy, out, cfg=replace(TINY, iterations=2))
    bb = get_backbone("squeezenet1_1", weights=out)
    assert bb.taps[FT_TAP] == 3 and bb.input_size == 227 and bb.color == "RGB"
    img = load_image(recs[0].path)
    boxes = np.concatenate([recs[0].boxes, [[0, 0, 30, 30]]]).astype(np.float32)
    f = extract_features(img, boxes, bb, ["fc7", FT_TAP, "pool5"], mode="shared", scales=(1.0,))
    assert f["fc7"].shape == (4, 512) and f[FT_TAP].shape == (4, 3)
    np.testing.assert_allclose(np.exp(f[FT_TAP]).sum(1), 1, atol=1e-5)
    # fine-tuned features differ from the ImageNet ones, and the cache key follows the weights
    f0 = extract_features(img, boxes, get_backbone("squeezenet1_1"), "fc7", mode="shared", scales=(1.0,))
    assert not np.allclose(f0, f["fc7"])
    assert FeatureConfig(weights=str(out)).key() != FeatureConfig().key()
    # softmax scoring as a detector: scores are the class columns of the log-softmax
    m = softmax_model(out, PC, FeatureConfig(mode="shared", scales=(1.0,)))
    assert m.classes == ["red", "blue"] and m.layer == FT_TAP
    np.testing.assert_allclose(m.score(f[FT_TAP]), f[FT_TAP][:, 1:], atol=1e-6)


def test_warp_mode_iteration(toy, tmp_path):
    cfg = replace(TINY, mode="warp", iterations=1, rois_per_image=8, checkpoint_every=1)
    r = _run(toy, tmp_path / "w.safetensors", cfg=cfg)
    assert r.iterations == 1 and np.isfinite(r.history["train"][0]["loss"])


def _voc(root: Path, recs) -> Path:
    """A minimal VOC layout of the toy images (classes red/blue)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    names = ["red", "blue"]
    for r in recs:
        cv2.imwrite(str(root / "JPEGImages" / f"{r.image_id}.jpg"), cv2.imread(str(r.path)))
        objs = "".join(
            f"<object><name>{names[int(c)]}</name><difficult>0</difficult><bndbox><xmin>{int(b[0]) + 1}</xmin>"
            f"<ymin>{int(b[1]) + 1}</ymin><xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
            for b, c in zip(r.boxes, r.labels, strict=True))
        (root / "Annotations" / f"{r.image_id}.xml").write_text(
            f"<annotation><filename>{r.image_id}.jpg</filename><size><width>{r.width}</width><height>{r.height}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{r.image_id}\n" for r in recs))
    return root


def test_cli_finetune_resume_and_corrupt_checkpoint(toy, tmp_path):
    from typer.testing import CliRunner

    from rcnn.cli import app

    root = _voc(tmp_path / "voc", toy[1])
    out = tmp_path / "net.safetensors"
    args = ["finetune", str(root), "-o", str(out), "--mode", "shared", "--scales", "1.0", "--iterations", "2",
            "--val-images", "1", "--val-every", "1", "--checkpoint-every", "1", "--resize-width", "0", "--workers", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert out.exists() and "validation:" in r.output
    ck = out.with_name(out.name + ".ckpt")
    data = bytearray(ck.read_bytes())
    data[-64] ^= 0x55
    ck.write_bytes(bytes(data))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1
    assert "corrupt" in r.output and str(ck) in r.output.replace("\n", "")


def test_pool5_head_input_norm_bf16_resume_and_softmax(toy, tmp_path):
    """The options used on BCCD: classifier on the 3×3 pool5 grid, tap scaled to mean norm 20,
    bf16 autocast; a resumed run is still bit-identical and the softmax reads the same grid."""
    from rcnn.backbones import get_backbone
    from rcnn.data import load_image
    from rcnn.features import FeatureConfig, extract_features

    cfg = replace(TINY, tap="pool5", grid=3, input_norm=20.0, precision="bf16")
    assert cfg.key() != TINY.key() and replace(TINY, tap="fc7").key() == TINY.key()  # defaults keep old keys
    a = _run(toy, tmp_path / "a.safetensors", cfg=cfg)
    _run(toy, tmp_path / "b.safetensors", cfg=cfg, stop_after=2)
    b = _run(toy, tmp_path / "b.safetensors", cfg=cfg)
    assert b.resumed_from == 2
    ta, tb = _tensors(tmp_path / "a.safetensors"), _tensors(tmp_path / "b.safetensors")
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert ta["rcnn_finetune.cls.weight"].shape == (3, 512 * 9)
    meta = read_finetuned_meta(tmp_path / "a.safetensors")
    # the constant brings the pre-trained net's pool5 norm to ~20 (SqueezeNet's raw norm is ≫ 20)
    assert meta["tap"] == "pool5" and meta["grid"] == 3 and 0 < meta["input_scale"] < 1
    assert a.history["input_scale"] == b.history["input_scale"] == meta["input_scale"]
    _root, recs = toy
    bb = get_backbone("squeezenet1_1", weights=tmp_path / "a.safetensors")
    img = load_image(recs[0].path)
    f = extract_features(img, recs[0].boxes, bb, [FT_TAP], mode="shared", scales=(1.0,), grid=3)
    np.testing.assert_allclose(np.exp(f[FT_TAP]).sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        extract_features(img, recs[0].boxes, bb, [FT_TAP], mode="shared", scales=(1.0,), grid=6)
    m = softmax_model(tmp_path / "a.safetensors", PC, FeatureConfig(mode="shared", scales=(1.0,)))
    assert m.feature_options["grid"] == 3
    with pytest.raises(ValueError, match="tap"):
        FinetuneConfig(tap="logits")
