"""``rcnn fp-analysis``, ``rcnn sensitivity``, ``rcnn show-warps``, ``rcnn units`` and
``rcnn report``: understanding a detector (paper §3.1, §3.3, Figures 2–6)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import typer

from rcnn.cli import options as opt
from rcnn.cli.app import app, console, exits, log_to_console, open_dataset, print_table
from rcnn.cli.progress import show_progress
from rcnn.features import MODES as FEATURE_MODES


def detections_for(path: Path, ds):
    """:func:`rcnn.analysis.detections.detections_of` with a progress bar, or exit with its one line."""
    from rcnn.analysis.detections import detections_of

    with exits(FileNotFoundError, ValueError), show_progress() as progress:
        return detections_of(path, ds, progress=progress)


@contextmanager
def _units_errors(*errors: type[Exception]):
    r"""A bad ``--units`` spec (:class:`rcnn.analysis.units.UnitsError`) as ``error: --units: …``; other
    ``ValueError``\ s (and ``errors``) as their one line."""
    from rcnn.analysis.units import UnitsError

    with exits(ValueError, *errors), exits(UnitsError, prefix="--units: "):
        yield


def _groups(group: list[str] | None, no_voc_groups: bool) -> dict[str, tuple[str, ...]] | None:
    from rcnn.analysis.fp import parse_groups

    with exits(ValueError):
        return parse_groups(group, not no_voc_groups)


@app.command("fp-analysis")
def fp_analysis_cmd(
    detections: opt.ModelOrDetsArg, dataset: opt.DatasetArg, split: opt.SplitOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for fp_types.png, dap.png, fp_analysis.json")] = Path("fp_analysis"),
    group: opt.GroupOpt = None, no_voc_groups: opt.NoVocOpt = False, metric: opt.FpMetricOpt = "voc07",
) -> None:
    """False-positive analysis (paper §3.3, Figure 4): Loc/Sim/Oth/BG per class and dAP per error type."""
    from rcnn.analysis.fp import FP_TYPES, analyze_false_positives, write_fp_analysis

    ds = open_dataset(dataset, split)
    dets, _ = detections_for(detections, ds)
    groups = _groups(group, no_voc_groups)
    with exits(ValueError):
        fa = analyze_false_positives(ds.classes, ds.records, dets, groups=groups, metric=metric)
    paths = write_fp_analysis(fa, output)
    md = fa.mean_dap()
    print_table(f"False positives ({metric} AP)", ["class", "AP", *FP_TYPES, *[f"dAP {x}" for x in FP_TYPES]], [
        *[(c.name, f"{c.ap:.3f}", *[str(c.counts()[x]) for x in FP_TYPES], *[f"{100 * c.dap[x]:+.1f}" for x in FP_TYPES])
          for c in fa.per_class],
        ("[bold]mean", f"[bold]{fa.mean_ap:.3f}", *[""] * 4, *[f"{100 * md[x]:+.1f}" for x in FP_TYPES])], left=0)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")


@app.command("sensitivity")
def sensitivity_cmd(
    dataset: opt.DatasetArg,
    models: Annotated[list[str], typer.Argument(help="NAME=PATH or PATH of model files or detections, one panel each")],
    split: opt.SplitOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for sensitivity.png and sensitivity.json")] = Path("sensitivity"),
    normalized_count: Annotated[float | None, typer.Option(help="N of the normalized precision (Hoiem et al.)",
                                                           show_default="0.15 × images")] = None,
) -> None:
    """Sensitivity to object characteristics (paper Figure 5): normalized AP of the lowest and highest subsets."""
    from rcnn.analysis.detections import named
    from rcnn.analysis.sensitivity import sensitivity, write_sensitivity

    ds = open_dataset(dataset, split)
    results = []
    for name, path in map(named, models):
        dets, _ = detections_for(path, ds)
        results.append(sensitivity(ds.classes, ds.records, dets, model=name, normalized_count=normalized_count))
    png = write_sensitivity(results, output)
    for r in results:
        console.print(f"[bold]{r.model}[/]: overall normalized AP {r.overall:.3f} (N = {r.normalized_count:g})")
        for c in r.characteristics:
            lo_n, lo, hi_n, hi = r.extremes(c)
            console.print(f"  {c}: lowest {lo_n} {lo:.3f}, highest {hi_n} {hi:.3f}")
    console.print(f"wrote {png}")


@app.command("show-warps")
def show_warps_cmd(
    dataset: opt.DatasetArg, class_name: Annotated[str, typer.Option("--class", "-c", help="Class to show")],
    split: opt.SplitOpt = None, n: Annotated[int, typer.Option("--regions", "-n", help="Number of regions")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed of the sample")] = 0,
    model: Annotated[str, typer.Option("--model", help="Model file or backbone name giving the warp settings")] = "squeezenet1_1",
    weights: opt.UnitWeightsOpt = None,
    with_proposals: Annotated[bool, typer.Option("--with-proposals/--gt-only", help="Also proposals with IoU >= 0.5 "
                                            "(fine-tuning positives)")] = False,
    output: opt.PngOpt = Path("warps.png"),
) -> None:
    """Warped training regions of a class exactly as the feature extractor sees them (paper Figure 2)."""
    from rcnn.analysis.units import feature_settings
    from rcnn.analysis.warps import show_warps

    ds = open_dataset(dataset, split)
    with exits(ValueError):
        fc, pc, _ = feature_settings(model, weights)
        caption = show_warps(ds, class_name, n, seed, fc, pc if with_proposals else None, output)
    console.print(f"wrote {output} ({caption})")


@app.command("units")
def units_cmd(
    model_or_backbone: Annotated[str, typer.Argument(help="Model file (.rcnn) or backbone name (squeezenet1_1, …)")],
    dataset: opt.DatasetArg,
    units: Annotated[str, typer.Option("--units", "-u", help="'auto' or units 'y,x,channel; …' / flat indices")] = "auto",
    split: opt.SplitOpt = None, top: Annotated[int, typer.Option(help="Regions per unit (paper: 16)")] = 16,
    max_images: Annotated[int | None, typer.Option(help="Only the first N images of the split",
                                                   show_default="all")] = None,
    weights: opt.UnitWeightsOpt = None,
    mode: Annotated[Literal[FEATURE_MODES] | None, typer.Option(
        "--mode", "-m", help="Region features: warp (the paper's) or shared",
        show_default="the model's; warp for a backbone")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Store pool5 features in the feature cache (large)")] = False,
    output: opt.PngOpt = Path("units.png"),
) -> None:
    """Top activations of pool5 units with their receptive fields (paper §3.1, Figures 3 and 6)."""
    from rcnn.analysis.units import run_units

    ds = open_dataset(dataset, split)
    with _units_errors(), show_progress() as progress:
        path, us, hits = run_units(model_or_backbone, ds, units, output, top, max_images, weights, mode, cache, progress)
    for u, h in ((u, hits[u]) for u in us):
        console.print(f"unit {u.label()}: top {len(h)} activations {', '.join(f'{x.score:.1f}' for x in h[:8])}{' …' if len(h) > 8 else ''}")
    console.print(f"wrote {path}")


@app.command("report")
def report_cmd(
    model: opt.ModelOrDetsArg, dataset: opt.DatasetArg,
    split: Annotated[str, typer.Option("--split", "-s", help="Split name (ImageSets/Main/<split>.txt)")] = "test",
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder (index.html + PNGs)")] = Path("report"),
    compare: Annotated[list[str] | None, typer.Option(help="NAME=PATH or PATH of another model/detections for the "
                                                      "sensitivity plot (repeatable)", show_default="none")] = None,
    units: Annotated[str, typer.Option("--units", "-u", help="'auto', 'none' or 'y,x,channel; …'")] = "auto",
    unit_images: Annotated[int, typer.Option(help="Images of the split searched for unit activations")] = 20,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help="Backbone for unit grids when MODEL is a "
                                                 "detections file", show_default="none: no unit grids")] = None,
    group: opt.GroupOpt = None, no_voc_groups: opt.NoVocOpt = False, metric: opt.MetricOpt = "voc07",
    samples: Annotated[int, typer.Option(help="Best and worst images shown")] = 4,
) -> None:
    """One self-contained HTML report: AP table, PR curves, best/worst detections, FP analysis, sensitivity, unit grids.

    An unreadable image is left out (one warning line); the rest of the report is written."""
    from rcnn.analysis.report import report_for

    ds = open_dataset(dataset, split)
    groups = _groups(group, no_voc_groups)
    # library warnings (e.g. truncated JPEGs, undrawable images) one line each; the detector's read
    # errors are reported by the report as "left out" warnings
    with log_to_console("rcnn.analysis.report", "rcnn.data"), log_to_console("rcnn.detect", errors=None), \
            _units_errors(FileNotFoundError), show_progress() as progress:
        path = report_for(model, ds, output, compare or [], units, unit_images, backbone, groups, metric, samples, progress)
    console.print(f"wrote {path}")
