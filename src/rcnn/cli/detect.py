"""``rcnn train``, ``rcnn detect`` and ``rcnn evaluate``: the R-CNN detector (paper §2.2–2.3)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import Progress
from rich.table import Table

from rcnn.cache import save_json
from rcnn.cli.app import app, console, err_console, fail
from rcnn.cli.dataset import DatasetArg, open_dataset, print_ap_table
from rcnn.cli.engine import (
    AddressOpt,
    CachedRegions,
    EngineOpt,
    PrecisionOpt,
    check_engine,
    ray_extract,
    ray_fill_images,
)
from rcnn.cli.proposals import KsOpt, MaxBoxesOpt, MinSizeOpt, WidthOpt, WorkersOpt, make_config
from rcnn.data import ImageReadError, load_image
from rcnn.evaluate import METRICS, Detections, write_coco_results, write_comp4
from rcnn.progress import progress_bar

log = logging.getLogger(__name__)

ModelArg = Annotated[Path, typer.Argument(help="Model file written by `rcnn train` (.rcnn)")]


#: `rcnn detect`'s default threshold on a trained model's SVM scores (rare classes score just below 0)
SVM_THRESHOLD = -0.5


def _progress() -> Progress:
    return progress_bar("{task.fields[info]}", console=console)


class _WarnToConsole(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[yellow]warning:[/] {record.getMessage()}", highlight=False, soft_wrap=True)


def _log_warnings() -> None:
    for name in ("rcnn.svm", "rcnn.detect"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, _WarnToConsole) for h in lg.handlers):
            h = _WarnToConsole(logging.WARNING)
            lg.addHandler(h)
            lg.propagate = False


def _load_model(path: Path):
    from rcnn.detect import ModelError, RCNNModel

    try:
        return RCNNModel.load(path)
    except ModelError as e:
        raise fail(str(e), 2) from None


FlipOpt = Annotated[bool, typer.Option("--flip", help="Test-time flip averaging: each region's pooled map averaged with its "
                                       "mirror's (2x the CNN work; not in the paper, no gain measured on BCCD)")]


RelocalizeOpt = Annotated[int, typer.Option("--relocalize", min=0, help="Rounds of iterative localisation after box "
                                           "regression: each class's best boxes are re-scored and regressed again (not in "
                                           "the paper; BCCD fine-tuned: +5 mAP with 1 round)")]


def _source(model, root=None, flip: bool = False):
    from rcnn.backbones import WeightsError
    from rcnn.detect import ModelError

    try:
        return model.feature_source(root, flip=True if flip else None)
    except (ModelError, WeightsError, ValueError) as e:
        raise fail(f"cannot use this model here: {e}", 2) from None


@app.command()
def train(
    dataset: DatasetArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write")],
    split: Annotated[str, typer.Option("--split", "-s", help="Training split")] = "trainval",
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="squeezenet1_1, efficientnet_lite0, alexnet, a "
                                          "torchvision classifier (needs --weights), or 'hog' (HOG baseline)")] = "squeezenet1_1",
    weights: Annotated[Path | None, typer.Option("--weights", "-w", help="Backbone state dict")] = None,
    layer: Annotated[str, typer.Option("--layer", "-l", help="pool5 | fc6 | fc7 (paper §3.2: fc7), or taps joined by + (pool5+fire5: a hypercolumn)")] = "fc7",
    mode: Annotated[str, typer.Option("--mode", "-m", help="warp (faithful, §2.1) | shared (one trunk pass + RoI pooling)")] = "warp",
    scales: Annotated[str | None, typer.Option("--scales", help="shared mode: image scale(s), comma-separated")] = None,
    grid: Annotated[int | None, typer.Option("--grid", help="shared mode RoI grid / pool5 grid")] = None,
    context_pad: Annotated[int, typer.Option("--context-pad", help="context pixels around each box in the warped frame (released code: 16; shared mode pools the same enlarged window)")] = 0,
    proposals: Annotated[str, typer.Option("--proposals", help="Proposal mode (rcnn-fast | fast | quality)")] = "rcnn-fast",
    ks: KsOpt = None,
    max_boxes: MaxBoxesOpt = None,
    min_size: MinSizeOpt = None,
    resize_width: WidthOpt = None,
    workers: WorkersOpt = None,
    C: Annotated[float, typer.Option("--C", help="SVM C (rcnn_train.m: 1e-3)")] = 1e-3,
    pos_weight: Annotated[float, typer.Option("--pos-weight", help="Positive loss weight (rcnn_train.m: 2)")] = 2.0,
    bias_mult: Annotated[float, typer.Option("--bias-mult", help="Bias feature value (rcnn_train.m: 10)")] = 10.0,
    passes: Annotated[int, typer.Option("--passes", help="Hard-negative mining passes (paper §2.3: 1)")] = 1,
    retrain_limit: Annotated[int, typer.Option("--retrain-limit", help="Retrain after this many new negatives")] = 2000,
    max_new_neg: Annotated[int | None, typer.Option("--max-new-neg", help="Cap new negatives per class per image")] = None,
    max_cache_mb: Annotated[float, typer.Option("--max-cache-mb", help="Bound of each class's negative cache")] = 512.0,
    precision: PrecisionOpt = "fp32",
) -> None:
    """Train per-class linear SVMs with hard-negative mining (paper §2.3); resumes from the caches."""
    from rcnn.backbones import WeightsError
    from rcnn.detect import CNNFeatures, HOGFeatures, fit
    from rcnn.features import SHARED_GRID, SHARED_SCALES, FeatureConfig, check_layer, features_for_dataset
    from rcnn.proposals import propose_dataset
    from rcnn.svm import SVMConfig

    _log_warnings()
    ds = open_dataset(dataset, split)
    if not ds.records:
        raise fail(f"{dataset}: split {split!r} has no images", 2)
    pc = make_config(proposals, ks, max_boxes, min_size, resize_width, False)
    try:
        svm = SVMConfig(C=C, bias_mult=bias_mult, pos_weight=pos_weight, passes=passes, retrain_limit=retrain_limit,
                        max_new_neg_per_image=max_new_neg, max_cache_mb=max_cache_mb)
        if backbone == "hog":
            source = HOGFeatures(pc, ds.root)
        else:
            sc = tuple(float(s) for s in scales.split(",")) if scales else SHARED_SCALES
            fc = FeatureConfig(backbone=backbone, weights=str(weights) if weights else None, layer=layer, mode=mode,
                               context_pad=context_pad, scales=sc, grid=grid or SHARED_GRID, with_gt=True,
                               precision=precision)
            bb = fc.backbone_obj()
            check_layer(bb, layer)  # a ValueError: "bad option: unknown layer(s) ..."
            source = CNNFeatures(pc, fc, ds.root, backbone=bb)
    except ValueError as e:
        raise fail(f"bad option: {e}", 2) from None
    except WeightsError as e:
        raise fail(str(e), 2) from None
    console.print(f"{len(ds)} images of {dataset} ({split}); proposals {pc.describe()}; "
                  f"features {source.name} {source.layer} {source.mode}", highlight=False)
    t0 = time.perf_counter()
    ps = propose_dataset(ds, pc, workers=workers, progress=True)
    bad = {i for i, _ in ps.failed}
    for _, msg in ps.failed:
        err_console.print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)
    if bad:
        ds.records = [r for r in ds.records if r.image_id not in bad]
        err_console.print(f"[yellow]warning:[/] training without {len(bad)} unreadable image(s)")
    if isinstance(source, CNNFeatures):
        s = features_for_dataset(ds, pc, replace(source.feature_config), progress=True)
        console.print(f"features: computed {s.computed}, reused {s.cached}; cache {s.cache_mb:.0f} MB", highlight=False)
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def report(p) -> None:
            if p.stage not in tasks:
                tasks[p.stage] = bar.add_task({"stats": "feature scale", "positives": "positives",
                                               "mining": "hard-negative mining"}[p.stage], total=p.total, info="")
            info = ""
            if p.cache_sizes:
                info = "cache " + " ".join(f"{c}:{n}" for c, n in zip(ds.classes, p.cache_sizes, strict=False)) + \
                       " · obj " + " ".join("–" if math.isnan(o) else f"{o:.3g}" for o in p.objective)
            bar.update(tasks[p.stage], completed=p.done, total=p.total, info=info)

        try:
            model, res = fit(ds, source, svm, progress=report)
        except (ValueError, ImageReadError) as e:
            raise fail(str(e), 1) from None
    model.training["seconds_total"] = round(time.perf_counter() - t0, 1)
    model.save(output)
    t = Table(title=f"SVMs ({svm.C=}, {svm.pos_weight=}, {svm.bias_mult=})")
    for col in ("class", "positives", "retrains", "final negatives", "objective"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c, name in enumerate(ds.classes):
        h = res.history[c]
        t.add_row(name, str(res.num_pos[c]), str(len(h)), str(h[-1]["num_neg_after_evict"] if h else 0),
                  f"{h[-1]['objective']:.4f}" if h else "not trained")
    console.print(t)
    console.print(f"wrote {output} (training {res.seconds / 60:.1f} min from cached features)")


def _write_outputs(dets: Detections, classes, out: Path, split: str) -> None:
    write_coco_results(dets, list(range(1, len(classes) + 1)), out / "detections_coco.json")
    write_comp4(dets, classes, out, split)


#: `rcnn detect` options that only a trained model (.rcnn) uses: refused for the zero-training detector
MODEL_ONLY_OPTIONS = {"no_bbox_reg": "--no-bbox-reg", "flip": "--flip", "relocalize": "--relocalize",
                      "engine": "--engine", "address": "--address", "workers": "--workers"}


@app.command()
def detect(
    ctx: typer.Context,
    model_path: Annotated[Path, typer.Argument(help="Model file written by `rcnn train` (.rcnn), or the name of a shipped "
                                               "detector (`rcnn models`: imagenet = the zero-training detector, also used "
                                               "when the first argument is an image; person)")],
    images: Annotated[list[Path] | None, typer.Argument(help="Image files")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder")] = Path("rcnn-detect"),
    threshold: Annotated[float | None, typer.Option("--threshold", "-t", help="Keep detections scoring above this: an SVM "
                                                    "score for a trained model (default -0.5; 0 = the decision boundary; rare "
                                                    "classes, e.g. BCCD's WBC, often score just below it), a probability in "
                                                    "(0, 1] for `imagenet` (default 0.5)")] = None,
    top_k: Annotated[int | None, typer.Option("--max-detections", "--top-k", min=1, help="At most this many detections "
                                              "per image (default: all for a trained model, 10 for `imagenet`)")] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="Skip the annotated PNGs")] = False,
    no_bbox_reg: Annotated[bool, typer.Option("--no-bbox-reg", help="Do not refine boxes with the model's box regressor")] = False,
    flip: FlipOpt = False,
    relocalize: RelocalizeOpt = 0,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
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
    try:  # a shipped detector's name, unless a file of that name exists
        shipped = None if is_image or model_path.exists() else zoo.manifest().get(str(model_path))
    except zoo.ZooError as e:
        raise fail(str(e), 2) from None
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
    try:
        model = _load_model(model_path) if shipped is None else zoo.load_rcnn(shipped.name)
    except zoo.ZooError as e:
        raise fail(str(e), 2) from None
    if relocalize and (no_bbox_reg or model.bbox_reg is None):
        raise fail(f"--relocalize needs box regression: {model_path} has no box regressor (add one with rcnn bbox-reg)"
                   if model.bbox_reg is None else "--relocalize needs box regression, not --no-bbox-reg", 2)
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
    try:
        config = DemoConfig(**settings)
    except ValueError as e:
        raise fail(f"bad option for the imagenet detector: {e}", 2) from None
    if not images:
        raise fail("no images given", 2)
    try:
        det = zoo.load(name, config=config)
    except zoo.ZooError as e:
        raise fail(str(e), 2) from None
    _detect_images(images, lambda img, p: det(img), det.class_names, output, no_png)


def _detect_images(images: list[Path], detect_one, classes: list[str], output: Path, no_png: bool) -> None:
    """Run ``detect_one(image, path) -> (boxes, scores, labels)`` over image files; write COCO JSON,
    comp4 files (only for classes with detections) and an annotated PNG per image; unreadable files
    are reported and counted."""
    from rcnn.visualize import draw_detections, save_png

    output.mkdir(parents=True, exist_ok=True)
    parts, failed = [], []
    with _progress() as bar:
        task = bar.add_task("detect", total=len(images), info="")
        for p in images:
            try:
                img = load_image(p)
            except ImageReadError as e:
                failed.append(str(e))
                err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
                bar.advance(task)
                continue
            t0 = time.perf_counter()
            b, s, lab = detect_one(img, p)
            dt = time.perf_counter() - t0
            parts.append(Detections(np.array([p.stem] * len(s), dtype=object), b, s, lab))
            if not no_png:
                save_png(output / f"{p.stem}.png", draw_detections(img, b, lab, s, classes))
            counts = ", ".join(f"{classes[c]} {int((lab == c).sum())}" for c in np.unique(lab)) or "nothing"
            bar.update(task, advance=1, info=f"{p.name}: {counts} ({dt:.1f} s)")
    dets = Detections.concat(parts)
    write_coco_results(dets, list(range(1, len(classes) + 1)), output / "detections_coco.json")
    write_comp4(dets, classes, output, "detect", skip_empty=True)
    console.print(f"{len(dets)} detections in {len(parts)} image(s) → {output}")
    if failed:
        raise fail(f"{len(failed)} image(s) could not be read", 1)


@app.command()
def evaluate(
    model_path: ModelArg,
    dataset: DatasetArg,
    split: Annotated[str, typer.Option("--split", "-s", help="Test split")] = "test",
    metric: Annotated[str, typer.Option("--metric", help=f"One of {METRICS}")] = "voc07",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for results JSON, PR curves, detections")] = None,
    no_bbox_reg: Annotated[bool, typer.Option("--no-bbox-reg", help="Do not refine boxes with the model's box regressor")] = False,
    flip: FlipOpt = False,
    relocalize: RelocalizeOpt = 0,
    workers: WorkersOpt = None,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Detect over a split (using the caches) and print the per-class VOC AP table and mAP."""
    from rcnn.detect import CNNFeatures, DetectStats, detect_dataset, evaluate_model, save_pr_curves
    from rcnn.features import features_for_dataset
    from rcnn.proposals import propose_dataset

    if metric not in METRICS:
        raise fail(f"--metric must be one of {METRICS}, not {metric!r}", 2)
    check_engine(engine, address)
    _log_warnings()
    model = _load_model(model_path)
    if relocalize and (no_bbox_reg or model.bbox_reg is None):
        raise fail(f"--relocalize needs box regression: {model_path} has no box regressor (add one with rcnn bbox-reg)"
                   if model.bbox_reg is None else "--relocalize needs box regression, not --no-bbox-reg", 2)
    ds = open_dataset(dataset, split)
    missing = [c for c in ds.classes if c not in model.classes]
    if missing:
        err_console.print(f"[yellow]warning:[/] dataset classes not in the model (AP undefined): {missing}")
    source = _source(model, ds.root, flip)
    if engine == "ray":  # rcnn.distributed: proposals + features on Ray workers, same caches
        if not isinstance(source, CNNFeatures):
            raise fail("--engine ray needs a CNN-feature model (HOG features are computed in this process)", 2)
        es = ray_extract(ds, source.proposal_config, source.feature_config, address, workers)
        ps_failed = [(r.image_id, m) for r in ds.records for m in es.failed if m.startswith(f"{r.path}:")]
    else:
        ps_failed = propose_dataset(ds, source.proposal_config, workers=workers, progress=True).failed
    for _, msg in ps_failed:
        err_console.print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)
    bad = {i for i, _ in ps_failed}
    ds.records = [r for r in ds.records if r.image_id not in bad]
    if isinstance(source, CNNFeatures) and engine != "ray":
        features_for_dataset(ds, source.proposal_config, source.feature_config, progress=True)
    stats = DetectStats()
    with _progress() as bar:
        task = bar.add_task("detect", total=len(ds.records), info="")
        dets = detect_dataset(model, ds, source, progress=lambda i, n: bar.update(task, completed=i), stats=stats,
                              bbox_reg=not no_bbox_reg, relocalize_rounds=relocalize)
    result, warns = evaluate_model(model, ds, dets, metric)
    for w in warns:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    print_ap_table(result, title=f"{model_path.name} on {dataset} ({split}, {metric})")
    how = f" + {relocalize} round(s) of iterative localisation" if relocalize else ""
    console.print(f"{stats.images} images, {stats.seconds_per_image:.2f} s/image from cached features{how}")
    if output:
        output.mkdir(parents=True, exist_ok=True)
        doc = {**result.as_dict(), "model": str(model_path), "dataset": str(dataset), "split": split, "warnings": warns,
               "images": stats.images, "seconds_per_image_cached": stats.seconds_per_image, "no_proposals": stats.no_proposals}
        save_json(output / "results.json", doc)
        pngs = save_pr_curves(result, output)
        _write_outputs(dets, model.classes, output, split)
        console.print(f"wrote {output / 'results.json'}, {len(pngs)} PR curve(s) and the detections to {output}")
    if bad:
        raise fail(f"{len(bad)} image(s) could not be read", 1)
