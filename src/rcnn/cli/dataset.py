"""``rcnn info`` and ``rcnn evaluate-dets``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from rcnn.cache import save_json
from rcnn.cli import options as opt
from rcnn.cli.app import app, console, fail, open_dataset
from rcnn.data import holdout_split
from rcnn.evaluate import coco_metrics, evaluate_detections, read_detections


def _class_counts(records) -> Counter:
    return Counter(int(c) for r in records for c in r.labels)


@app.command()
def info(
    dataset: opt.DatasetArg, split: opt.SplitOpt = None,
    val_fraction: Annotated[float | None, typer.Option(
        "--val-fraction", help="Also show the two parts of carving this fraction of the split's images out as "
        "validation data (a fixed choice by image id: what `rcnn train --val-fraction` holds out)", show_default="none")] = None,
) -> None:
    """Summarise a dataset: images, objects per class, difficult, degenerate boxes, sizes."""
    ds = open_dataset(dataset, split)
    parts = None
    if val_fraction is not None:
        try:
            parts = holdout_split(ds, val_fraction)
        except ValueError as e:
            raise fail(f"--val-fraction: {e}", 2) from None
    counts = _class_counts(ds.records)
    diff = Counter(int(c) for r in ds.records for c, d in zip(r.labels, r.difficult, strict=True) if d)
    masks = sum(len(r.boxes) for r in ds.records if r.mask_path is not None)
    t = Table(title=f"{dataset} ({ds.format}, split {split or 'all'})")
    t.add_column("class")
    t.add_column("objects", justify="right")
    t.add_column("difficult", justify="right")
    for p in parts or ():
        t.add_column(f"in {p.split}", justify="right")
    part_counts = [_class_counts(p.records) for p in parts or ()]
    for i, c in enumerate(ds.classes):
        t.add_row(c, str(counts.get(i, 0)), str(diff.get(i, 0)), *[str(pc.get(i, 0)) for pc in part_counts])
    t.add_row("[bold]total", f"[bold]{ds.num_objects}", f"[bold]{sum(diff.values())}",
              *[f"[bold]{p.num_objects}" for p in parts or ()])
    console.print(t)
    console.print(f"images: {len(ds)}")
    if parts:
        console.print(f"validation carve-out ({val_fraction:g} of the images, by hash of the image id): "
                      + "; ".join(f"{p.split} {len(p)} images, {p.num_objects} objects" for p in parts),
                      highlight=False, soft_wrap=True)
    console.print(
        f"objects in annotation files: {ds.annotated_objects}; usable: {ds.num_objects} "
        f"({ds.num_objects - sum(diff.values())} not difficult)"
    )
    if masks:
        nd = sum(int((~r.difficult).sum()) for r in ds.records if r.mask_path is not None)
        console.print(f"objects with instance masks: {masks} ({nd} not difficult)")
    if ds.records:
        w = np.array([r.width for r in ds.records])
        h = np.array([r.height for r in ds.records])
        console.print(f"image size: width {w.min()}–{w.max()}, height {h.min()}–{h.max()}")
    by_action = Counter(i.action for i in ds.issues)
    for action, n in sorted(by_action.items()):
        console.print(f"[yellow]{n} {action}[/]:")
        for issue in [i for i in ds.issues if i.action == action][:20]:
            console.print(f"  {issue}", highlight=False, soft_wrap=True)
        if n > 20:
            console.print(f"  … and {n - 20} more")


@app.command("evaluate-dets")
def evaluate_dets(
    detections: Annotated[Path, typer.Argument(help="COCO results .json, or a comp4_det_*.txt file or folder")],
    dataset: Annotated[Path, typer.Argument(help="Dataset with the ground truth (VOC or PASCAL v1.00 layout) "
                                            "or COCO .json")],
    split: opt.SplitOpt = None, metric: opt.MetricOpt = "voc07",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the results JSON here",
                                                show_default="not written")] = None,
) -> None:
    """Score detections against a dataset exactly as the PASCAL VOC devkit would, plus COCO's
    mAP@[.5:.95], AP50, AP75 and APs/APm/APl (pycocotools)."""
    ds = open_dataset(dataset, split)
    try:
        dets = read_detections(detections, ds)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), 2) from None
    result = evaluate_detections(ds, dets, metric)
    coco = coco_metrics(ds, dets)
    print_ap_table(result, title=f"{detections} on {dataset} ({split or 'all'}, {metric})")
    console.print(coco.line(), highlight=False)
    if output:
        save_json(output, {**result.as_dict(), "coco": coco.as_dict()})
        console.print(f"wrote {output}")


def print_ap_table(result, title: str = "") -> None:
    """Per-class AP table with mAP as the last row."""
    t = Table(title=title)
    t.add_column("class")
    t.add_column("AP", justify="right")
    t.add_column("positives", justify="right")
    t.add_column("detections", justify="right")
    for c in result.classes:
        t.add_row(c.name, "undefined" if np.isnan(c.ap) else f"{c.ap:.4f}", str(c.npos), str(c.num_dets))
    t.add_row("[bold]mAP", f"[bold]{result.mean_ap:.4f}", "", "")
    console.print(t)
