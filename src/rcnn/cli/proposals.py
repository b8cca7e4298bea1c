"""``rcnn propose`` and ``rcnn proposals-recall``: fill the proposal cache, measure its recall."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcnn.cli import options as opt
from rcnn.cli.app import app, console, fail, open_dataset, print_first, print_table
from rcnn.cli.progress import show_progress
from rcnn.proposals import dataset_recall, propose_dataset


@app.command()
def propose(
    dataset: opt.DatasetArg, split: opt.SplitOpt = None, proposals: opt.ProposalsOpt = "rcnn-fast", ks: opt.KsOpt = None,
    workers: opt.WorkersOpt = None, max_boxes: opt.MaxBoxesOpt = None, min_size: opt.MinSizeOpt = None,
    resize_width: opt.WidthOpt = None, upscale: opt.UpscaleOpt = False,
) -> None:
    """Compute selective-search proposals for every image into the cache (parallel, resumable)."""
    ds = open_dataset(dataset, split)
    cfg = opt.make_config(proposals, ks, max_boxes, min_size, resize_width, upscale)
    console.print(f"{len(ds)} images, {cfg.describe()}", highlight=False)
    with show_progress() as progress:
        s = propose_dataset(ds, cfg, workers=workers, progress=progress)
    rate = f", {s.computed / s.seconds:.2f} img/s" if s.computed and s.seconds > 0 else ""
    console.print(f"computed {s.computed}, reused {s.cached} from the cache, failed {len(s.failed)} "
                  f"in {s.seconds:.1f} s{rate} ({s.workers} workers); {s.mean_boxes:.0f} boxes/img", highlight=False)
    console.print(f"cache: {s.cache_dir} ({s.cache_mb:.1f} MB)", highlight=False)
    if s.failed:
        print_first([msg for _, msg in s.failed], "  [red]{}", highlight=False, soft_wrap=True)
        raise fail(f"{len(s.failed)} of {s.images} images failed; the rest are cached", 1)


@app.command("proposals-recall")
def proposals_recall(
    dataset: opt.DatasetArg, split: opt.SplitOpt = None, proposals: opt.ProposalsOpt = "rcnn-fast", ks: opt.KsOpt = None,
    workers: opt.WorkersOpt = None, max_boxes: opt.MaxBoxesOpt = None, min_size: opt.MinSizeOpt = None,
    resize_width: opt.WidthOpt = None, upscale: opt.UpscaleOpt = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON path",
                                                show_default="proposals-recall-<split>.json")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG path", show_default="the JSON path with .png")] = None,
) -> None:
    """Recall@0.5/0.7 and MABO of the proposals (non-difficult objects), plus a recall-vs-#proposals plot."""
    ds = open_dataset(dataset, split)
    cfg = opt.make_config(proposals, ks, max_boxes, min_size, resize_width, upscale)
    out = output or Path(f"proposals-recall-{split or 'all'}.json")
    png = plot or out.with_suffix(".png")
    with show_progress() as progress:
        s, res = dataset_recall(ds, cfg, out, png, {"dataset": str(dataset), "split": split},
                                f"{Path(dataset).name} {split or ''}", workers, progress)
    print_table(f"{dataset} ({split or 'all'}): {cfg.describe()}", ["class", "objects", "recall@0.5", "recall@0.7", "ABO"], [
        *[(name, str(v["objects"]), f"{v['recall@0.5']:.3f}", f"{v['recall@0.7']:.3f}", f"{v['abo']:.3f}")
          for name, v in res.per_class.items()],
        ("[bold]all", f"[bold]{res.objects}", f"[bold]{res.recall['0.5']:.3f}", f"[bold]{res.recall['0.7']:.3f}",
         f"[bold]MABO {res.mabo:.3f}")])
    console.print(f"{res.images} images, {res.mean_boxes:.0f} boxes/img; object-averaged ABO {res.abo_objects:.3f}")
    console.print(f"wrote {out} and {png}")
    if s.failed:
        raise fail(f"{len(s.failed)} of {s.images} images failed and were left out", 1)
