"""Category-independent region proposals: selective search (paper §2.1), cached and parallel.

R-CNN runs selective search in its "fast mode" on every image and keeps the ~2000 boxes
it returns (paper §2.2). :func:`selective_search` builds that mode from OpenCV's
``ximgproc.segmentation`` pieces (Felzenszwalb graph segmentation + hierarchical grouping;
not reimplemented here) with the settings of the authors' ``selective_search_boxes.m``:

* colour spaces HSV and Lab (``COLOR_RGB2HSV_FULL``: hue 0–255 as in MATLAB, so the
  colour histograms use all their bins; plain ``HSV`` puts hue in 0–179),
* Felzenszwalb ``k`` in {50, 100}, ``sigma`` 0.8, minimum segment size = ``k``,
* two similarity strategies: colour+texture+size+fill and texture+size+fill,
* the image resized to 500 px width before segmentation and the boxes scaled back
  (by default only images *wider* than 500 px; ``upscale=True`` also enlarges narrower
  ones as the original did, which costs boxes and time but no recall on VOC),
* boxes narrower than 20 px (in the 500-px image) dropped, exact duplicates removed.

Differences from the original that remain (OpenCV's API does not expose them): OpenCV's
texture histograms use its own Gaussian-derivative filters, its "fill" and ranking
(``level × random``) follow the C++ port, not the MATLAB code, and its segmentation is
OpenCV's Felzenszwalb, so our boxes match the authors' only *statistically*: on the two
reference images only ~17–26 % of their boxes have an IoU ≥ 0.9 twin in ours, while the
recall of both sets is close (see ``bench/results/proposals.json``).

Boxes are ``(N, 4)`` float32 pixel-edge ``xyxy`` in the original image (see
:mod:`rcnn.boxes`), in the method's ranking order (best first), deduplicated, clipped.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from rcnn.cache import (
    cache_dir,
    dir_size_mb,
    file_sha256,
    load_npz,
    safe_filename,
    save_json,
    save_npz,
    settings_hash,
)
from rcnn.data import Dataset, ImageReadError, ImageRecord, load_image
from rcnn.progress import ProgressFn, report

MODES = ("rcnn-fast", "fast", "quality")

#: Bump when the algorithm changes in a way that changes boxes (invalidates caches).
ALGO_VERSION = 2

#: Felzenszwalb k values of the original fast mode (paper §2.1 "fast mode"; selective_search_boxes.m).
RCNN_KS = (50, 100)
#: A documented small-object setting: finer segmentations for tiny objects (BCCD platelets).
SMALL_OBJECT_KS = (25, 50)


@dataclass(frozen=True)
class ProposalConfig:
    """Settings of one proposal run; every field enters the cache key.

    ``mode``: ``"rcnn-fast"`` (default, the paper's fast mode, §2.1), or OpenCV's presets
    ``"fast"`` / ``"quality"`` (``switchToSelectiveSearchFast/Quality``).
    ``ks``, ``sigma``: Felzenszwalb parameters for ``rcnn-fast`` (min segment size = k).
    ``resize_width``: segment a copy resized to this width (px) and scale the boxes back;
    ``None`` = the mode's default (500 for ``rcnn-fast``, no resize for OpenCV's presets),
    ``0`` = never resize. ``upscale``: also enlarge narrower images to ``resize_width``
    (the original code did; off by default because it gives ~25 % more boxes and ~2x the
    time on portrait VOC images for the same recall). ``max_side``: the segmented copy is further shrunk so that its
    longer side is at most this (guards huge or very elongated images).
    ``min_size``: drop boxes narrower than this many px *in the segmented image* (the
    original drops < 20 px at 500 px width); ``None`` = 20 for ``rcnn-fast``, 0 otherwise.
    ``min_height``: same for the height (default 0: the original filters width only).
    ``max_boxes``: keep only the first (best-ranked) boxes; ``None`` keeps all.
    ``seed``: seeds the random factor of the ranking (``level × rand()``, as in the
    original), so the order, and therefore ``max_boxes``, is reproducible.
    """

    mode: str = "rcnn-fast"  # paper §2.2: selective search's "fast mode"
    ks: tuple[int, ...] = RCNN_KS
    sigma: float = 0.8
    resize_width: int | None = None
    upscale: bool = False
    max_side: int = 2000
    min_size: float | None = None
    min_height: float = 0.0
    max_boxes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"proposal mode must be one of {MODES}, not {self.mode!r}")
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or min(self.ks) <= 0:
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        if self.max_boxes is not None and self.max_boxes <= 0:
            raise ValueError("max_boxes must be positive or None")

    @property
    def effective_resize_width(self) -> int:
        if self.resize_width is None:
            return 500 if self.mode == "rcnn-fast" else 0
        return int(self.resize_width)

    @property
    def effective_min_size(self) -> float:
        if self.min_size is None:
            return 20.0 if self.mode == "rcnn-fast" else 0.0
        return float(self.min_size)

    def key(self) -> str:
        """Hash of everything that changes the boxes (settings, OpenCV version, algorithm)."""
        return settings_hash("proposals", ALGO_VERSION, cv2.__version__, asdict(self))

    def describe(self) -> str:
        if self.mode == "rcnn-fast":
            return (
                f"rcnn-fast ks={list(self.ks)} sigma={self.sigma} width={self.effective_resize_width} "
                f"min_size={self.effective_min_size:g}"
            )
        return (
            f"{self.mode} width={self.effective_resize_width or 'orig'} min_size={self.effective_min_size:g}"
        )


# ----------------------------------------------------------------------------- core


def _as_rgb8(image: np.ndarray) -> np.ndarray:
    """Any HxW, HxWx1, HxWx3 or HxWx4 array -> contiguous (H,W,3) uint8 RGB."""
    img = np.asarray(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected an (H,W), (H,W,1), (H,W,3) or (H,W,4) image, got shape {img.shape}")
    if img.size == 0:
        raise ValueError(f"empty image, shape {img.shape}")
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        elif np.issubdtype(img.dtype, np.floating) or img.dtype == bool:
            img = np.clip(np.nan_to_num(img.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:  # composite on white, as rcnn.data.load_image does
        a = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(img)


def _segmentation_size(w: int, h: int, config: ProposalConfig) -> tuple[int, int]:
    """Size (w, h) of the copy that is segmented."""
    rw = config.effective_resize_width
    s = rw / w if rw > 0 and (rw < w or config.upscale) else 1.0
    if max(w, h) * s > config.max_side:
        s = config.max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _build(img: np.ndarray, config: ProposalConfig):
    """A configured ``SelectiveSearchSegmentation`` for the RGB uint8 image ``img``."""
    from cv2.ximgproc import segmentation as S  # contrib module; import here for a clear error

    ss = S.createSelectiveSearchSegmentation()
    if config.mode != "rcnn-fast":
        ss.setBaseImage(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if config.mode == "fast":
            ss.switchToSelectiveSearchFast()
        else:
            ss.switchToSelectiveSearchQuality()
        return ss
    # selective_search_boxes.m fast mode: colorTypes {'Hsv','Lab'} (paper §2.1)
    ss.addImage(cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL))
    ss.addImage(cv2.cvtColor(img, cv2.COLOR_RGB2Lab))
    for k in config.ks:  # k in {50, 100}, sigma 0.8, minSize = k
        ss.addGraphSegmentation(S.createGraphSegmentation(config.sigma, float(k), int(k)))
    # simFunctionHandles {@SSSimColourTextureSizeFillOrig, @SSSimTextureSizeFill}
    ss.addStrategy(
        S.createSelectiveSearchSegmentationStrategyMultiple(
            S.createSelectiveSearchSegmentationStrategyColor(),
            S.createSelectiveSearchSegmentationStrategyTexture(),
            S.createSelectiveSearchSegmentationStrategySize(),
            S.createSelectiveSearchSegmentationStrategyFill(),
        )
    )
    ss.addStrategy(
        S.createSelectiveSearchSegmentationStrategyMultiple(
            S.createSelectiveSearchSegmentationStrategyTexture(),
            S.createSelectiveSearchSegmentationStrategySize(),
            S.createSelectiveSearchSegmentationStrategyFill(),
        )
    )
    return ss


def selective_search(image: np.ndarray, config: ProposalConfig | None = None, **overrides) -> np.ndarray:
    """Region proposals for one image.

    ``image``: ``(H,W,3)`` RGB uint8 (grayscale, ``(H,W,1)``, RGBA and non-uint8 are
    converted). ``config`` (default :class:`ProposalConfig`, the paper's fast mode) or
    keyword overrides, e.g. ``selective_search(img, mode="quality")`` or ``ks=(25, 50)``.
    Returns ``(N,4)`` float32 pixel-edge ``xyxy`` in ``image``'s pixels, clipped, unique,
    best-ranked first, ``N >= 1`` (the whole image if every box was filtered out).
    """
    config = config or ProposalConfig()
    if overrides:
        config = ProposalConfig(**{**asdict(config), **overrides})
    img = _as_rgb8(image)
    h, w = img.shape[:2]
    sw, sh = _segmentation_size(w, h, config)
    seg = (
        img
        if (sw, sh) == (w, h)
        else cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA if sw < w else cv2.INTER_LINEAR)
    )
    ss = _build(seg, config)
    _seed_libc_rand(config.seed)
    rects = ss.process()  # (N,4) int32 x, y, w, h; w counts pixels
    rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    keep = (rects[:, 2] >= config.effective_min_size) & (rects[:, 3] >= config.min_height)
    rects = rects[keep]
    # x,y,w,h with w = number of pixel columns -> pixel-edge x1 = x, x2 = x + w
    boxes = np.empty_like(rects)
    boxes[:, :2] = rects[:, :2]
    boxes[:, 2:] = rects[:, :2] + rects[:, 2:]
    # scale back to the original pixels (pixel edges scale linearly)
    boxes = (boxes.astype(np.float64) * np.array([w / sw, h / sh, w / sw, h / sh])).astype(np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    boxes = boxes[_first_unique(boxes)]
    if config.max_boxes is not None:
        boxes = boxes[: config.max_boxes]
    if len(boxes) == 0:
        boxes = np.array([[0, 0, w, h]], dtype=np.float32)
    return np.ascontiguousarray(boxes, dtype=np.float32)


def _seed_libc_rand(seed: int) -> None:
    """Seed C ``rand()``, which OpenCV's selective search uses to randomise its ranking
    (``rank = level * rand()``); without this the box order changes from call to call.
    Process-global: callers running selective search in threads get a valid but
    not reproducible order."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None)
            _LIBC.srand.argtypes = [ctypes.c_uint]
        except (OSError, AttributeError, TypeError):  # no C library handle (e.g. Windows): order stays random
            _LIBC = False
    if _LIBC:
        _LIBC.srand(int(seed) & 0xFFFFFFFF)


_LIBC = None


def _first_unique(boxes: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct box (rounded to 1/100 px), in order.

    Scaling back can map distinct small-image boxes onto the same box; OpenCV already
    removes exact duplicates before that. (numpy here keeps worker processes torch-free.)
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(np.round(boxes, 2), axis=0, return_index=True)
    return np.sort(first).astype(np.int64)


# ----------------------------------------------------------------------------- cache


def proposals_dir(config: ProposalConfig, dataset_root: str | Path, cache_root: str | Path | None = None) -> Path:
    """Cache folder for one dataset and one config: ``<cache>/proposals/<config key>/<dataset hash>``
    (``<cache>``: ``cache_root``, default :func:`rcnn.cache.cache_dir`)."""
    root = str(Path(dataset_root).resolve())
    return Path(cache_root or cache_dir()) / "proposals" / config.key() / settings_hash("dataset", root)


def proposal_path(record: ImageRecord, config: ProposalConfig, dataset_root: str | Path,
                  cache_root: str | Path | None = None) -> Path:
    return proposals_dir(config, dataset_root, cache_root) / f"{safe_filename(record.image_id)}.npz"


def _load_cached(path: Path, image_sha: str) -> np.ndarray | None:
    z = load_npz(path)
    if z is None or "boxes" not in z or str(z.get("image_sha256", "")) != image_sha:
        return None  # missing, corrupt, or the image file changed since
    b = z["boxes"]
    if b.ndim != 2 or b.shape[1] != 4:
        return None
    return b.astype(np.float32, copy=False)


def _compute_and_store(
    record: ImageRecord, config: ProposalConfig, path: Path, image_sha: str
) -> tuple[np.ndarray, float]:
    img = load_image(record.path)
    t0, c0 = time.perf_counter(), time.process_time()
    boxes = selective_search(img, config)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_npz(
        path,
        boxes=boxes,
        image_sha256=np.array(image_sha),
        image_size=np.array([img.shape[1], img.shape[0]], dtype=np.int32),
        seconds=np.array(dt, dtype=np.float64),
        cpu_seconds=np.array(cpu, dtype=np.float64),
    )
    return boxes, dt, cpu


def get_proposals(
    record: ImageRecord, config: ProposalConfig | None = None, dataset_root: str | Path | None = None,
    cache_root: str | Path | None = None,
) -> np.ndarray:
    """Proposals ``(N,4)`` float32 xyxy for ``record``: from the cache, else computed and stored.

    The cache entry is keyed by ``config.key()``, ``dataset_root`` (default: the image's
    folder) and the image id, and stores the image file's sha256, so a changed setting or a
    changed image never reuses stale boxes. ``cache_root``: the cache folder (default
    :func:`rcnn.cache.cache_dir`; worker processes get their parent's). Raises
    :class:`rcnn.data.ImageReadError` (one line naming the file) for an unreadable image.
    """
    config = config or ProposalConfig()
    root = Path(dataset_root) if dataset_root is not None else Path(record.path).parent
    path = proposal_path(record, config, root, cache_root)
    try:
        sha = file_sha256(record.path)
    except OSError as e:
        raise ImageReadError(f"{record.path}: cannot read ({e.strerror or e})") from None
    cached = _load_cached(path, sha)
    if cached is not None:
        return cached
    return _compute_and_store(record, config, path, sha)[0]


# ----------------------------------------------------------------------------- dataset


@dataclass
class ProposalSummary:
    """What :func:`propose_dataset` did. ``failed`` holds ``(image_id, one-line message)``."""

    images: int
    computed: int
    cached: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    compute_seconds: float = 0.0  # selective search wall time summed over workers
    compute_cpu_seconds: float = 0.0  # the same in CPU time (one OpenCV thread: = one-core time)
    mean_boxes: float = 0.0
    cache_dir: str = ""
    cache_mb: float = 0.0
    workers: int = 1
    config: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return asdict(self)


def _init_worker() -> None:
    # One OpenCV thread per process: parallelism comes from the processes, and
    # oversubscribed thread pools only slow the 2-core machine down.
    cv2.setNumThreads(1)
    cv2.setUseOptimized(True)


def _work(args: tuple[ImageRecord, ProposalConfig, str, str]) -> tuple[str, int, float, float, str | None]:
    # the parent names the cache file: a forkserver worker has the environment of the server's
    # start, which may predate the caller's cache folder
    record, config, path, sha = args
    try:
        boxes, dt, cpu = _compute_and_store(record, config, Path(path), sha)
        return record.image_id, len(boxes), dt, cpu, None
    except ImageReadError as e:
        return record.image_id, 0, 0.0, 0.0, str(e)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (
            record.image_id,
            0,
            0.0,
            0.0,
            f"{record.path}: proposal computation failed ({type(e).__name__}: {msg})",
        )


def propose_dataset(
    dataset: Dataset,
    config: ProposalConfig | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    records: Sequence[ImageRecord] | None = None,
) -> ProposalSummary:
    """Fill the proposal cache for every image of ``dataset`` (or ``records``) in parallel.

    ``workers``: processes (default: CPU cores; 1 runs in this process). Images already
    cached are not recomputed, so a killed run resumes and a second run does no work.
    An unreadable image is reported in ``summary.failed`` and the run continues; ``progress``
    hears of each image computed (with the images/s).
    """
    config = config or ProposalConfig()
    records = list(dataset.records if records is None else records)
    root = str(Path(dataset.root).resolve())
    workers = max(1, int(workers or os.cpu_count() or 1))
    t0 = time.perf_counter()
    summary = ProposalSummary(
        images=len(records), computed=0, cached=0, workers=workers, config=config.describe()
    )
    n_boxes: list[int] = []
    todo = []
    for r in records:
        try:
            sha = file_sha256(r.path)
        except OSError as e:
            summary.failed.append((r.image_id, f"{r.path}: cannot read ({e.strerror or e})"))
            continue
        path = proposal_path(r, config, root)
        cached = _load_cached(path, sha)
        if cached is not None:
            summary.cached += 1
            n_boxes.append(len(cached))
        else:
            todo.append((r, config, str(path), sha))

    task, done = f"proposals ({config.mode})", [0]

    def _collect(result) -> None:
        image_id, n, dt, cpu, err = result
        if err:
            summary.failed.append((image_id, err))
        else:
            summary.computed += 1
            summary.compute_seconds += dt
            summary.compute_cpu_seconds += cpu
            n_boxes.append(n)
        done[0] += 1
        report(progress, task, done[0], len(todo), f"{done[0] / max(time.perf_counter() - t0, 1e-9):.2f} img/s")

    if todo:
        if workers == 1 or len(todo) == 1:
            threads = cv2.getNumThreads()
            _init_worker()
            try:
                for item in todo:
                    _collect(_work(item))
            finally:
                cv2.setNumThreads(threads)  # leave the caller's OpenCV as it was
        else:
            # forkserver, not fork: forking a process whose OpenCV/torch thread pools are running
            # can deadlock the child (seen in the test suite); the server is a clean process
            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload(["rcnn.proposals"])
            else:
                ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker) as pool:
                for result in pool.imap_unordered(_work, todo, chunksize=1):
                    _collect(result)
    summary.seconds = time.perf_counter() - t0
    summary.mean_boxes = float(np.mean(n_boxes)) if n_boxes else 0.0
    d = proposals_dir(config, root)
    summary.cache_dir = str(d)
    summary.cache_mb = dir_size_mb(d)
    return summary


# ----------------------------------------------------------------------------- recall


#: Proposal counts at which the recall-vs-#proposals curve is sampled.
RECALL_COUNTS = (10, 20, 50, 100, 200, 300, 500, 700, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 7000, 10000)


@dataclass
class RecallResult:
    """Proposal quality over a set of images (non-difficult objects only).

    ``best_overlaps``: per object, the best IoU of any proposal. ``mabo``: mean over
    classes of the per-class average best overlap (Uijlings et al.'s MABO);
    ``abo_objects``: the same averaged over objects. ``curve``: ``{count: recall@0.5}``
    using only the first ``count`` proposals of each image (ranking order)."""

    images: int
    objects: int
    mean_boxes: float
    recall: dict[str, float]  # {"0.5": r, "0.7": r}
    mabo: float
    abo_objects: float
    per_class: dict[str, dict[str, float]]  # class -> {objects, recall@0.5, recall@0.7, abo}
    curve: dict[str, dict[int, float]]  # threshold -> {count: recall}

    def as_dict(self) -> dict:
        return asdict(self)


def best_overlaps(
    gt: np.ndarray, proposals: np.ndarray, counts: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU of each of the ``(G,4)`` ground-truth boxes with ``(N,4)`` proposals.

    Returns ``(best (G,), best_at (G, len(counts)))`` where ``best_at[:, j]`` uses only
    the first ``counts[j]`` proposals.
    """
    g = np.asarray(gt, np.float64).reshape(-1, 4)
    p = np.asarray(proposals, np.float64).reshape(-1, 4)
    if len(g) == 0 or len(p) == 0:
        return np.zeros(len(g)), np.zeros((len(g), len(counts)))
    ix1 = np.maximum(g[:, None, 0], p[None, :, 0])
    iy1 = np.maximum(g[:, None, 1], p[None, :, 1])
    ix2 = np.minimum(g[:, None, 2], p[None, :, 2])
    iy2 = np.minimum(g[:, None, 3], p[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    iou = inter / np.maximum(area_g[:, None] + area_p[None, :] - inter, 1e-12)
    run = np.maximum.accumulate(iou, axis=1)
    at = np.stack([run[:, min(c, len(p)) - 1] for c in counts], axis=1) if counts else np.zeros((len(g), 0))
    return run[:, -1], at


def proposal_recall(
    records: Sequence[ImageRecord],
    proposals: Sequence[np.ndarray],
    classes: Sequence[str],
    thresholds: Sequence[float] = (0.5, 0.7),
    counts: Sequence[int] = RECALL_COUNTS,
) -> RecallResult:
    """Recall at IoU ``thresholds``, MABO and recall-vs-#proposals of ``proposals[i]``
    (``(N_i,4)`` xyxy, ranking order) against the non-difficult boxes of ``records[i]``."""
    if len(records) != len(proposals):
        raise ValueError(f"{len(records)} records but {len(proposals)} proposal arrays")
    best, best_at, labels = [], [], []
    for r, p in zip(records, proposals, strict=True):
        keep = ~np.asarray(r.difficult, bool)
        b, a = best_overlaps(r.boxes[keep], p, counts)
        best.append(b)
        best_at.append(a)
        labels.append(np.asarray(r.labels)[keep])
    best_v = np.concatenate(best) if best else np.zeros(0)
    at_v = np.concatenate(best_at) if best_at else np.zeros((0, len(counts)))
    lab_v = np.concatenate(labels).astype(int) if labels else np.zeros(0, int)
    rec = {f"{t:g}": float(np.mean(best_v >= t)) if len(best_v) else float("nan") for t in thresholds}
    per_class: dict[str, dict[str, float]] = {}
    for ci, name in enumerate(classes):
        m = lab_v == ci
        if not m.any():
            continue
        per_class[name] = {"objects": int(m.sum()), "abo": float(best_v[m].mean())}
        per_class[name].update({f"recall@{t:g}": float(np.mean(best_v[m] >= t)) for t in thresholds})
    curve = {
        f"{t:g}": {
            int(c): float(np.mean(at_v[:, j] >= t)) if len(at_v) else float("nan")
            for j, c in enumerate(counts)
        }
        for t in thresholds
    }
    return RecallResult(
        images=len(records),
        objects=len(best_v),
        mean_boxes=float(np.mean([len(p) for p in proposals])) if len(proposals) else 0.0,
        recall=rec,
        mabo=float(np.mean([v["abo"] for v in per_class.values()])) if per_class else float("nan"),
        abo_objects=float(best_v.mean()) if len(best_v) else float("nan"),
        per_class=per_class,
        curve=curve,
    )


def dataset_recall(ds: Dataset, config: ProposalConfig, json_path: str | Path, png_path: str | Path,
                   meta: dict | None = None, title: str = "", workers: int | None = None,
                   progress: ProgressFn | None = None) -> tuple[ProposalSummary, RecallResult]:
    """Fill the proposal cache of ``ds`` (:func:`propose_dataset`) and measure the proposals' recall
    (:func:`proposal_recall`) over the images that could be read; write the result as JSON to
    ``json_path`` (``meta`` first, then ``config`` and ``cache_mb``) and the recall-vs-#proposals
    curve as a PNG to ``png_path``. Returns the cache summary (its ``failed`` were left out) and
    the recall."""
    s = propose_dataset(ds, config, workers=workers, progress=progress)
    failed = {i for i, _ in s.failed}
    recs = [r for r in ds.records if r.image_id not in failed]
    res = proposal_recall(recs, [get_proposals(r, config, ds.root) for r in recs], ds.classes)
    save_json(json_path, {**(meta or {}), "config": config.describe(), "cache_mb": s.cache_mb, **res.as_dict()})
    plot_recall_curve({config.mode: res}, png_path, title=title)
    return s, res


def plot_recall_curve(
    results: dict[str, RecallResult], path: str | Path, threshold: float = 0.5, title: str = ""
) -> Path:
    """Write a recall-vs-#proposals PNG (one line per labelled result) with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, res in results.items():
        curve = res.curve[f"{threshold:g}"]
        xs = [c for c in sorted(curve) if c <= max(res.mean_boxes, 10) * 1.05 or c == min(curve)]
        ax.plot(xs, [curve[c] for c in xs], marker=".", label=f"{label} ({res.mean_boxes:.0f} boxes/img)")
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image")
    ax.set_ylabel(f"recall @ IoU {threshold:g}")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Proposal recall")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
