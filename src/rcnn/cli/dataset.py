"""``rcnn info`` and ``rcnn evaluate-dets``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from rcnn.cache import save_json
from rcnn.cli import options as opt
from rcnn.cli.app import app, console, exits, open_dataset, print_first, print_table
from rcnn.data import summarize
from rcnn.evaluate import coco_metrics, evaluate_detections, read_detections


@app.command()
def info(
    dataset: opt.DatasetArg, split: opt.SplitOpt = None,
    val_fraction: Annotated[float | None, typer.Option(
        "--val-fraction", help="Also show the two parts of carving this fraction of the split's images out as "
        "validation data (a fixed choice by image id: what `rcnn train --val-fraction` holds out)", show_default="none")] = None,
) -> None:
    """Summarise a dataset: images, objects per class, difficult, degenerate boxes, sizes."""
    ds = open_dataset(dataset, split)
    with exits(ValueError, prefix="--val-fraction: "):
        s = summarize(ds, val_fraction)
    rows = [(c, str(s.objects[i]), str(s.difficult[i]), *[str(p[i]) for p in s.part_objects]) for i, c in enumerate(ds.classes)]
    total = ("[bold]total", f"[bold]{ds.num_objects}", f"[bold]{sum(s.difficult)}", *[f"[bold]{p.num_objects}" for p in s.parts])
    print_table(f"{dataset} ({ds.format}, split {split or 'all'})", ["class", "objects", "difficult",
                *[f"in {p.split}" for p in s.parts]], [*rows, total])
    console.print(f"images: {len(ds)}")
    if s.parts:
        console.print(f"validation carve-out ({val_fraction:g} of the images, by hash of the image id): "
                      + "; ".join(f"{p.split} {len(p)} images, {p.num_objects} objects" for p in s.parts),
                      highlight=False, soft_wrap=True)
    console.print(f"objects in annotation files: {ds.annotated_objects}; usable: {ds.num_objects} "
                  f"({ds.num_objects - sum(s.difficult)} not difficult)")
    if s.masked:
        console.print(f"objects with instance masks: {s.masked} ({s.masked_not_difficult} not difficult)")
    if s.width:
        console.print(f"image size: width {s.width[0]}–{s.width[1]}, height {s.height[0]}–{s.height[1]}")
    for action, n in sorted(Counter(i.action for i in ds.issues).items()):
        console.print(f"[yellow]{n} {action}[/]:")
        print_first([i for i in ds.issues if i.action == action], "  {}", "  … and {} more", highlight=False, soft_wrap=True)


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
    with exits(FileNotFoundError, ValueError):
        dets = read_detections(detections, ds)
    result, coco = evaluate_detections(ds, dets, metric), coco_metrics(ds, dets)
    print_ap_table(result, title=f"{detections} on {dataset} ({split or 'all'}, {metric})")
    console.print(coco.line(), highlight=False)
    if output:
        save_json(output, {**result.as_dict(), "coco": coco.as_dict()})
        console.print(f"wrote {output}")


def print_ap_table(result, title: str = "") -> None:
    """Per-class AP table with mAP as the last row."""
    print_table(title, ["class", "AP", "positives", "detections"], [
        *[(c.name, "undefined" if np.isnan(c.ap) else f"{c.ap:.4f}", str(c.npos), str(c.num_dets)) for c in result.classes],
        ("[bold]mAP", f"[bold]{result.mean_ap:.4f}", "", "")])
