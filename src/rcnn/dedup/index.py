"""Descriptor collections (parallel, cached, resumable) and nearest-neighbour search.

* :func:`collect_images` turns a dataset root (VOC / PASCAL v1.00 / COCO .json) or a folder
  of images into :class:`ImageItem` rows (id, path, source ID such as a Flickr ID).
* :func:`compute_descriptors` computes GIST for a list of files in worker processes,
  chunk by chunk; each chunk is cached under ``cache_dir()/dedup/<config key>/`` with a
  key over the files' paths, sizes and mtimes, written atomically, so a killed run
  resumes where it stopped and a re-run is free.
* :func:`nearest_neighbors` is exact k-NN in Euclidean distance by blocked matrix products
  (``|q|² - 2 q·r + |r|²``, memory bounded by the block sizes), or faiss (``faiss-flat``
  exact, ``faiss-ivf`` approximate for very large collections).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from rcnn.cache import cache_dir, load_npz, save_npz, settings_hash
from rcnn.data import IMAGE_SUFFIXES, list_images, load_dataset
from rcnn.dedup.gist import GistConfig, gist_of_files
from rcnn.progress import ProgressFn, report

__all__ = [
    "SEARCH_METHODS",
    "ImageItem",
    "NNIndex",
    "collect_images",
    "compute_descriptors",
    "nearest_neighbors",
]

SEARCH_METHODS = ("exact", "faiss-flat", "faiss-ivf")


@dataclass(frozen=True)
class ImageItem:
    """One image of a collection: a display id, its file and (if known) its source ID."""

    image_id: str
    path: Path
    source_id: str | None = None  # VOC <source><flickrid>, COCO flickr_url id


def is_dataset(path: str | Path) -> bool:
    """True for a COCO ``.json`` or a folder with ``Annotations/`` (VOC) or ``Annotation/`` (PASCAL v1.00)."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".json"
    return (p / "Annotations").is_dir() or (p / "Annotation").is_dir()


def collect_images(path: str | Path, split: str | None = None, recursive: bool = False) -> list[ImageItem]:
    """Images of a dataset root (with their source IDs) or of a folder of images.

    A folder is listed non-recursively unless ``recursive``; ids are paths relative to it.
    Raises ``FileNotFoundError`` / ``ValueError`` with a one-line message.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if is_dataset(p):
        ds = load_dataset(p, split)
        return [ImageItem(r.image_id, Path(r.path), r.source_id) for r in ds.records]
    if not p.is_dir():
        raise ValueError(f"{p}: neither a dataset (VOC, PASCAL v1.00, COCO .json) nor a folder of images")
    if recursive:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = list_images(p)
    if not files:
        raise ValueError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [ImageItem(str(f.relative_to(p)), f) for f in files]


# ----------------------------------------------------------------------------- descriptors


def _chunk_key(paths: Sequence[Path], config: GistConfig) -> str:
    """Content key of one chunk: the files' resolved paths, sizes and mtimes, and the settings."""
    sig = []
    for f in paths:
        try:
            st = f.stat()
            sig.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((str(f), -1, -1))  # missing now; recomputed (and reported) if it appears
    return settings_hash("dedup-chunk", config.key(), sig, length=24)


def _worker_init() -> None:
    # one BLAS/OpenMP and one OpenCV thread per worker process: the parallelism is across processes
    threadpool_limits(1)
    cv2.setNumThreads(1)


def _compute_chunk(paths: list[str], config: GistConfig) -> tuple[np.ndarray, list[str | None]]:
    return gist_of_files(paths, config)


