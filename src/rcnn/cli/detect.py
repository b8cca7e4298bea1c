"""``rcnn train``, ``rcnn detect`` and ``rcnn evaluate``: the R-CNN detector (paper §2.2–2.3)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer

from rcnn.cli import options as opt
from rcnn.cli.app import (
    ConsoleLog,
    app,
    console,
    exits,
    fail,
    load_model,
    open_dataset,
    print_error,
    print_table,
    print_warning,
)
from rcnn.cli.dataset import print_ap_table
from rcnn.cli.engine import check_engine, ray_extract, ray_fill_images
from rcnn.cli.progress import show_progress
from rcnn.device import PRECISIONS
from rcnn.features import MODES as FEATURE_MODES
from rcnn.proposals import MODES as PROPOSAL_MODES
from rcnn.sources import CachedRegions

#: `rcnn detect`'s default threshold on a trained model's SVM scores (rare classes score just below 0)
SVM_THRESHOLD = -0.5


def _log_warnings() -> None:
    """The training and detection warnings (and errors) of the library as console warnings."""
    for name in ("rcnn.svm", "rcnn.detect"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, ConsoleLog) for h in lg.handlers):
            lg.addHandler(ConsoleLog(errors="warning"))
            lg.propagate = False


def _source(model, root=None, flip: bool = False):
    from rcnn.backbones import WeightsError

    with exits(WeightsError, ValueError, prefix="cannot use this model here: "):  # rcnn.detect.ModelError: a ValueError
        return model.feature_source(root, flip=True if flip else None)


def _check_relocalize(model, model_path: Path, relocalize: int, no_bbox_reg: bool) -> None:
    if relocalize and (no_bbox_reg or model.bbox_reg is None):
        raise fail(f"--relocalize needs box regression: {model_path} has no box regressor (add one with rcnn bbox-reg)"
                   if model.bbox_reg is None else "--relocalize needs box regression, not --no-bbox-reg", 2)


@app.command()
def train(
    dataset: opt.DatasetArg, output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write")],
    split: opt.TrainSplitOpt = "trainval",
    preset: Annotated[Literal["default", "paper"], typer.Option("--preset", help="The recipe: the validated one (shared "
        "trunk, pool5+fire5, box regression, sizes from the data) or the paper's (warp, fc7, no box regression)")] = "default",
    finetune: Annotated[bool, typer.Option("--finetune", help="Fine-tune the network on the training regions first "
        "(paper §2.3; resumable), written beside the model (its name with .net.safetensors)")] = False,
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="Fine-tuning SGD iterations (2 images × 64 "
        "regions each)")] = 1500,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Hold out this fraction of the split "
        "(fixed seed) and report the model's AP on it", show_default="none")] = None,
    bbox_reg: Annotated[bool | None, typer.Option("--bbox-reg/--no-bbox-reg", help="Train box regressors (paper "
        "appendix C)", show_default="preset: yes (paper: no)")] = None,
    relocalize: Annotated[int | None, typer.Option("--relocalize", min=0, help="Rounds of iterative localisation the "
        "model applies at detection", show_default="preset: 1 (paper: 0)")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help="squeezenet1_1, efficientnet_lite0, alexnet, a "
        "torchvision classifier (needs --weights), or 'hog'", show_default="preset: squeezenet1_1")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", "-w", help="Backbone state dict (e.g. from rcnn finetune)",
        show_default="built-in")] = None,
    layer: Annotated[str | None, typer.Option("--layer", "-l", help="pool5 | fc6 | fc7, or taps joined by + ",
        show_default="preset: pool5+fire5 (paper: fc7)")] = None,
    mode: Annotated[Literal[FEATURE_MODES] | None, typer.Option("--mode", "-m", help="warp (faithful, §2.1) | shared (one "
        "trunk pass + RoI pooling)", show_default="preset: shared (paper: warp)")] = None,
    short_side: Annotated[int | None, typer.Option("--short-side", help="shared mode: resize images to this shorter side "
        "(px) for the trunk", show_default="preset: from the training objects' sizes")] = None,
    scales: Annotated[str | None, typer.Option("--scales", help="shared mode: scale(s) on top of --short-side, "
        "comma-separated", show_default="preset: 1")] = None,
    grid: Annotated[int | None, typer.Option("--grid", help="shared mode RoI grid / pool5 grid", show_default="preset: 6")] = None,
    context_pad: Annotated[int | None, typer.Option("--context-pad", help="context pixels around each box in the warped "
        "frame (released code: 16)", show_default="preset: 0")] = None,
    precision: Annotated[Literal[PRECISIONS] | None, typer.Option("--precision", help="fp32 | bf16 (CPU bfloat16: faster "
        "only on CPUs with AVX512-BF16/AMX)", show_default="preset: fp32")] = None,
    proposals: Annotated[Literal[PROPOSAL_MODES] | None, typer.Option("--proposals", help="Proposal mode (rcnn-fast | "
        "fast | quality) ", show_default="preset: rcnn-fast")] = None,
    ks: opt.KsOpt = None, min_size: opt.MinSizeOpt = None, resize_width: opt.WidthOpt = None, workers: opt.WorkersOpt = None,
    C: Annotated[float | None, typer.Option("--C", help="SVM C", show_default="preset: 1e-3, rcnn_train.m")] = None,
    pos_weight: Annotated[float | None, typer.Option("--pos-weight", help="Positive loss weight", show_default="preset: 2")] = None,
    passes: Annotated[int | None, typer.Option("--passes", help="Hard-negative mining passes",
        show_default="preset: 1, paper §2.3")] = None,
) -> None:
    """Train a detector: proposals → CNN features → per-class SVMs with hard-negative mining (paper
    §2.3) → box regressors; resumes from the caches after a kill."""
    from rcnn.backbones import WeightsError
    from rcnn.data import holdout_split
    from rcnn.pipeline import check_recipe, recipe
    from rcnn.pipeline import evaluate as run_evaluate
    from rcnn.pipeline import train as run_train

    _log_warnings()
    ds = open_dataset(dataset, split)
    if not ds.records:
        raise fail(f"{dataset}: split {split!r} has no images", 2)
    with exits(ValueError, WeightsError, prefix="bad option: "):
        rec = recipe(preset, backbone=backbone, weights=str(weights) if weights else None, layer=layer, mode=mode,
                     short_side=short_side, grid=grid, context_pad=context_pad, precision=precision,
                     scales=opt.floats(scales) if scales else None, proposals=proposals,
                     ks=tuple(int(k) for k in ks.split(",")) if ks else None, min_size=min_size,
                     resize_width=resize_width, bbox_reg=bbox_reg, relocalize=relocalize,
                     finetune=iterations if finetune else None)
        svm = {k: v for k, v in (("C", C), ("pos_weight", pos_weight), ("passes", passes)) if v is not None}
        check_recipe(rec := replace(rec, svm=replace(rec.svm, **svm)))
        ds, val = holdout_split(ds, val_fraction) if val_fraction is not None else (ds, None)
    console.print(f"{len(ds)} images of {dataset} ({split}{', ' + str(len(val)) + ' held out' if val else ''}); "
                  f"recipe {rec.name}: {rec.backbone} {rec.layer} {rec.mode}"
                  f"{', box regression' if rec.bbox_reg else ''}", highlight=False)
    with show_progress() as progress, exits(ValueError, code=1):  # rcnn.data.ImageReadError: a ValueError
        det = run_train(ds, None, rec, workers=workers, progress=progress,
                        net_path=output.with_suffix(".net.safetensors") if rec.finetune else None)
    if failed := det.model.training["prepare"]["failed"]:
        print_warning(f"trained without {failed} unreadable image(s)")
    if val is not None:
        with show_progress() as progress:
            ev = run_evaluate(det, val, None, progress=progress)
        det.model.training["validation"] = {"images": len(val), "fraction": val_fraction, **ev.as_dict()}
        console.print(f"validation ({len(val)} held-out images): mAP {ev.map:.3f} (VOC07), COCO mAP@[.5:.95] "
                      f"{ev.coco['mAP@[.5:.95]'] or float('nan'):.3f}", highlight=False)
    det.model.save(output)
    _print_training(det.model, output)


def _print_training(model, output: Path) -> None:
    """`rcnn train`'s summary: the SVMs table, the sizes resolved from the data, the timings."""
    tr = model.training
    print_table("SVMs", ["class", "positives", "retrains", "final negatives", "objective"], [
        (c, str(tr["num_pos"].get(c, 0)), str(len(obj)), str(tr["final_cache"].get(c, 0)), f"{obj[-1]:.4f}" if obj else
         "not trained") for c, obj in ((c, tr["objective"].get(c, [])) for c in model.classes)])
    res = tr["recipe"].get("resolved", {})
    if res:
        console.print(f"sizes from {res['objects']} training objects: trunk images {res['short_side']} px (shorter "
                      f"side), proposals from {res['min_size']:g} px", highlight=False)
    st, prep = tr["seconds_by_stage"], tr["prepare"]
    console.print(f"wrote {output} ({tr['seconds_total'] / 60:.1f} min: caches {st['prepare']:.0f} s, "
                  f"SVMs {st['svm']:.0f} s, box regression {st['bbox_reg']:.0f} s; feature cache "
                  f"{prep['cache_mb']:.0f} MB)", highlight=False)


