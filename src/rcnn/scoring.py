"""Many-class scoring: one blocked matrix product with per-class top-k kept on the fly.

Paper §2.2: all class-specific computation is one ``(N,D) @ (D,C)`` product of region features
with the stacked SVM weights, so "even if there were 100k classes" scoring is a single matrix
multiply. Materialising the full ``(N,C)`` score matrix is what does not scale
(2000 × 100k × 4 B = 800 MB per image), so :func:`score_topk` walks the classes in blocks of
``block_classes``: each block's ``(block, N)`` scores are computed by one BLAS call
(``addmm``, bias fused), reduced to their per-class top ``k`` (and optional threshold), and
dropped. Peak extra memory is ``block × N`` floats, independent of ``C``.

Weights can be stored as float16 (:func:`prepare_weights` ``dtype="fp16"``): half the memory
(100k × 4096 = 0.82 GB instead of 1.64 GB); each block is upcast to float32 just before its
product, so arithmetic is always float32 (upcasting costs ``D × block``, ``1/N`` of the product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

#: Default number of classes per block: a 2000-region block of scores is 2000 × 2048 × 4 B = 16 MB,
#: big enough that the product runs at full BLAS speed, small enough to stay in cache-friendly sizes.
DEFAULT_BLOCK = 2048

Storage = Literal["fp32", "fp16"]
_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


def weights_nbytes(num_classes: int, dim: int, dtype: Storage = "fp32") -> int:
    """Bytes needed to hold ``num_classes`` × ``dim`` weights (plus float32 biases) in ``dtype``."""
    if dtype not in _TORCH_DTYPE:
        raise ValueError(f"weight storage dtype must be one of {sorted(_TORCH_DTYPE)}, got {dtype!r}")
    item = 2 if dtype == "fp16" else 4
    return num_classes * dim * item + num_classes * 4


@dataclass
class ClassWeights:
    """Classifier weights prepared for repeated scoring.

    ``Wt`` is a ``(C, D)`` torch tensor (a possibly transposed *view*: preparing never copies a
    float32 ``(D,C)`` matrix) in the storage dtype; ``b`` is ``(C,)`` float32.
    """

    Wt: torch.Tensor
    b: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.Wt.shape[0])

    @property
    def dim(self) -> int:
        return int(self.Wt.shape[1])

    @property
    def dtype(self) -> Storage:
        return "fp16" if self.Wt.dtype == torch.float16 else "fp32"

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights and biases."""
        return self.Wt.numel() * self.Wt.element_size() + self.b.numel() * self.b.element_size()


def prepare_weights(
    W: np.ndarray | torch.Tensor | ClassWeights, b: np.ndarray | torch.Tensor | None = None, dtype: Storage | None = None,
    layout: Literal["auto", "DC", "CD"] = "auto", dim: int | None = None,
) -> ClassWeights:
    """Wrap ``W`` (``(D,C)`` as :mod:`rcnn.svm` stores it, or ``(C,D)``) and ``b`` ``(C,)``.

    ``layout="auto"`` tells the two apart by which axis has ``len(b)`` entries (and, when both
    do, by ``dim`` = the feature size; a square matrix without ``dim`` is taken as ``(D,C)``).
    ``dtype=None`` keeps float16 weights as float16 and everything else as float32; ``"fp16"``
    converts (one copy) for half the memory. float32 numpy input is shared, not copied.
    """
    if isinstance(W, ClassWeights):
        if dtype is None or dtype == W.dtype:
            return W
        return ClassWeights(W.Wt.to(_TORCH_DTYPE[dtype]), W.b)
    if b is None:
        raise ValueError("biases b (C,) are required with a raw weight matrix")
    Wt = torch.as_tensor(W)
    bt = torch.as_tensor(np.asarray(b, np.float32) if not isinstance(b, torch.Tensor) else b).float().reshape(-1)
    if Wt.ndim != 2:
        raise ValueError(f"weights must be a 2-D matrix (D,C) or (C,D), got shape {tuple(Wt.shape)}")
    C = len(bt)
    if layout == "auto":
        if Wt.shape[1] == C and (Wt.shape[0] != C or dim is None or dim == Wt.shape[0]):
            layout = "DC"
        elif Wt.shape[0] == C:
            layout = "CD"
        else:
            raise ValueError(f"weights of shape {tuple(Wt.shape)} do not match {C} biases")
    Wt = Wt.T if layout == "DC" else Wt
    if Wt.shape[0] != C:
        raise ValueError(f"weights of shape {tuple(W.shape)} ({layout}) do not match {C} biases")
    if dim is not None and Wt.shape[1] != dim:
        raise ValueError(f"weights have feature size {Wt.shape[1]}, features have {dim}")
    if dtype is None:
        dtype = "fp16" if Wt.dtype == torch.float16 else "fp32"
    if dtype not in _TORCH_DTYPE:
        raise ValueError(f"weight storage dtype must be one of {sorted(_TORCH_DTYPE)}, got {dtype!r}")
    return ClassWeights(Wt.to(_TORCH_DTYPE[dtype]), bt)


