"""Blocked many-class scoring (rcnn.scoring) against a plain full matrix product + top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcnn.scoring import TopK, prepare_weights, score_full, score_topk, weights_nbytes


def _data(N=300, D=64, C=257, seed=0, exact=False):
    """Random features/weights; ``exact``: small integers and quarters, so every float32 sum is
    exact whatever order BLAS adds in (and many scores tie, exercising the tie rule)."""
    rng = np.random.default_rng(seed)
    if exact:
        f = rng.integers(-8, 9, (N, D)).astype(np.float32)
        W = (rng.integers(-8, 9, (D, C)) / 4).astype(np.float32)
        b = (rng.integers(-16, 17, C) / 8).astype(np.float32)
        return f, W, b
    f = rng.standard_normal((N, D)).astype(np.float32)
    W = rng.standard_normal((D, C)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return f, W, b


def _reference(f, W, b, k, threshold=None):
    """Full (C,N) score matrix in float64, then per-class stable argsort: the naive way."""
    full = (f.astype(np.float64) @ W.astype(np.float64) + b).T
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    sc = np.take_along_axis(full, order, 1)
    if threshold is not None:
        order = np.where(sc >= threshold, order, -1)
        sc = np.where(sc >= threshold, sc, -np.inf)
    return order, sc


@pytest.mark.parametrize("block", [1, 7, 64, 257, 10_000])
@pytest.mark.parametrize("k", [1, 10, 300])
def test_topk_equals_full_matmul_exactly(block, k):
    f, W, b = _data(exact=True)
    out = score_topk(f, W, b, k=k, block_classes=block)
    ref_idx, ref_sc = _reference(f, W, b, k)
    assert out.indices.shape == (W.shape[1], min(k, len(f)))
    np.testing.assert_array_equal(out.indices, ref_idx)
    np.testing.assert_array_equal(out.scores, ref_sc.astype(np.float32))


@pytest.mark.parametrize("block", [1, 64, 10_000])
def test_topk_matches_full_matmul_on_gaussian_data(block):
    f, W, b = _data()
    out = score_topk(f, W, b, k=10, block_classes=block)
    ref_idx, ref_sc = _reference(f, W, b, 10)
    np.testing.assert_array_equal(out.indices, ref_idx)
    # float32 products: equal to the float64 reference up to accumulation rounding
    np.testing.assert_allclose(out.scores, ref_sc, rtol=0, atol=1e-4)
    full32 = score_full(f, W, b).T  # and to torch's own full float32 product
    np.testing.assert_allclose(out.scores, np.take_along_axis(full32, out.indices, 1), rtol=0, atol=1e-4)


def test_layout_cd_and_tensor_inputs_agree():
    f, W, b = _data(C=50)
    a = score_topk(f, W, b, k=5)
    c = score_topk(torch.from_numpy(f), torch.from_numpy(np.ascontiguousarray(W.T)), torch.from_numpy(b), k=5)
    np.testing.assert_array_equal(a.indices, c.indices)
    np.testing.assert_allclose(a.scores, c.scores, atol=1e-5)


def test_square_weights_use_feature_dim_to_pick_layout():
    f, W, b = _data(N=20, D=16, C=16)
    ref_idx, _ = _reference(f, W, b, 3)
    np.testing.assert_array_equal(score_topk(f, W, b, k=3).indices, ref_idx)  # (D,C) by default
    cd = prepare_weights(np.ascontiguousarray(W.T), b, layout="CD")
    np.testing.assert_array_equal(score_topk(f, cd, k=3).indices, ref_idx)


def test_threshold_drops_low_scores_and_pads():
    f, W, b = _data(C=40, exact=True)
    out = score_topk(f, W, b, k=50, threshold=60.0, block_classes=16)
    ref_idx, _ = _reference(f, W, b, 50, threshold=60.0)
    np.testing.assert_array_equal(out.indices, ref_idx)
    assert np.isneginf(out.scores[~out.valid]).all()
    assert (out.scores[out.valid] >= 60.0).all()
    assert 0 < out.valid.sum() < out.valid.size  # the threshold really cut something
    regions, classes, scores = out.flat()
    assert len(regions) == out.valid.sum()
    full = score_full(f, W, b)
    np.testing.assert_allclose(full[regions, classes], scores, atol=1e-5)


def test_k_none_keeps_every_region():
    f, W, b = _data(N=30, C=5)
    out = score_topk(f, W, b, k=None)
    assert out.indices.shape == (5, 30)
    assert (np.sort(out.indices, axis=1) == np.arange(30)).all()


def test_ties_are_broken_by_region_index_whatever_the_block():
    f, W, b = _data(N=40, C=9)
    f[[3, 17, 25]] = f[8]  # four identical regions -> identical scores in every class
    for block in (1, 4, 9):
        out = score_topk(f, W, b, k=40, block_classes=block)
        for c in range(9):
            pos = [list(out.indices[c]).index(j) for j in (3, 8, 17, 25)]
            assert pos == sorted(pos) and pos[-1] - pos[0] == 3


def test_fp16_storage_halves_memory_and_keeps_ranking_close():
    f, W, b = _data(C=100)
    w32, w16 = prepare_weights(W, b), prepare_weights(W, b, dtype="fp16")
    assert w32.dtype == "fp32" and w16.dtype == "fp16"
    assert w16.Wt.numel() * 2 + 400 == w16.nbytes == weights_nbytes(100, 64, "fp16")
    assert w32.nbytes == weights_nbytes(100, 64, "fp32")
    a, h = score_topk(f, w32, k=1), score_topk(f, w16, k=1)
    # fp16 rounding of weights changes scores by ~1e-3 relative: the best region rarely changes
    assert (a.indices == h.indices).mean() > 0.9
    np.testing.assert_allclose(a.scores, h.scores, atol=0.05)
    # the fp16 result is *exactly* the fp32 product with fp16-rounded weights
    W16 = W.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(h.indices, score_topk(f, W16, b, k=1).indices)


def test_float32_dc_weights_are_not_copied():
    _, W, b = _data(C=30)
    cw = prepare_weights(W, b)
    assert cw.Wt.data_ptr() == torch.from_numpy(W).data_ptr()


def test_empty_and_bad_inputs():
    f, W, b = _data(C=4)
    out = score_topk(f[:0], W, b, k=5)
    assert isinstance(out, TopK) and out.indices.shape == (4, 0)
    with pytest.raises(ValueError, match="feature size"):
        score_topk(f[:, :10], W, b, k=5)
    with pytest.raises(ValueError, match="do not match"):
        score_topk(f, W, b[:3], k=5)
    with pytest.raises(ValueError, match="dtype"):
        prepare_weights(W, b, dtype="int8")


def test_memory_stays_bounded_by_the_block():
    """100k classes x 500 regions would be a 200 MB score matrix; in a fresh process the peak
    resident memory grows by far less than that (torch's allocations are not seen by tracemalloc,
    so the process's ru_maxrss is measured)."""
    import subprocess
    import sys

    code = """
import resource, numpy as np, torch
from rcnn.scoring import score_topk
torch.set_num_threads(1)
rng = np.random.default_rng(1)
N, D, C = 500, 8, 100_000
f = rng.standard_normal((N, D)).astype(np.float32)
W = rng.standard_normal((D, C)).astype(np.float32)
b = np.zeros(C, np.float32)
score_topk(f, W[:, :10], b[:10], k=2)  # warm-up: loads BLAS kernels before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = score_topk(f, W, b, k=2, block_classes=512)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
best = np.argmax(f @ W[:, :50], axis=0)
assert (out.indices[:50, 0] == best).all()
print((peak - base) * 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    grown = int(res.stdout.split()[-1])
    assert grown < 50e6, f"peak memory grew by {grown / 1e6:.0f} MB (full matrix: 200 MB)"


def test_nan_scores_are_refused_with_a_clear_error():
    f, W, b = _data(C=5)
    f[3, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        score_topk(f, W, b, k=10)