#: `rcnn detect` options that only a trained model (.rcnn) uses: refused for the zero-training detector
MODEL_ONLY_OPTIONS = {"no_bbox_reg": "--no-bbox-reg", "flip": "--flip", "relocalize": "--relocalize",
                      "engine": "--engine", "address": "--address", "workers": "--workers"}


@app.command()
def detect(
    ctx: typer.Context,
    model_path: Annotated[Path, typer.Argument(help="Model file written by `rcnn train` (.rcnn), or the name of a shipped "
        "detector (`rcnn models`: imagenet = the zero-training detector, also used when the first argument is an image; "
        "person)")],
    images: Annotated[list[Path] | None, typer.Argument(help="Image files")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder")] = Path("rcnn-detect"),
    threshold: Annotated[float | None, typer.Option("--threshold", "-t", help="Keep detections scoring above this: an SVM "
        "score for a trained model (0 = the decision boundary; rare classes, e.g. BCCD's WBC, often score just below it), "
        "a probability in (0, 1] for imagenet", show_default="-0.5 (trained model), 0.5 (imagenet)")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="At most this many detections per image",
        show_default="all (trained model), 10 (imagenet)")] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="Skip the annotated PNGs")] = False,
    no_bbox_reg: opt.NoBboxRegOpt = False, flip: opt.FlipOpt = False, relocalize: opt.RelocalizeOpt = 0,
    engine: opt.EngineOpt = "local", address: opt.AddressOpt = None, workers: opt.WorkersOpt = None,
) -> None:
    """Detect objects in images: COCO results JSON, VOC comp4 files (one per class with detections)
    and an annotated PNG per image.

    Without a trained model (`rcnn detect IMAGE...` or `rcnn detect imagenet IMAGE...`) the
    zero-training detector of `rcnn demo` is used (the ImageNet vocabulary + the shipped person head);
    it takes --threshold, --max-detections and --no-png, and refuses the trained-model options.
    `rcnn detect person IMAGE...` uses the shipped person model (`rcnn models` lists them)."""
    from rcnn import zoo
    from rcnn.data import IMAGE_SUFFIXES
    from rcnn.detect import detect_image

    images = list(images or [])
    is_image = model_path.suffix.lower() in IMAGE_SUFFIXES
    with exits(zoo.ZooError):  # a shipped detector's name, unless a file of that name exists
        shipped = None if is_image or model_path.exists() else zoo.manifest().get(str(model_path))
    if is_image or (shipped is not None and shipped.kind == "imagenet"):
        if is_image:
            images.insert(0, model_path)
        # typer vendors its own click: compare the ParameterSource by name
        given = [flag for name, flag in MODEL_ONLY_OPTIONS.items()
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]
        if given:
            raise fail(f"{', '.join(given)}: only for a trained model (.rcnn), not the zero-training imagenet detector", 2)
        return _detect_imagenet("imagenet" if shipped is None else shipped.name, images, output, threshold, top_k, no_png)
    if not images:
        raise fail("no images given: rcnn detect MODEL IMAGE... (or rcnn detect IMAGE... for the ImageNet demo detector)", 2)
    check_engine(engine, address)
    _log_warnings()
    with exits(zoo.ZooError):
        model = load_model(model_path) if shipped is None else zoo.load_rcnn(shipped.name)
    _check_relocalize(model, model_path, relocalize, no_bbox_reg)
    source = _source(model, flip=flip)
    # --engine ray: proposals + features on Ray workers into the cache first (rcnn.distributed)
    cached = ray_fill_images(images, source, address, workers) if engine == "ray" else None
    svm_threshold = SVM_THRESHOLD if threshold is None else threshold

    def detect_one(img: np.ndarray, p: Path):
        src = source if cached is None or p.resolve() not in cached else CachedRegions(source, cached[p.resolve()])
        return detect_image(model, img, src, threshold=svm_threshold, top_k=top_k, bbox_reg=not no_bbox_reg,
                            relocalize_rounds=relocalize)

    _detect_images(images, detect_one, model.classes, output, no_png)


