"""Device selection (rcnn.device): auto/cpu/cuda with a CPU fallback that says why."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from rcnn.device import autocast, cuda_unavailable_reason, resolve_device, to_device, to_host


def test_cpu_is_always_cpu():
    assert resolve_device("cpu") == (torch.device("cpu"), None)


def test_auto_and_cuda_agree_with_what_torch_sees(caplog):
    why = cuda_unavailable_reason()
    dev, reason = resolve_device("auto")
    if why is None:
        assert dev.type == "cuda" and reason is None
    else:
        assert dev.type == "cpu" and reason == why
        with caplog.at_level(logging.WARNING, logger="rcnn.device"):
            dev, reason = resolve_device("cuda:0")
        assert dev.type == "cpu" and reason == why
        assert any("using the CPU" in r.message and why in r.message for r in caplog.records)
    dev, reason = resolve_device("cuda:99")
    assert dev.type == "cpu" and ("only" in reason or reason == why)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu"])
def test_bad_device_names_are_refused(bad):
    with pytest.raises(ValueError, match="device must be"):
        resolve_device(bad)


def test_cpu_helpers_are_no_ops():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = to_device(a, torch.device("cpu"))
    assert t.data_ptr() == torch.from_numpy(a).data_ptr() or np.shares_memory(t.numpy(), a)
    assert to_host(t) is t
    with autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_features_with_cuda_requested_fall_back_and_match_cpu():
    """--device cuda on a machine without a usable GPU computes the same features on the CPU."""
    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is present: the fallback path is not taken here")
    from rcnn.features import FeatureConfig, extract_features

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (120, 160, 3), np.uint8)
    boxes = np.array([[0, 0, 60, 50], [30, 20, 150, 110]], np.float32)
    a = extract_features(img, boxes, "squeezenet1_1", "fc7", device="cpu")
    b = extract_features(img, boxes, "squeezenet1_1", "fc7", device="cuda")
    np.testing.assert_array_equal(a, b)
    assert FeatureConfig(device="cuda").key() == FeatureConfig(device="cpu").key()  # same cache
    with pytest.raises(ValueError, match="device must be"):
        FeatureConfig(device="gpu")
