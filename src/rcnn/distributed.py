"""Feature extraction on many machines: the ``local`` and ``ray`` engines.

R-CNN's expensive part is per image and embarrassingly parallel: proposals then CNN features
(paper §2.1–2.2), after which training and detection only read the per-image feature cache.
An *engine* fills that cache for a set of images:

* ``local``: this process — :func:`rcnn.proposals.propose_dataset` (a process pool) then
  :func:`rcnn.features.features_for_dataset` (one image at a time, torch on every core);
* ``ray``: `Ray <https://docs.ray.io>`_ tasks, each running :func:`rcnn.features.get_features`
  (proposals + features) for a shard of images on one CPU, writing into the *same*
  content-keyed cache (``$RCNN_CACHE_DIR``; on a cluster, a path every node sees, e.g. an NFS
  mount). Entries are written atomically and keyed by content, so local and Ray runs are
  interchangeable and a killed run resumes. Ray re-runs the tasks of a worker that died
  (``max_retries``) and retries transient errors (``OSError``, ``MemoryError``); an unreadable
  image is a reported failure, not a retry. The driver reports each finished image to ``progress``.

Ray workers get the driver's cache folder and their thread count through the tasks' ``runtime_env``
(``RCNN_CACHE_DIR``, ``RCNN_THREADS``): a worker's own environment is the cluster's, not the driver's.

Without an ``address`` a private local Ray instance is started (``num_cpus`` workers) and shut
down afterwards; ``address="auto"`` joins the cluster started by ``ray start`` on this node, and
``"HOST:PORT"`` a remote head node.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rcnn.cache import cache_dir, dir_size_mb
from rcnn.data import Dataset, ImageReadError, ImageRecord
from rcnn.features import (
    FeatureConfig,
    feature_dir,
    feature_dirs,
    feature_path,
    features_for_dataset,
    get_features,
    tap_configs,
)
from rcnn.progress import ProgressFn, report
from rcnn.proposals import ProposalConfig, get_proposals, propose_dataset

ENGINES = ("local", "ray")
#: Default local Ray instance size (the tests' and a laptop's setting).
DEFAULT_RAY_CPUS = 2


@dataclass
class EngineSummary:
    """What an engine run did (counts are images; ``seconds`` is the driver's wall time)."""

    engine: str
    workers: int
    images: int = 0
    computed: int = 0
    cached: int = 0
    failed: list[str] = field(default_factory=list)
    regions: int = 0  # regions computed in this run
    seconds: float = 0.0
    startup_s: float = 0.0  # ray: connecting / starting the instance (not in ``seconds``)
    cache_dir: str = ""
    cache_mb: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def regions_per_s(self) -> float:
        return self.regions / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s, "regions_per_s": self.regions_per_s}


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")


# ----------------------------------------------------------------------------- ray plumbing


def ray_available() -> bool:
    """Whether the optional ``ray`` package is installed (``pip install 'rcnn[ray]'``)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[float]:
    """Connect to Ray (``address``: ``"auto"`` / ``"HOST:PORT"``) or start a private local instance
    with ``num_cpus`` CPUs (default 2); yields the startup seconds. An instance started here is
    shut down on exit; one that was already initialised (or a cluster) is left running."""
    if not ray_available():
        raise RuntimeError("the ray engine needs the 'ray' package: pip install 'rcnn[ray]' (or 'ray[default]')")
    import logging

    import ray

    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        kw = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
        if address:
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise RuntimeError(f"cannot connect to the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
        else:
            ray.init(num_cpus=int(num_cpus or DEFAULT_RAY_CPUS), include_dashboard=False, **kw)
        started = True
    try:
        yield time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()


_PROPOSAL_POOL = None  # one long-lived helper process per Ray worker (see _proposals_isolated)


def _compute_proposals(record: ImageRecord, proposal_config, root: str, cache_root: str) -> None:
    """Runs in the helper process: compute and cache one image's proposals."""
    import cv2

    cv2.setNumThreads(1)
    get_proposals(record, proposal_config, root, cache_root)


