"""``rcnn fp-analysis``, ``rcnn sensitivity``, ``rcnn show-warps``, ``rcnn units`` and
``rcnn report``: understanding a detector (paper §3.1, §3.3, Figures 2–6)."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer

from rcnn.cli.app import app, console, err_console, fail, load_model
from rcnn.cli.dataset import DatasetArg, MetricOpt, SplitOpt, open_dataset
from rcnn.cli.progress import show_progress, track
from rcnn.data import Dataset
from rcnn.evaluate import METRICS, Detections, read_detections
from rcnn.features import MODES as FEATURE_MODES

MODEL_SUFFIXES = (".rcnn", ".safetensors")


class _ConsoleWarnings(logging.Handler):
    def __init__(self, errors: bool) -> None:
        super().__init__(logging.WARNING)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR and not self.errors:
            return
        tag = "[red]error:[/]" if record.levelno >= logging.ERROR else "[yellow]warning:[/]"
        err_console.print(f"{tag} {record.getMessage()}", highlight=False, soft_wrap=True)


@contextmanager
def _warnings_to_console(*loggers: str, errors: bool = True):
    """Library warnings of ``loggers`` as one console line each, for the duration of a call;
    ``errors=False`` drops their errors (the caller reports those itself)."""
    handler = _ConsoleWarnings(errors)
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)


def _is_model(path: Path) -> bool:
    # detections are COCO .json or comp4 .txt files (or a folder of them); any other file is
    # read as a model (`rcnn train` writes .rcnn) and RCNNModel.load names the file if it is not
    return path.is_file() and path.suffix.lower() not in (".json", ".txt")


def detections_for(path: Path, ds: Dataset, stats=None) -> tuple[Detections, object | None]:
    """Detections of a model file (run over ``ds`` from the caches; ``stats``, a
    :class:`rcnn.detect.DetectStats`, collects the images it could not read) or read from a
    COCO results JSON / comp4 file(s); labels index ``ds.classes``."""
    if not path.exists():
        raise fail(f"{path}: no such model or detections file", 2)
    if _is_model(path):
        from rcnn.detect import detect_dataset

        model = load_model(path)
        with show_progress() as progress:
            dets = detect_dataset(model, ds, progress=progress, stats=stats)
        index = {c: i for i, c in enumerate(ds.classes)}
        remap = np.array([index.get(c, -1) for c in model.classes], np.int64)
        if len(dets):
            lab = remap[dets.labels]
            keep = lab >= 0
            dets = Detections(dets.image_ids[keep], dets.boxes[keep], dets.scores[keep], lab[keep])
        return dets, model
    try:
        return read_detections(path, ds), None
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), 2) from None


def _groups(group: list[str] | None, no_voc_groups: bool) -> dict[str, tuple[str, ...]] | None:
    if not group:
        return {} if no_voc_groups else None
    out = {}
    for g in group:
        if "=" not in g:
            raise fail(f"--group {g!r}: write NAME=class1,class2", 2)
        name, members = g.split("=", 1)
        out[name.strip()] = tuple(m.strip() for m in members.split(",") if m.strip())
    return out


def _named(spec: str) -> tuple[str, Path]:
    if "=" in spec and not Path(spec).exists():
        name, p = spec.split("=", 1)
        return name, Path(p)
    return Path(spec).stem, Path(spec)


GroupOpt = Annotated[list[str] | None, typer.Option("--group", "-g", help="Similar-class group NAME=a,b,c (repeatable)",
                                                   show_default="VOC's animals, vehicles, furniture")]
NoVocOpt = Annotated[bool, typer.Option("--no-voc-groups", help="No built-in groups (no Sim errors)")]
FpMetricOpt = Annotated[Literal[(*METRICS, "coco101")], typer.Option(
    "--metric", help="AP metric: the VOC devkit's (voc07, voc2010) or TIDE's 101-point (coco101)")]


@app.command("fp-analysis")
def fp_analysis_cmd(
    detections: Annotated[Path, typer.Argument(help="Model file (.rcnn) or detections (COCO .json / comp4 files)")],
    dataset: DatasetArg,
    split: SplitOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for fp_types.png, dap.png, fp_analysis.json")] = Path("fp_analysis"),
    group: GroupOpt = None,
    no_voc_groups: NoVocOpt = False,
    metric: FpMetricOpt = "voc07",
) -> None:
    """False-positive analysis (paper §3.3, Figure 4): Loc/Sim/Oth/BG per class and dAP per error type."""
    from rich.table import Table

    from rcnn.analysis.fp import FP_TYPES, analyze_false_positives, dap_figure, fp_figure

    ds = open_dataset(dataset, split)
    dets, _ = detections_for(detections, ds)
    try:
        fa = analyze_false_positives(ds.classes, ds.records, dets, groups=_groups(group, no_voc_groups), metric=metric)
    except ValueError as e:
        raise fail(str(e), 2) from None
    output.mkdir(parents=True, exist_ok=True)
    fp_figure(fa, output / "fp_types.png")
    dap_figure(fa, output / "dap.png")
    (output / "fp_analysis.json").write_text(json.dumps(fa.as_dict(), indent=1))
    t = Table(title=f"False positives ({metric} AP)")
    for col in ("class", "AP", *FP_TYPES, *[f"dAP {x}" for x in FP_TYPES]):
        t.add_column(col, justify="right")
    for c in fa.per_class:
        n = c.counts()
        t.add_row(c.name, f"{c.ap:.3f}", *[str(n[x]) for x in FP_TYPES], *[f"{100 * c.dap[x]:+.1f}" for x in FP_TYPES])
    md = fa.mean_dap()
    t.add_row("[bold]mean", f"[bold]{fa.mean_ap:.3f}", *[""] * 4, *[f"{100 * md[x]:+.1f}" for x in FP_TYPES])
    console.print(t)
    console.print(f"wrote {output / 'fp_types.png'}, {output / 'dap.png'}, {output / 'fp_analysis.json'}")


@app.command("sensitivity")
def sensitivity_cmd(
    dataset: DatasetArg,
    models: Annotated[list[str], typer.Argument(help="NAME=PATH or PATH of model files or detections, one panel each")],
    split: SplitOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for sensitivity.png and sensitivity.json")] = Path("sensitivity"),
    normalized_count: Annotated[float | None, typer.Option(help="N of the normalized precision (Hoiem et al.)",
                                                           show_default="0.15 × images")] = None,
) -> None:
    """Sensitivity to object characteristics (paper Figure 5): normalized AP of the lowest and highest subsets."""
    from rcnn.analysis.sensitivity import sensitivity, sensitivity_figure, subsets_figure

    ds = open_dataset(dataset, split)
    results = []
    for spec in models:
        name, path = _named(spec)
        dets, _ = detections_for(path, ds)
        results.append(sensitivity(ds.classes, ds.records, dets, model=name, normalized_count=normalized_count))
    output.mkdir(parents=True, exist_ok=True)
    sensitivity_figure(results, output / "sensitivity.png")
    for r in results:
        if r.characteristics:
            subsets_figure(r, output / f"sensitivity_subsets_{r.model}.png")
        console.print(f"[bold]{r.model}[/]: overall normalized AP {r.overall:.3f} (N = {r.normalized_count:g})")
        for c in r.characteristics:
            lo_n, lo, hi_n, hi = r.extremes(c)
            console.print(f"  {c}: lowest {lo_n} {lo:.3f}, highest {hi_n} {hi:.3f}")
    (output / "sensitivity.json").write_text(json.dumps([r.as_dict() for r in results], indent=1))
    console.print(f"wrote {output / 'sensitivity.png'}")


def _feature_settings(model_or_backbone: str, weights: str | None, mode: str | None):
    """(FeatureConfig, ProposalConfig, model or None) from a model file or a backbone name."""
    from dataclasses import replace

    from rcnn.features import FeatureConfig
    from rcnn.proposals import ProposalConfig

    p = Path(model_or_backbone)
    if _is_model(p):
        from rcnn.detect import HOG_BACKBONE, CNNFeatures

        model = load_model(p)
        if model.backbone == HOG_BACKBONE:
            raise fail(f"{p}: a HOG model has no CNN units to visualise", 2)
        fc = CNNFeatures.from_options(model.proposal_config(), model.feature_options).feature_config
        if mode:
            fc = replace(fc, mode=mode)
        return fc, model.proposal_config(), model
    if p.exists():
        raise fail(f"{p}: not a model file (a folder or a detections file; expected e.g. {MODEL_SUFFIXES[0]})", 2)
    try:
        fc = FeatureConfig(backbone=model_or_backbone, weights=weights, mode=mode or "warp")
        fc.backbone_obj()
    except Exception as e:
        raise fail(f"{model_or_backbone}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", 2) from None
    return fc, ProposalConfig(), None


@app.command("show-warps")
def show_warps_cmd(
    dataset: DatasetArg,
    class_name: Annotated[str, typer.Option("--class", "-c", help="Class to show")],
    split: SplitOpt = None,
    n: Annotated[int, typer.Option("--regions", "-n", help="Number of regions")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed of the sample")] = 0,
    model: Annotated[str, typer.Option("--model", help="Model file or backbone name giving the warp settings")] = "squeezenet1_1",
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="Backbone weights file (torchvision backbones)",
                                                show_default="built-in")] = None,
    with_proposals: Annotated[bool, typer.Option("--with-proposals/--gt-only", help="Also proposals with IoU >= 0.5 "
                                            "(fine-tuning positives)")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write")] = Path("warps.png"),
) -> None:
    """Warped training regions of a class exactly as the feature extractor sees them (paper Figure 2)."""
    from rcnn.analysis.warps import sample_regions, warp_samples, warps_figure

    ds = open_dataset(dataset, split)
    fc, pc, _ = _feature_settings(model, weights, None)
    bb = fc.backbone_obj()
    try:
        samples = sample_regions(ds, class_name, n, seed, pc if with_proposals else None)
    except ValueError as e:
        raise fail(str(e), 2) from None
    crops = warp_samples(samples, bb.input_size, fc.context_pad, fc.method, bb.mean_rgb(), bb.interpolation)
    caption = (f"{len(crops)} random {'ground-truth and proposal' if with_proposals else 'ground-truth'} regions from "
               f"{len({r.image_id for r, _ in samples})} images, {fc.method} to {bb.input_size}×{bb.input_size}, "
               f"context {fc.context_pad} px ({bb.name})")
    warps_figure(crops, output, f"Warped training samples: {class_name}", caption)
    console.print(f"wrote {output} ({caption})")


def run_units(
    model_or_backbone: str, ds: Dataset, units_spec: str, out_path: Path, top: int, max_images: int | None,
    weights: str | None = None, mode: str | None = None, cache: bool = False,
):
    """Shared by ``rcnn units`` and ``rcnn report``: returns (PNG path, units, hits)."""
    from rcnn.analysis.units import auto_units, backbone_units_by_max, parse_units, pool5_source, render_units

    fc, pc, model = _feature_settings(model_or_backbone, weights, mode)
    fc, bb, features = pool5_source(fc, pc, ds.root, cache)
    recs = ds.records[:max_images] if max_images else ds.records
    grid = fc.grid
    if units_spec == "auto":
        if model is not None:
            try:
                units = auto_units(model, bb, grid)
            except ValueError as e:
                raise fail(str(e), 2) from None
        else:
            units = backbone_units_by_max(track(recs, "finding the most active units"), features, grid)
    else:
        try:
            units = parse_units(units_spec, grid)
        except ValueError as e:
            raise fail(f"--units: {e}", 2) from None
    channels = bb.dim("pool5", grid) // (grid * grid)
    bad = [u.label() for u in units if u.channel >= channels]
    if bad:
        raise fail(f"--units: {bad} outside the {channels} channels of {bb.name}'s pool5", 2)
    with show_progress() as progress:
        path, hits = render_units(recs, features, units, bb, fc, out_path, k=top, progress=progress,
                                  title=f"Top activations of pool5 units — {bb.name}, {fc.mode} mode, {len(recs)} images")
    return path, units, hits


@app.command("units")
def units_cmd(
    model_or_backbone: Annotated[str, typer.Argument(help="Model file (.rcnn) or backbone name (squeezenet1_1, …)")],
    dataset: DatasetArg,
    units: Annotated[str, typer.Option("--units", "-u", help="'auto' or units 'y,x,channel; …' / flat indices")] = "auto",
    split: SplitOpt = None,
    top: Annotated[int, typer.Option(help="Regions per unit (paper: 16)")] = 16,
    max_images: Annotated[int | None, typer.Option(help="Only the first N images of the split",
                                                   show_default="all")] = None,
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="Backbone weights file (torchvision backbones)",
                                                show_default="built-in")] = None,
    mode: Annotated[Literal[FEATURE_MODES] | None, typer.Option(
        "--mode", "-m", help="Region features: warp (the paper's) or shared",
        show_default="the model's; warp for a backbone")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Store pool5 features in the feature cache (large)")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write")] = Path("units.png"),
) -> None:
    """Top activations of pool5 units with their receptive fields (paper §3.1, Figures 3 and 6)."""
    ds = open_dataset(dataset, split)
    path, us, hits = run_units(model_or_backbone, ds, units, output, top, max_images, weights, mode, cache)
    for u in us:
        h = hits[u]
        console.print(f"unit {u.label()}: top {len(h)} activations {', '.join(f'{x.score:.1f}' for x in h[:8])}{' …' if len(h) > 8 else ''}")
    console.print(f"wrote {path}")


@app.command("report")
def report_cmd(
    model: Annotated[Path, typer.Argument(help="Model file (.rcnn) or detections (COCO .json / comp4 files)")],
    dataset: DatasetArg,
    split: Annotated[str, typer.Option("--split", "-s", help="Split name (ImageSets/Main/<split>.txt)")] = "test",
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder (index.html + PNGs)")] = Path("report"),
    compare: Annotated[list[str] | None, typer.Option(help="NAME=PATH or PATH of another model/detections for the "
                                                      "sensitivity plot (repeatable)", show_default="none")] = None,
    units: Annotated[str, typer.Option("--units", "-u", help="'auto', 'none' or 'y,x,channel; …'")] = "auto",
    unit_images: Annotated[int, typer.Option(help="Images of the split searched for unit activations")] = 20,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help="Backbone for unit grids when MODEL is a "
                                                 "detections file", show_default="none: no unit grids")] = None,
    group: GroupOpt = None,
    no_voc_groups: NoVocOpt = False,
    metric: MetricOpt = "voc07",
    samples: Annotated[int, typer.Option(help="Best and worst images shown")] = 4,
) -> None:
    """One self-contained HTML report: AP table, PR curves, best/worst detections, FP analysis, sensitivity, unit grids.

    An unreadable image is left out (one warning line); the rest of the report is written."""
    from rcnn.analysis.report import ReportInputs, write_report

    ds = open_dataset(dataset, split)
    with _warnings_to_console("rcnn.analysis.report", "rcnn.data"):  # e.g. truncated JPEGs, undrawable images
        ds, dets, m, skipped = _report_detections(model, ds)
        others = []
        for spec in compare or []:
            name, path = _named(spec)
            others.append((name, detections_for(path, ds)[0]))
        output.mkdir(parents=True, exist_ok=True)
        notes = [f"Detections: {model} ({len(dets)} boxes)."]
        unit_grids = []
        source = str(model) if m is not None else backbone
        if units != "none" and source:
            recs = _readable(ds.records[:unit_images] if unit_images else ds.records, skipped)
            path, us, _ = run_units(source, replace(ds, records=recs), units, output / "units.png", 16, None)
            unit_grids.append((f"Top 16 activations of {len(us)} pool5 units over {len(recs)} images", path))
        elif units != "none":
            notes.append("No unit grids: MODEL is a detections file; pass --backbone to add them.")
        try:
            path = write_report(ReportInputs(model.stem, ds, dets, metric, _groups(group, no_voc_groups), others,
                                             unit_grids, notes, samples, skipped), output)
        except ValueError as e:
            raise fail(str(e), 2) from None
    console.print(f"wrote {path}")


def _report_detections(model: Path, ds: Dataset) -> tuple[Dataset, Detections, object | None, dict[str, str]]:
    """``rcnn report``'s detections; images a model cannot read are left out of the dataset
    (as ``rcnn evaluate`` does: not counted as misses), each with one warning line, and
    returned as ``{image id: reason}``."""
    from rcnn.detect import DetectStats

    stats = DetectStats()
    with _warnings_to_console("rcnn.detect", errors=False):  # its read errors: one line each below
        dets, m = detections_for(model, ds, stats)
    skipped: dict[str, str] = {}
    for r in ds.records:
        msg = next((f for f in stats.failed if f.startswith(f"{r.path}:")), None)
        if msg is not None:
            skipped[r.image_id] = msg
            err_console.print(f"[yellow]warning:[/] {msg}; left out of the report", highlight=False, soft_wrap=True)
    if skipped:
        ds = replace(ds, records=[r for r in ds.records if r.image_id not in skipped])
    return ds, dets, m, skipped


def _readable(records: list, skipped: dict[str, str]) -> list:
    """The records whose image can be read; the others are added to ``skipped`` with one warning line."""
    from rcnn.data import ImageReadError, load_image

    out = []
    for r in records:
        try:
            load_image(r.path)
            out.append(r)
        except ImageReadError as e:
            skipped[r.image_id] = str(e)
            err_console.print(f"[yellow]warning:[/] {e}; left out of the unit grids and pictures",
                              highlight=False, soft_wrap=True)
    return out