def _detect_imagenet(name: str, images: list[Path], output: Path, threshold: float | None, top_k: int | None,
                     no_png: bool) -> None:
    """`rcnn detect` with the shipped zero-training detector ``name`` (rcnn.zoo.load → rcnn.demo.ImagenetDetector)."""
    from rcnn import zoo
    from rcnn.demo import DemoConfig

    settings = {k: v for k, v in (("threshold", threshold), ("max_detections", top_k)) if v is not None}
    with exits(ValueError, prefix="bad option for the imagenet detector: "):
        config = DemoConfig(**settings)
    if not images:
        raise fail("no images given", 2)
    with exits(zoo.ZooError):
        det = zoo.load(name, config=config)
    _detect_images(images, lambda img, p: det(img), det.class_names, output, no_png)


def _detect_images(images: list[Path], detect_one, classes: list[str], output: Path, no_png: bool) -> None:
    """:func:`rcnn.pipeline.detect_files` with a progress bar, one line per unreadable file and the summary."""
    from rcnn.pipeline import detect_files

    with show_progress() as progress:
        res = detect_files(images, detect_one, classes, output, not no_png, progress, print_error)
    console.print(f"{len(res.detections)} detections in {res.images} image(s) → {output}")
    if res.failed:
        raise fail(f"{len(res.failed)} image(s) could not be read", 1)


