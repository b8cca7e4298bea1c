"""``--engine local|ray``, ``--address`` and ``--device`` of ``rcnn features``, ``rcnn detect`` and
``rcnn evaluate``: checks and console lines around :mod:`rcnn.distributed` and :mod:`rcnn.device`."""

from __future__ import annotations

from rcnn.cli.app import console, exits, fail, print_first
from rcnn.cli.progress import show_progress
from rcnn.distributed import ENGINES, EngineSummary, extract_dataset, extract_images


def check_engine(engine: str, address: str | None) -> None:
    """Exit with one line on a bad ``--engine`` / ``--address`` combination."""
    if engine not in ENGINES:
        raise fail(f"--engine must be one of {list(ENGINES)}, not {engine!r}", 2)
    if address and engine != "ray":
        raise fail("--address needs --engine ray", 2)


def _check_source(source) -> None:
    if not hasattr(source, "feature_config"):
        raise fail("--engine ray needs a CNN-feature model (HOG features are computed in this process)", 2)


def _print_ray(s: EngineSummary) -> None:
    console.print(f"ray: {s.workers} workers, startup {s.startup_s:.1f} s, {s.images_per_s:.2f} images/s", highlight=False)


def ray_extract(dataset, proposal_config, feature_config, address: str | None, workers: int | None,
                records=None, source=None) -> EngineSummary:
    """Fill the caches on Ray (progress bar on the driver), for the configurations given or those of a
    model's feature ``source``; a HOG source, a missing ``ray`` or an unreachable cluster exits with one line."""
    if source is not None:
        _check_source(source)
        proposal_config, feature_config = source.proposal_config, source.feature_config
    with exits(RuntimeError), show_progress() as progress:
        s = extract_dataset(dataset, proposal_config, feature_config, engine="ray", address=address,
                            workers=workers, progress=progress, records=records)
    _print_ray(s)
    return s


def report_device(device: str) -> str:
    """Resolve ``--device`` and say on the console which device runs the CNN and, after a
    fallback, why; returns the device string for :class:`rcnn.features.FeatureConfig`."""
    from rcnn.device import resolve_device

    with exits(ValueError, prefix="bad option: "):
        dev, why = resolve_device(device)
    if why and device != "auto":
        console.print(f"[yellow]--device {device}: not available ({why}); running on the CPU", highlight=False)
    else:
        console.print(f"device: cpu ({why})" if why else f"device: {dev}", highlight=False)
    return device


def ray_fill_images(paths, source, address: str | None, workers: int | None) -> dict:
    """``rcnn detect --engine ray``: :func:`rcnn.distributed.extract_images` with console lines.
    Returns ``{path: ImageRecord}`` for :class:`rcnn.sources.CachedRegions`; images that failed
    are left out (their errors are printed)."""
    _check_source(source)
    with exits(RuntimeError), show_progress() as progress:
        records, summaries = extract_images(paths, source.proposal_config, source.feature_config, address,
                                            workers, progress)
    for s in summaries:
        _print_ray(s)
    print_first([m for s in summaries for m in s.failed], "  [red]{}", limit=None, highlight=False, soft_wrap=True)
    return records
