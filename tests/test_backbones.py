"""Backbones: real ImageNet weights classify real photos; user weights files; clear errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from skimage import data

from rcnn import backbones
from rcnn.backbones import WeightsError, get_backbone

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one conversion per session, never in the user's real cache
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("name", ["squeezenet1_1", "efficientnet_lite0"])
def test_builtin_classifies_real_photos(name):
    bb = get_backbone(name)
    assert len(bb.categories) == 1000 and bb.categories[281] == "tabby"
    cat = [n for n, _ in bb.classify(data.chelsea(), topk=5)]
    assert CATS & set(cat), cat
    cup = [n for n, _ in bb.classify(data.coffee(), topk=5)]
    assert COFFEE & set(cup[:2]), cup
    assert set(bb.taps) - set(bb.side_taps) == {"pool5", "fc6", "fc7", "logits"}


@pytest.mark.parametrize("name", ["squeezenet1_1", "efficientnet_lite0"])
def test_tap_dims_match_declared(name):
    bb = get_backbone(name)
    x = torch.zeros(2, 3, bb.input_size, bb.input_size).contiguous(memory_format=torch.channels_last)
    heads = [k for k in bb.taps if k not in bb.side_taps]
    with torch.inference_mode():
        fmap, sides = bb.run_trunk(x, list(bb.side_taps))
        out = bb.head(bb.to_grid(fmap), heads)
        torch.testing.assert_close(fmap, bb.trunk(x))  # the split trunk is the same network
    for k in heads:
        assert out[k].shape == (2, bb.taps[k]), (k, out[k].shape)
    for k, (_, stride) in bb.side_taps.items():  # a side tap: its map's channels × G² cells
        assert sides[k].shape[1] * bb.pool5_grid**2 == bb.taps[k] == bb.dim(k)
        assert abs(sides[k].shape[-1] * stride - bb.input_size) < stride  # the declared stride


def test_squeezenet_safetensors_written_once_and_reused(monkeypatch):
    sd, h = backbones.squeezenet_state_dict()
    assert h == backbones.SQUEEZENET_SHA256
    out = backbones.cache_dir() / "weights" / f"squeezenet1_1-{h[:16]}.safetensors"
    assert out.is_file()

    # a second call must not touch the pickle at all
    def boom(*a, **k):
        raise AssertionError("pickle read again")

    monkeypatch.setattr(backbones, "_NumpyOnlyUnpickler", boom)
    sd2, _ = backbones.squeezenet_state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_restricted_unpickler_refuses_other_globals():
    import io

    blob = pickle.dumps({"a": [np.zeros(3, np.float32), np.ones(2)]})
    assert backbones._NumpyOnlyUnpickler(io.BytesIO(blob)).load()["a"][1].shape == (2,)
    evil = pickle.dumps(print)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        backbones._NumpyOnlyUnpickler(io.BytesIO(evil)).load()


def test_hash_mismatch_refused(tmp_path):
    f = tmp_path / "w.pkl"
    f.write_bytes(b"not the file")
    with pytest.raises(WeightsError, match="sha256"):
        backbones._verify(f, backbones.SQUEEZENET_SHA256)


def test_alexnet_needs_weights_and_loads_user_file(tmp_path):
    with pytest.raises(WeightsError, match="--weights"):
        get_backbone("alexnet")
    from safetensors.torch import save_file
    from torchvision.models import alexnet

    torch.manual_seed(0)
    sd = alexnet().state_dict()
    save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save(sd, tmp_path / "a.pth")
    for f in ("a.safetensors", "a.pth"):
        bb = get_backbone("alexnet", tmp_path / f)
        assert bb.taps == {"pool5": 9216, "fc6": 4096, "fc7": 4096, "logits": 1000}
        x = torch.zeros(1, 3, 224, 224)
        with torch.inference_mode():
            out = bb.head(bb.to_grid(bb.trunk(x)), ["pool5", "fc7"])
        assert out["pool5"].shape == (1, 9216) and out["fc7"].shape == (1, 4096)
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"bad\.pth"):
        get_backbone("alexnet", tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="not a torchvision model"):
        get_backbone("no_such_net", tmp_path / "a.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        get_backbone("resnet18", tmp_path / "a.pth")


def test_vgg11_random_weights_in_both_modes(tmp_path):
    """VGG's classifier orders ReLU and Dropout unlike AlexNet's and reads a 7×7 pool5: declared taps
    match what warp and shared extraction return, and fc6/fc7/logits are the network's own layers."""
    from safetensors.torch import save_file
    from torchvision.models import vgg11

    from rcnn.features import extract_features, warp_regions

    torch.manual_seed(0)
    m = vgg11(weights=None).eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "vgg11.safetensors"))
    bb = backbones.build_backbone("vgg11", tmp_path / "vgg11.safetensors")
    assert bb.taps == {"pool5": 512 * 49, "fc6": 4096, "fc7": 4096, "logits": 1000}
    assert bb.pool5_grid == 7 and bb.fixed_grid and bb.dim("pool5", 3) == 512 * 49  # fc6 fixes the grid
    img = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 60, 70], [30, 10, 115, 85]], np.float32)
    layers = ["pool5", "fc6", "fc7", "logits"]
    warp = extract_features(img, boxes, bb, layers, "warp")
    shared = extract_features(img, boxes, bb, layers, "shared", scales=(1.0,))
    for out in (warp, shared):
        assert {k: v.shape for k, v in out.items()} == {k: (2, bb.taps[k]) for k in layers}
        W6, b6 = m.classifier[0].weight.detach().numpy(), m.classifier[0].bias.detach().numpy()
        np.testing.assert_allclose(out["fc6"], np.maximum(out["pool5"] @ W6.T + b6, 0), rtol=1e-3, atol=1e-3)
        W8, b8 = m.classifier[6].weight.detach().numpy(), m.classifier[6].bias.detach().numpy()
        np.testing.assert_allclose(out["logits"], out["fc7"] @ W8.T + b8, rtol=1e-3, atol=1e-3)
    crops = warp_regions(img, boxes, bb.input_size, fill=bb.mean_rgb(), interpolation=bb.interpolation)
    with torch.inference_mode():  # warp mode = torchvision's own forward pass on the warped crops
        ref = m(bb.preprocess(crops).contiguous()).numpy()
    np.testing.assert_allclose(warp["logits"], ref, rtol=1e-3, atol=1e-3)