@app.command()
def evaluate(
    model_path: opt.ModelArg, dataset: opt.DatasetArg,
    split: Annotated[str, typer.Option("--split", "-s", help="Test split")] = "test", metric: opt.MetricOpt = "voc07",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for results JSON, PR curves, detections",
                                                show_default="not written")] = None,
    no_bbox_reg: opt.NoBboxRegOpt = False, flip: opt.FlipOpt = False, relocalize: opt.RelocalizeOpt = 0,
    workers: opt.WorkersOpt = None, engine: opt.EngineOpt = "local", address: opt.AddressOpt = None,
) -> None:
    """Detect over a split (using the caches) and print the per-class VOC AP table and mAP."""
    from rcnn.pipeline import evaluate as run_evaluate
    from rcnn.pipeline import write_evaluation

    check_engine(engine, address)
    _log_warnings()
    model = load_model(model_path)
    _check_relocalize(model, model_path, relocalize, no_bbox_reg)
    ds = open_dataset(dataset, split)
    missing = [c for c in ds.classes if c not in model.classes]
    if missing:
        print_warning(f"dataset classes not in the model (AP undefined): {missing}")
    source = _source(model, ds.root, flip)
    if engine == "ray":  # rcnn.distributed: proposals + features on Ray workers into the caches first
        ray_extract(ds, None, None, address, workers, source=source)
    with show_progress() as progress:
        ev = run_evaluate(model, ds, None, metric, relocalize=relocalize, bbox_reg=not no_bbox_reg, workers=workers,
                          progress=progress, source=source)
    for msg in ev.prepare.failed:
        print_error(msg)
    for w in ev.warnings:
        print_warning(w)
    print_ap_table(ev.result, title=f"{model_path.name} on {dataset} ({split}, {metric})")
    console.print(ev.coco_metrics.line(), highlight=False)
    how = f" + {relocalize} round(s) of iterative localisation" if relocalize else ""
    console.print(f"{ev.images} images, {ev.seconds_per_image:.2f} s/image from cached features{how}")
    if output:
        pngs = write_evaluation(ev, model.classes, output, {"model": str(model_path), "dataset": str(dataset),
                                                            "split": split})
        console.print(f"wrote {output / 'results.json'}, {len(pngs)} PR curve(s) and the detections to {output}")
    if ev.prepare.failed:
        raise fail(f"{len(ev.prepare.failed)} image(s) could not be read", 1)