def _proposals_isolated(record: ImageRecord, proposal_config, root: str) -> None:
    """Compute and cache ``record``'s proposals in a separate, single-threaded process.

    Selective search ranks boxes with C ``rand()`` (seeded per image by :mod:`rcnn.proposals`);
    a Ray worker's background threads also call ``rand()``, which made the box order differ
    from run to run. The helper process is started by a *forkserver* (a clean process with no
    other threads; forking the multi-threaded worker itself deadlocked when a lock was held at
    fork time), so the order is the local engine's, bit for bit. ImageReadError is re-raised
    here; any other failure becomes an ``OSError``, which Ray retries."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    global _PROPOSAL_POOL
    if "forkserver" not in multiprocessing.get_all_start_methods():  # e.g. Windows: in-process
        get_proposals(record, proposal_config, root)
        return
    if _PROPOSAL_POOL is None:
        import atexit

        _PROPOSAL_POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("forkserver"))
        # shut down before the interpreter tears its modules down (else its exit callback fails noisily)
        atexit.register(_PROPOSAL_POOL.shutdown)
    try:
        _PROPOSAL_POOL.submit(_compute_proposals, record, proposal_config, root, str(cache_dir())).result()
    except ImageReadError:
        raise
    except BrokenProcessPool as e:
        _PROPOSAL_POOL = None
        raise OSError(f"{record.path}: proposal process failed ({e})") from None
    except Exception as e:
        raise OSError(f"{record.path}: proposal process failed ({type(e).__name__}: {e})") from None


def _features_shard(items: list[tuple[ImageRecord, str]], proposal_config, feature_config) -> list[dict]:
    """One Ray task: proposals + features of each image into the shared cache (runs in a worker
    whose ``runtime_env`` holds the driver's cache folder and the task's thread count)."""

    out = []
    # the driver checks this against its own: workers running another rcnn version (other
    # settings hash) would fill a cache the driver never reads
    where = str(feature_dir(proposal_config, feature_config, items[0][1])) if items else ""
    for rec, root in items:
        t0 = time.perf_counter()
        cached = all(feature_path(rec, proposal_config, c, root).is_file() for c in tap_configs(feature_config))
        try:
            if not cached:
                _proposals_isolated(rec, proposal_config, root)
            boxes, _ = get_features(rec, proposal_config, feature_config, root)
        except ImageReadError as e:  # deterministic: report, do not retry
            out.append({"image_id": rec.image_id, "error": str(e), "regions": 0, "cached": False, "seconds": 0.0})
            continue
        out.append({"image_id": rec.image_id, "error": None, "regions": len(boxes), "cached": cached,
                    "seconds": time.perf_counter() - t0, "pid": os.getpid(), "feature_dir": where})
    return out


def _warm(feature_config) -> int:
    """Import torch and load the backbone in a worker (once per worker process); returns its pid."""
    feature_config.backbone_obj()
    return os.getpid()


def _noop(x: int) -> int:
    """A task that does nothing (for measuring the per-task overhead)."""
    return x


def ray_task_overhead(tasks: int = 200) -> float:
    """Seconds per trivial Ray task round trip (submit + schedule + return), inside a session."""
    import ray

    f = ray.remote(num_cpus=1)(_noop)
    ray.get([f.remote(i) for i in range(8)])  # warm the worker pool
    t0 = time.perf_counter()
    ray.get([f.remote(i) for i in range(tasks)])
    return (time.perf_counter() - t0) / tasks


def _ray_features(
    records: Sequence[ImageRecord], root: str, pc, fc, summary: EngineSummary, images_per_task: int, threads: int,
    max_retries: int, progress: ProgressFn | None, gpus_per_task: float = 0.0,
) -> None:
    import ray


    expected = str(feature_dir(pc, fc, root))
    # the driver's cache folder, and `threads` torch threads per task (rcnn.backbones.set_threads)
    env = {"env_vars": {"RCNN_CACHE_DIR": str(cache_dir()), "RCNN_THREADS": str(threads)}}
    # gpus_per_task > 0: Ray schedules tasks on GPU nodes and exposes the GPU to each task, where
    # FeatureConfig.device="auto" (the default) then runs the CNN on it (rcnn.device)
    task = ray.remote(num_cpus=threads, num_gpus=gpus_per_task, max_retries=max_retries,
                      retry_exceptions=[OSError, MemoryError], runtime_env=env)(_features_shard)
    shards = [[(r, root) for r in records[i : i + images_per_task]] for i in range(0, len(records), images_per_task)]
    res = ray.available_resources()
    workers = max(1, int(res.get("CPU", 1) // threads))
    if gpus_per_task > 0:
        workers = max(1, min(workers, int(res.get("GPU", 0) // gpus_per_task)))
    summary.workers = workers
    window = 4 * workers  # bounded submission: the driver never holds a million pending refs
    # start every worker (torch import + weights, seconds each) before the clock: startup, not throughput
    ts = time.perf_counter()
    warm = ray.remote(num_cpus=threads, num_gpus=gpus_per_task, max_retries=max_retries, runtime_env=env)(_warm)
    ray.get([warm.remote(fc) for _ in range(min(workers, len(shards)))])
    summary.startup_s += time.perf_counter() - ts
    pending: dict = {}
    nxt, finished = 0, 0
    t0 = time.perf_counter()
    while pending or nxt < len(shards):
        while nxt < len(shards) and len(pending) < window:
            pending[task.remote(shards[nxt], pc, fc)] = nxt
            nxt += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                results = ray.get(ref)
            except ray.exceptions.RayError as e:  # retries exhausted: report the shard, keep going
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                results = [{"image_id": r.image_id, "error": f"{r.path}: task failed after {max_retries} retries: {msg}",
                            "regions": 0, "cached": False, "seconds": 0.0} for r, _ in shards[i]]
            for res in results:
                if not res["error"] and res.get("feature_dir") != expected:
                    res["error"] = (f"{res['image_id']}: a worker wrote its features to {res.get('feature_dir')}, the driver "
                                    f"reads {expected}: the workers run another rcnn version (install the same on every node)")
                if res["error"]:
                    summary.failed.append(res["error"])
                elif res["cached"]:
                    summary.cached += 1
                else:
                    summary.computed += 1
                    summary.regions += res["regions"]
            finished += len(results)
            rate = summary.regions / max(time.perf_counter() - t0, 1e-9)
            report(progress, f"features on Ray ({workers} workers)", finished, len(records), f"{rate:.1f} regions/s")


# ----------------------------------------------------------------------------- public API


def extract_dataset(
    dataset: Dataset,
    proposal_config=None,
    feature_config=None,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    images_per_task: int = 1,
    threads_per_task: int = 1,
    max_retries: int = 3,
    progress: ProgressFn | None = None,
    records: Sequence[ImageRecord] | None = None,
    gpus_per_task: float = 0.0,
) -> EngineSummary:
    """Fill the proposal + feature caches of ``dataset`` (or ``records``) with ``engine``.

    ``workers``: local engine = proposal processes (default: cores); ray engine without
    ``address`` = CPUs of the local Ray instance (default 2). ``images_per_task``: shard size of
    a Ray task (1 is fine: a task costs ~ms, an image seconds). ``threads_per_task``: torch
    threads (and Ray CPUs) per task. ``gpus_per_task``: Ray GPUs per task (e.g. 0.25 shares a GPU
    between 4 tasks; not exercised here: no GPU machine). Afterwards :func:`rcnn.features.get_features` is a cache
    read for every image that did not fail, whichever engine filled it.
    """

    _check_engine(engine)
    pc = proposal_config or ProposalConfig()
    fc = feature_config or FeatureConfig()
    recs = list(dataset.records if records is None else records)
    if images_per_task < 1 or threads_per_task < 1:
        raise ValueError("images_per_task and threads_per_task must be >= 1")
    fc.backbone_obj()  # fail early (missing weights) before starting anything
    summary = EngineSummary(engine=engine, workers=workers or 0, images=len(recs))
    if engine == "local":
        t0 = time.perf_counter()
        ps = propose_dataset(dataset, pc, workers=workers, progress=progress, records=recs)
        sub = dataset if records is None else _subset(dataset, recs)
        fs = features_for_dataset(sub, pc, fc, progress=progress)
        summary.seconds = time.perf_counter() - t0
        summary.workers = ps.workers
        summary.computed, summary.cached, summary.regions = fs.computed, fs.cached, fs.regions
        summary.failed = list(dict.fromkeys(fs.failed + [m for _, m in ps.failed]))
    else:
        root = str(Path(dataset.root).resolve())
        with ray_session(address, workers) as startup:
            summary.startup_s = startup
            t0 = time.perf_counter()
            _ray_features(recs, root, pc, fc, summary, images_per_task, threads_per_task, max_retries, progress,
                          gpus_per_task)
            summary.seconds = time.perf_counter() - t0 - (summary.startup_s - startup)
    dirs = feature_dirs(pc, fc, dataset.root)
    summary.cache_dir = " + ".join(str(d) for d in dirs)
    summary.cache_mb = sum(dir_size_mb(d) for d in dirs)
    return summary


def extract_images(paths: Sequence[str | Path], proposal_config, feature_config, address: str | None = None,
                   workers: int | None = None, progress: ProgressFn | None = None,
                   ) -> tuple[dict[Path, ImageRecord], list[EngineSummary]]:
    """Fill the caches of loose image files on Ray (:func:`extract_dataset` with ``engine="ray"``,
    one dataset per folder, all in one Ray session). Returns ``{resolved path: ImageRecord}`` of
    the images that did not fail (their cache id is the file name: ``a.jpg`` and ``a.png`` of one
    folder stay apart) and one summary per folder (its ``failed``: one line per image)."""
    import numpy as np

    groups: dict[Path, list[ImageRecord]] = {}
    for p in paths:
        p = Path(p).resolve()
        e = np.zeros((0, 4), np.float32)
        groups.setdefault(p.parent, []).append(ImageRecord(p.name, p, 0, 0, e, np.zeros(0, np.int64), np.zeros(0, bool)))
    records: dict[Path, ImageRecord] = {}
    summaries = []
    with ray_session(address, workers):
        for parent, recs in groups.items():
            s = extract_dataset(Dataset(parent, None, [], recs), proposal_config, feature_config, engine="ray",
                                address=address, workers=workers, progress=progress)
            summaries.append(s)
            bad = {m.split(":", 1)[0] for m in s.failed}
            records.update({r.path: r for r in recs if str(r.path) not in bad})
    return records, summaries


def _subset(dataset: Dataset, records: Sequence[ImageRecord]) -> Dataset:
    from dataclasses import replace

    return replace(dataset, records=list(records))


__all__ = ["DEFAULT_RAY_CPUS", "ENGINES", "EngineSummary", "extract_dataset", "extract_images", "ray_available", "ray_session",
           "ray_task_overhead"]
