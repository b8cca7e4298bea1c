"""``rcnn features``: fill the per-image CNN feature cache; ``rcnn backbones``: list the networks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from rcnn.backbones import WeightsError, available_backbones
from rcnn.cli import options as opt
from rcnn.cli.app import app, console, exits, fail, open_dataset, print_first
from rcnn.cli.engine import check_engine, ray_extract, report_device
from rcnn.cli.progress import show_progress
from rcnn.features import METHODS, FeatureConfig, check_layer, features_for_dataset, layer_dim
from rcnn.proposals import propose_dataset


@app.command()
def features(
    dataset: opt.DatasetArg, split: opt.SplitOpt = None,
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="squeezenet1_1, efficientnet_lite0, alexnet, "
        "or any torchvision classifier (needs --weights)")] = "squeezenet1_1",
    weights: Annotated[Path | None, typer.Option("--weights", "-w", help="State dict (.safetensors or torch.save) for "
        "the backbone", show_default="built-in")] = None,
    layer: Annotated[str, typer.Option("--layer", "-l", help="pool5 | fc6 | fc7 | logits, or taps joined by + (pool5+fire5)")] = "fc7",
    mode: opt.FeatureModeOpt = "warp",
    context_pad: Annotated[int, typer.Option("--context-pad", help="context pixels in the warped frame "
        "(released code: 16; shared mode pools the same window)")] = 0,
    method: Annotated[Literal[METHODS], typer.Option("--method", help="warp mode: how a box becomes the CNN input "
        "(paper Appendix A)")] = "warp",
    scales: opt.ScalesOpt = opt.SCALES, grid: opt.GridOpt = opt.GRID,
    with_gt: Annotated[bool, typer.Option("--with-gt/--no-gt", help="Also describe the ground-truth boxes (stored first)")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Regions per forward pass")] = 128,
    proposals: opt.ProposalsOpt = "rcnn-fast", ks: opt.KsOpt = None, max_boxes: opt.MaxBoxesOpt = None,
    workers: opt.WorkersOpt = None, engine: opt.EngineOpt = "local", address: opt.AddressOpt = None,
    device: opt.DeviceOpt = "auto", precision: opt.PrecisionOpt = "fp32",
) -> None:
    """Compute float16 CNN features of every proposal of every image into the cache (resumable)."""
    check_engine(engine, address)
    ds = open_dataset(dataset, split)
    pc = opt.make_config(proposals, ks, max_boxes, None, None, False)
    with exits(WeightsError), exits(ValueError, prefix="bad option: "):
        fc = FeatureConfig(backbone=backbone, weights=str(weights) if weights else None, layer=layer, mode=mode,
                           context_pad=context_pad, method=method, scales=opt.floats(scales), grid=grid, with_gt=with_gt,
                           batch_size=batch_size, device=report_device(device), precision=precision)
        bb = fc.backbone_obj()
    with exits(ValueError, prefix="--layer: "):
        check_layer(bb, layer)
    console.print(f"{len(ds)} images; proposals {pc.describe()}; features {fc.describe()} "
                  f"({layer_dim(bb, layer, grid)}-d float16)", highlight=False)
    if engine == "ray":  # rcnn.distributed: proposals + features in Ray tasks, into the same cache
        s = ray_extract(ds, pc, fc, address, workers)
        proposal_failed = []
    else:
        with show_progress() as progress:
            ps = propose_dataset(ds, pc, workers=workers, progress=progress)  # parallel; features then read the cache
            s = features_for_dataset(ds, pc, fc, progress=progress)
        proposal_failed = [m for _, m in ps.failed]
    console.print(f"computed {s.computed}, reused {s.cached} from the cache, failed {len(s.failed)}; "
                  f"{s.regions} regions in {s.seconds:.1f} s ({s.regions_per_s:.1f} regions/s)", highlight=False)
    console.print(f"cache: {s.cache_dir} ({s.cache_mb:.1f} MB on disk)", highlight=False)
    failed = list(dict.fromkeys(s.failed + proposal_failed))
    if failed:
        print_first(failed, "  [red]{}", highlight=False, soft_wrap=True)
        raise fail(f"{len(failed)} image(s) failed; the rest are cached", 1)


@app.command()
def backbones() -> None:
    """List the backbones and their feature taps."""
    from rcnn.backbones import BUILTIN, get_backbone

    for name in available_backbones():
        if name in BUILTIN:
            bb = get_backbone(name)
            taps = ", ".join(f"{k} {v}" for k, v in bb.taps.items())
            console.print(f"{name}: {bb.input_size}px {bb.color}, taps {taps}", highlight=False)
        else:
            console.print(f"{name}: needs --weights PATH", highlight=False)
