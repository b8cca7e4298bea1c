"""``--engine local|ray`` and ``--address`` options shared by ``rcnn features`` and ``rcnn detect``
(a thin layer over :mod:`rcnn.distributed`)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from rcnn.cli.app import console, fail
from rcnn.cli.progress import show_progress
from rcnn.device import PRECISIONS
from rcnn.distributed import ENGINES, EngineSummary, extract_dataset

EngineOpt = Annotated[Literal[ENGINES], typer.Option(
    "--engine", help="Where proposals + features are computed (ray: Ray tasks writing into the same cache; "
    "without --address a local Ray instance)")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="ray: 'auto' (the cluster `ray start` made on this node) or HOST:PORT of a head node; "
    "RCNN_CACHE_DIR must be a path every node sees", show_default="a local Ray instance")]


def check_engine(engine: str, address: str | None) -> None:
    """Exit with one line on a bad ``--engine`` / ``--address`` combination."""
    if engine not in ENGINES:
        raise fail(f"--engine must be one of {list(ENGINES)}, not {engine!r}", 2)
    if address and engine != "ray":
        raise fail("--address needs --engine ray", 2)


def ray_extract(dataset, proposal_config, feature_config, address: str | None, workers: int | None,
                records=None) -> EngineSummary:
    """Fill the caches on Ray (progress bar on the driver); a missing ``ray`` or an unreachable
    cluster exits with one line."""
    try:
        with show_progress() as progress:
            s = extract_dataset(dataset, proposal_config, feature_config, engine="ray", address=address,
                                workers=workers, progress=progress, records=records)
    except RuntimeError as e:
        raise fail(str(e), 2) from None
    console.print(f"ray: {s.workers} workers, startup {s.startup_s:.1f} s, {s.images_per_s:.2f} images/s", highlight=False)
    return s


PrecisionOpt = Annotated[Literal[PRECISIONS], typer.Option(
    "--precision", help="CPU arithmetic of the CNN: fp32 (faithful) or bf16 (bfloat16 autocast, ~2x faster on "
    "AVX512-BF16/AMX CPUs)")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto, cpu, cuda or cuda:N for the CNN (auto: a CUDA GPU when torch sees one; float16 "
    "autocast and pinned-memory batches on CUDA)")]


def report_device(device: str) -> str:
    """Resolve ``--device`` and say on the console which device runs the CNN and, after a
    fallback, why; returns the device string for :class:`rcnn.features.FeatureConfig`."""
    from rcnn.device import resolve_device

    try:
        dev, why = resolve_device(device)
    except ValueError as e:
        raise fail(f"bad option: {e}", 2) from None
    if why and device != "auto":
        console.print(f"[yellow]--device {device}: not available ({why}); running on the CPU", highlight=False)
    elif why:
        console.print(f"device: cpu ({why})", highlight=False)
    else:
        console.print(f"device: {dev}", highlight=False)
    return device


def ray_fill_images(paths, source, address: str | None, workers: int | None) -> dict:
    """``rcnn detect --engine ray``: proposals + features of loose image files on Ray, into the
    cache (one dataset per folder, in one Ray session). Returns ``{path: ImageRecord}`` for
    :class:`rcnn.sources.CachedRegions`; images that failed are left out (their errors are printed)."""
    import numpy as np

    from rcnn.data import Dataset, ImageRecord
    from rcnn.distributed import ray_session

    if not hasattr(source, "feature_config"):
        raise fail("--engine ray needs a CNN-feature model (HOG features are computed in this process)", 2)
    groups: dict = {}
    for p in paths:
        p = p.resolve()
        e = np.zeros((0, 4), np.float32)
        # the file name (not the stem) is the cache id: a.jpg and a.png in one folder stay apart
        groups.setdefault(p.parent, []).append(ImageRecord(p.name, p, 0, 0, e, np.zeros(0, np.int64), np.zeros(0, bool)))
    records, failed = {}, []
    try:
        with ray_session(address, workers):
            for parent, recs in groups.items():
                ds = Dataset(parent, None, [], recs)
                s = ray_extract(ds, source.proposal_config, source.feature_config, address, workers)
                failed += s.failed
                bad = {m.split(":", 1)[0] for m in s.failed}
                records.update({r.path: r for r in recs if str(r.path) not in bad})
    except RuntimeError as e:
        raise fail(str(e), 2) from None
    for msg in failed:
        console.print(f"  [red]{msg}", highlight=False, soft_wrap=True)
    return records
