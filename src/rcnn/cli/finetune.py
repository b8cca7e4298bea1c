"""``rcnn finetune``, ``rcnn softmax-model`` and ``rcnn bbox-reg`` (paper §2.3, box regression)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from rcnn.cli import options as opt
from rcnn.cli.app import app, console, exits, fail, open_dataset, print_error
from rcnn.cli.progress import show_progress


@app.command()
def finetune(
    dataset: opt.DatasetArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Fine-tuned network to write (.safetensors)")],
    split: opt.TrainSplitOpt = "trainval",
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="squeezenet1_1, efficientnet_lite0, alexnet, …")] = "squeezenet1_1",
    weights: Annotated[Path | None, typer.Option("--weights", "-w", help="Pre-trained weights (torchvision models)",
        show_default="built-in")] = None,
    mode: opt.FeatureModeOpt = "warp",
    iterations: Annotated[int, typer.Option("--iterations", help="SGD iterations (128 regions each)")] = 1000,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate",
        show_default="1/10 of the backbone's pre-training rate")] = None,
    step_size: Annotated[int | None, typer.Option("--step-size", help="lr ×0.1 every this many iterations",
        show_default="2/3 of the run")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of sampling, flips, dropout and the new layer")] = 0,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Horizontal flip augmentation")] = True,
    freeze: Annotated[int, typer.Option("--freeze", help="Keep the first N trunk modules frozen (0: all trained, §2.3)")] = 0,
    context_pad: Annotated[int, typer.Option("--context-pad", help="warp: context pixels (must match the features)")] = 0,
    scales: opt.ScalesOpt = opt.SCALES, grid: opt.GridOpt = opt.GRID,
    layer: Annotated[Literal["fc7", "fc6", "pool5"], typer.Option("--layer", "-l", help="What the new classifier "
        "reads: fc7 (paper §2.3), fc6 or pool5 (the RoI grid)")] = "fc7",
    input_norm: Annotated[float | None, typer.Option("--input-norm", help="Scale the layer's features to this mean "
        "L2 norm (e.g. 20)", show_default="as is")] = None,
    precision: opt.PrecisionOpt = "fp32",
    val_images: Annotated[int, typer.Option("--val-images", help="Training images held out for the validation curve")] = 16,
    val_every: Annotated[int, typer.Option("--val-every", help="Validate every N iterations")] = 50,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every N iterations")] = 50,
    proposals: opt.ProposalsOpt = "rcnn-fast", ks: opt.KsOpt = None, max_boxes: opt.MaxBoxesOpt = None,
    min_size: opt.MinSizeOpt = None, resize_width: opt.WidthOpt = None,
    workers: Annotated[int | None, typer.Option("--workers", "-j", help="CPU threads", show_default="all cores")] = None,
) -> None:
    """Fine-tune a backbone on the dataset's regions (paper §2.3); resumes from OUTPUT.ckpt after a kill.

    The output loads as a backbone (--backbone B --weights OUTPUT for rcnn train / rcnn features) and offers the ft_logprob tap (the fine-tuned softmax, see rcnn softmax-model)."""
    from rcnn.backbones import WeightsError
    from rcnn.features import SHARED_GRID, SHARED_SCALES
    from rcnn.finetune import CheckpointError, FinetuneConfig
    from rcnn.finetune import finetune as run

    ds = open_dataset(dataset, split)
    if not ds.records:
        raise fail(f"{dataset}: split {split!r} has no images", 2)
    pc = opt.make_config(proposals, ks, max_boxes, min_size, resize_width, False)
    with exits(ValueError, prefix="bad option: "):
        cfg = FinetuneConfig(backbone=backbone, weights=str(weights) if weights else None, mode=mode, iterations=iterations,
                             lr=lr, step_size=step_size, seed=seed, flip=flip, freeze=freeze, context_pad=context_pad,
                             scales=opt.floats(scales) if scales else SHARED_SCALES, grid=grid or SHARED_GRID, tap=layer,
                             input_norm=input_norm, precision=precision, val_images=val_images, val_every=val_every,
                             checkpoint_every=checkpoint_every)
    console.print(f"fine-tuning {backbone} ({mode} mode) on {len(ds)} images of {dataset} ({split}); "
                  f"{iterations} iterations, lr {cfg.base_lr:g} (step ×{cfg.gamma} every {cfg.step}), "
                  f"classes {['background', *ds.classes]}", highlight=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    with exits(CheckpointError, WeightsError, FloatingPointError, ValueError, code=1), show_progress() as progress:
        res = run(ds.records, ds.classes, output, cfg, pc, ds.root, progress=progress, threads=workers)
    last = res.history["val"][-1] if res.history.get("val") else None
    resumed = f", resumed from iteration {res.resumed_from}" if res.resumed_from else ""
    console.print(f"wrote {output} ({res.iterations} iterations, {res.seconds / 60:.1f} min here, "
                  f"{res.seconds_per_iteration:.2f} s/iteration){resumed}", highlight=False)
    if last:
        console.print(f"validation: loss {last['loss']:.3f}, accuracy {last['accuracy']:.3f}, "
                      f"positives {last['fg_accuracy']:.3f}; curve {output.with_suffix('')}.curve.png", highlight=False)


@app.command("softmax-model")
def softmax_model(
    net: Annotated[Path, typer.Argument(help="Fine-tuned network written by `rcnn finetune`")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write (.rcnn)")],
    mode: opt.FeatureModeOpt = "warp", scales: opt.ScalesOpt = opt.SCALES,
    context_pad: Annotated[int, typer.Option("--context-pad", help="warp: context pixels")] = 0,
    proposals: opt.ProposalsOpt = "rcnn-fast", ks: opt.KsOpt = None, max_boxes: opt.MaxBoxesOpt = None,
    min_size: opt.MinSizeOpt = None, resize_width: opt.WidthOpt = None,
) -> None:
    """A detector scoring regions with the fine-tuned softmax instead of SVMs (use with `rcnn detect/evaluate`)."""
    from rcnn.backbones import WeightsError
    from rcnn.detect import softmax_model as build
    from rcnn.features import SHARED_SCALES, FeatureConfig

    pc = opt.make_config(proposals, ks, max_boxes, min_size, resize_width, False)
    with exits(ValueError, WeightsError):
        sc = opt.floats(scales) if scales else SHARED_SCALES
        model = build(net, pc, FeatureConfig(mode=mode, scales=sc, context_pad=context_pad))
    model.save(output)
    console.print(f"wrote {output}: {len(model.classes)} classes scored by the fine-tuned softmax of {net}", highlight=False)


@app.command("bbox-reg")
def bbox_reg(
    model_path: Annotated[Path, typer.Argument(help="Model file (.rcnn) to add a box regressor to")],
    dataset: opt.DatasetArg, split: opt.TrainSplitOpt = "trainval",
    layer: Annotated[str, typer.Option("--layer", "-l", help="Feature layer of the regressor (released code: pool5)")] = "pool5",
    lam: Annotated[float, typer.Option("--lambda", help="Ridge penalty (released code: 1000)")] = 1000.0,
    min_iou: Annotated[float, typer.Option("--min-iou", help="Training regions: IoU with a ground truth above this")] = 0.6,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of updating MODEL",
                                                show_default="MODEL, updated")] = None,
) -> None:
    """Train per-class bounding-box regressors on the model's network features and store them in the model file.

    rcnn detect / rcnn evaluate then refine every scored box before NMS (--no-bbox-reg switches it off)."""
    from rcnn.detect import CNNFeatures, ModelError, RCNNModel
    from rcnn.pipeline import add_box_regressor

    with exits(ModelError, ValueError):
        model = RCNNModel.load(model_path)
        src = model.feature_source()
    if not isinstance(src, CNNFeatures):
        raise fail("box regression needs a CNN model (not HOG)", 2)
    if layer not in src.backbone.taps:
        raise fail(f"--layer must be one of {list(src.backbone.taps)}, not {layer!r}", 2)
    ds = open_dataset(dataset, split)
    with show_progress() as progress:
        reg, prep = add_box_regressor(model, ds, layer, lam, min_iou, progress)
    for msg in prep.failed:
        print_error(msg)
    out = output or model_path
    model.save(out)
    used = ", ".join(f"{c} {v['used']}/{v['seen']}" for c, v in reg.training["samples"].items())
    console.print(f"wrote {out}: box regressors on {layer} (λ={lam:g}; samples used/seen: {used})", highlight=False)