def compute_descriptors(
    paths: Sequence[str | Path],
    config: GistConfig = GistConfig(),
    workers: int | None = None,
    progress: ProgressFn | None = None,
    cache: bool = True,
    chunk_size: int = 128,
    description: str = "GIST",
) -> tuple[np.ndarray, list[str | None]]:
    """GIST descriptors of image files, in parallel, cached per chunk.

    Returns ``(N, config.dim)`` float32 (rows of unreadable files are NaN) and one error
    line per file (``None`` when it was read). ``workers`` defaults to the CPU count;
    ``workers=0`` or 1 computes in this process.
    """
    paths = [Path(p) for p in paths]
    n = len(paths)
    out = np.full((n, config.dim), np.nan, np.float32)
    errors: list[str | None] = [None] * n
    workers = (os.cpu_count() or 1) if workers is None else workers
    # several chunks per worker balance the load; chunk boundaries depend only on n and
    # chunk_size (not on workers) so that the cache is reused whatever the worker count
    chunks = [list(range(i, min(i + chunk_size, n))) for i in range(0, n, chunk_size)]
    root = cache_dir() / "dedup" / config.key()
    todo: list[tuple[list[int], Path | None]] = []
    for rows in chunks:
        f = root / f"{_chunk_key([paths[i] for i in rows], config)}.npz" if cache else None
        z = load_npz(f) if f is not None else None
        if z is not None and z.get("desc") is not None and z["desc"].shape == (len(rows), config.dim):
            out[rows] = z["desc"]
            for i, e in zip(rows, z["errors"].tolist(), strict=True):
                errors[i] = e or None
        else:
            todo.append((rows, f))

    def store(rows: list[int], f: Path | None, desc: np.ndarray, errs: list[str | None]) -> None:
        out[rows] = desc
        for i, e in zip(rows, errs, strict=True):
            errors[i] = e
        if f is not None:  # atomic: a killed run leaves whole chunks only, reused on resume
            save_npz(f, desc=desc, errors=np.array([e or "" for e in errs], dtype=str))

    done = [n - sum(len(r) for r, _ in todo)]

    def advance(k: int) -> None:
        done[0] += k
        report(progress, description, done[0], n)

    advance(0)
    if workers <= 1 or len(todo) <= 1:
        for rows, f in todo:
            desc, errs = gist_of_files([paths[i] for i in rows], config)
            store(rows, f, desc, errs)
            advance(len(rows))
    else:
        # forkserver: forking this (possibly multi-threaded) process could deadlock; the
        # server imports the GIST code (and torch, via rcnn.data) once, workers fork from it
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload(["rcnn.dedup.gist"])
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_worker_init) as ex:
            futs = {
                ex.submit(_compute_chunk, [str(paths[i]) for i in rows], config): (rows, f)
                for rows, f in todo
            }
            for fut in as_completed(futs):
                rows, f = futs[fut]
                desc, errs = fut.result()
                store(rows, f, desc, errs)
                advance(len(rows))
    return out, errors


# ----------------------------------------------------------------------------- search


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "faiss is not installed: `pip install 'rcnn[faiss]'` (or `pip install faiss-cpu`), "
            "or use the default exact search (method='exact')"
        ) from None
    return faiss