@dataclass
class TopK:
    """Per-class top-``k`` regions.

    ``indices`` ``(C,k)`` int64 region indices (``-1`` = empty slot: fewer than ``k`` regions, or
    fewer passed the threshold) and ``scores`` ``(C,k)`` float32, each row sorted by decreasing
    score (``-inf`` in empty slots).
    """

    indices: np.ndarray
    scores: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """``(C,k)`` bool: which slots hold a region."""
        return self.indices >= 0

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Valid entries as flat ``(regions, classes, scores)`` arrays, class-major, scores descending."""
        cls, slot = np.nonzero(self.valid)
        return self.indices[cls, slot], cls.astype(np.int64), self.scores[cls, slot]


def _as_features(feats: np.ndarray | torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(feats)
    if f.ndim != 2:
        f = f.reshape(len(f), -1)
    return f.float()


@torch.inference_mode()
def score_topk(
    feats: np.ndarray | torch.Tensor, W: np.ndarray | torch.Tensor | ClassWeights, b: np.ndarray | torch.Tensor | None = None,
    k: int | None = 100, threshold: float | None = None, block_classes: int = DEFAULT_BLOCK, dtype: Storage | None = None,
) -> TopK:
    """Per-class top-``k`` of ``feats (N,D) @ W + b`` without materialising the ``(N,C)`` scores.

    ``W`` is ``(D,C)``, ``(C,D)`` or a :class:`ClassWeights`; ``b`` ``(C,)``. ``k=None`` keeps every
    region (``k = N``; the output is then as big as the score matrix, fine for a few classes).
    ``threshold`` drops scores below it (``score >= threshold`` is kept). ``dtype`` is the weight
    storage (see :func:`prepare_weights`); arithmetic is float32. Peak extra memory is
    ``block_classes × N × 4`` bytes for the score block plus the ``(C,k)`` output.
    Ties within a class are broken by the lower region index (deterministic).
    """
    f = _as_features(feats)
    N, D = f.shape
    cw = prepare_weights(W, b, dtype=dtype, dim=D)
    if cw.dim != D:
        raise ValueError(f"weights have feature size {cw.dim}, features have {D}")
    C = cw.num_classes
    kk = N if k is None else min(int(k), N)
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if block_classes < 1:
        raise ValueError(f"block_classes must be >= 1, got {block_classes}")
    out_idx = np.full((C, kk), -1, np.int64)
    out_sc = np.full((C, kk), -np.inf, np.float32)
    if N == 0 or C == 0 or kk == 0:
        return TopK(out_idx, out_sc)
    fT = f.T  # (D,N) view: BLAS reads it transposed, no copy
    buf = torch.empty((min(block_classes, C), N), dtype=torch.float32)
    for c0 in range(0, C, block_classes):
        c1 = min(C, c0 + block_classes)
        Wb = cw.Wt[c0:c1]
        if Wb.dtype != torch.float32:
            Wb = Wb.float()  # fp16 storage: upcast one block (D × block), arithmetic stays fp32
        s = buf[: c1 - c0]
        # (block,D) @ (D,N) + b: one BLAS call with the bias fused, written into a reused buffer
        torch.addmm(cw.b[c0:c1, None], Wb, fT, out=s)
        # Per-class top-k in numpy, single-threaded on a zero-copy view (tiny multi-threaded torch
        # ops each pay a thread-pool synchronisation, which dominates on a busy machine):
        # np.partition finds each row's k-th largest score (introselect, ~2x faster than
        # torch.topk here), the mask of scores >= it gives the survivors in ascending index
        # order, and a stable sort by score orders them as (score desc, index asc).
        s_np = s.numpy()
        R = c1 - c0
        if kk < N:
            kth = np.partition(s_np, N - kk, axis=1)[:, N - kk : N - kk + 1]
            mask = s_np >= kth
            cnt = np.count_nonzero(mask, axis=1)
            if (cnt < kk).any():
                raise ValueError(f"scores of classes {c0}..{c1 - 1} are NaN: the features or weights are not finite")
            # equal scores straddling the k-th place (e.g. duplicate regions): those (rare) rows
            # take a stable full sort so the lower region indices win
            tied = np.nonzero(cnt > kk)[0]
            if len(tied):
                mask[tied] = False
            i = np.empty((R, kk), np.int64)
            ok = np.ones(R, bool)
            ok[tied] = False
            i[ok] = np.nonzero(mask)[1].reshape(-1, kk)
            if len(tied):
                i[tied] = np.argsort(-s_np[tied], axis=1, kind="stable")[:, :kk]
            v = np.take_along_axis(s_np, i, 1)
            order = np.argsort(-v, axis=1, kind="stable")
            i, v = np.take_along_axis(i, order, 1), np.take_along_axis(v, order, 1)
        else:
            i = np.argsort(-s_np, axis=1, kind="stable")
            v = np.take_along_axis(s_np, i, 1)
        if threshold is not None:
            keep = v >= threshold
            v, i = np.where(keep, v, np.float32(-np.inf)), np.where(keep, i, -1)
        out_sc[c0:c1] = v
        out_idx[c0:c1] = i
    return TopK(out_idx, out_sc)


def score_full(feats: np.ndarray | torch.Tensor, W: np.ndarray | torch.Tensor | ClassWeights,
               b: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """The full ``(N,C)`` float32 score matrix (for few classes, tests and evaluation tools)."""
    f = _as_features(feats)
    cw = prepare_weights(W, b, dim=f.shape[1])
    with torch.inference_mode():
        return torch.addmm(cw.b[None, :], f, cw.Wt.float().T).numpy()