def _exact_knn(
    q: np.ndarray, r: np.ndarray, k: int, q_block: int, r_block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by blocks of ``q_block`` queries × ``r_block`` references (float32 matmuls)."""
    import torch  # imported here so that descriptor worker processes start without torch

    # scoped, not torch.set_grad_enabled(False): that leaked into the caller's process and
    # broke fine-tuning run later in the same process
    with torch.no_grad():
        return _exact_knn_blocks(torch, q, r, k, q_block, r_block)


def _exact_knn_blocks(torch, q: np.ndarray, r: np.ndarray, k: int, q_block: int, r_block: int) -> tuple[np.ndarray, np.ndarray]:
    nq, nr = len(q), len(r)
    dist = np.empty((nq, k), np.float32)
    idx = np.empty((nq, k), np.int64)
    rt = torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32))
    rn = (rt * rt).sum(1)
    for qs in range(0, nq, q_block):
        qt = torch.from_numpy(np.ascontiguousarray(q[qs : qs + q_block], dtype=np.float32))
        best_d = torch.full((len(qt), k), math.inf)
        best_i = torch.full((len(qt), k), -1, dtype=torch.int64)
        for rs in range(0, nr, r_block):
            # |q|² is constant per query: rank on |r|² - 2 q·r, add |q|² at the end
            d = torch.addmm(rn[rs : rs + r_block], qt, rt[rs : rs + r_block].T, alpha=-2.0)
            kk = min(k, d.shape[1])
            v, i = torch.topk(d, kk, dim=1, largest=False, sorted=False)
            cat_d = torch.cat([best_d, v], 1)
            cat_i = torch.cat([best_i, i + rs], 1)
            best_d, sel = torch.topk(cat_d, k, dim=1, largest=False, sorted=True)
            best_i = torch.gather(cat_i, 1, sel)
        d2 = best_d + (qt * qt).sum(1, keepdim=True)
        dist[qs : qs + len(qt)] = d2.clamp_min(0).sqrt().numpy()
        idx[qs : qs + len(qt)] = best_i.numpy()
    return dist, idx


class NNIndex:
    """A searchable reference collection (built once, searched many times).

    ``references`` ``(R, D)`` float32; NaN rows (unreadable images) are left out and never
    returned. ``method``: ``"exact"`` (blocked matrix products, memory ``q_block × r_block``
    floats), ``"faiss-flat"`` (exact, faiss), ``"faiss-ivf"`` (approximate: an inverted file
    of ``nlist`` ≈ √R k-means cells trained on a sample, ``nprobe`` cells visited per query).
    """

    def __init__(
        self,
        references: np.ndarray,
        method: str = "exact",
        q_block: int = 4096,
        r_block: int = 16384,
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        if method not in SEARCH_METHODS:
            raise ValueError(f"search method must be one of {SEARCH_METHODS}, not {method!r}")
        r = np.asarray(references, np.float32)
        if r.ndim != 2:
            raise ValueError(f"references must be (N, D), not {r.shape}")
        self.method, self.dim, self.q_block, self.r_block = method, r.shape[1], q_block, r_block
        self.r_ok = np.flatnonzero(np.isfinite(r).all(1))
        self.refs = np.ascontiguousarray(r[self.r_ok] if len(self.r_ok) < len(r) else r)
        self.index = None
        if method != "exact" and len(self.refs):
            faiss = _faiss()
            if method == "faiss-flat":
                self.index = faiss.IndexFlatL2(self.dim)
            else:
                n = len(self.refs)
                # √R cells, ≥ 39 training points per cell (faiss' own minimum), ≤ 64 used
                cells = nlist or max(1, min(n // 39, int(math.sqrt(n))))
                self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, cells)
                rng = np.random.default_rng(0)
                sample = self.refs[np.sort(rng.choice(n, min(n, 64 * cells), replace=False))]
                self.index.train(sample)
                self.index.nprobe = min(nprobe, cells)
            self.index.add(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(dist (Q, k) float32, idx (Q, k) int64)``: Euclidean distances sorted ascending and
        row indices into the original ``references``; ``inf`` / ``-1`` where there is no
        neighbour (NaN query, or fewer than ``k`` references)."""
        q = np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries {q.shape} must be (N, {self.dim})")
        nq = len(q)
        dist = np.full((nq, k), np.inf, np.float32)
        idx = np.full((nq, k), -1, np.int64)
        q_ok = np.flatnonzero(np.isfinite(q).all(1))
        if len(q_ok) == 0 or len(self.refs) == 0:
            return dist, idx
        qv = np.ascontiguousarray(q[q_ok] if len(q_ok) < nq else q)
        kk = min(k, len(self.refs))
        if self.index is None:
            d, i = _exact_knn(qv, self.refs, kk, self.q_block, self.r_block)
        else:
            d2, i = self.index.search(qv, kk)
            d = np.sqrt(np.maximum(d2, 0)).astype(np.float32)
            d[i < 0] = np.inf
        i = np.where(i >= 0, self.r_ok[np.maximum(i, 0)], -1)
        dist[q_ok, :kk] = d
        idx[q_ok, :kk] = i
        return dist, idx


def nearest_neighbors(
    queries: np.ndarray,
    references: np.ndarray,
    k: int = 1,
    method: str = "exact",
    q_block: int = 4096,
    r_block: int = 16384,
    nlist: int | None = None,
    nprobe: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest references of each query in Euclidean distance (see :class:`NNIndex`).

    ``queries`` ``(Q, D)``, ``references`` ``(R, D)`` float32. Returns ``(dist (Q, k)
    float32, idx (Q, k) int64)`` sorted by distance; NaN rows never match (``inf``, ``-1``).
    """
    q = np.asarray(queries, np.float32)
    r = np.asarray(references, np.float32)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"queries {q.shape} and references {r.shape} must be (N, D) with the same D")
    return NNIndex(r, method, q_block, r_block, nlist, nprobe).search(q, k)
