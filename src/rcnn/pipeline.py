"""The R-CNN workflow as library calls: recipe → caches → SVMs + box regression → detector → evaluation.

One way through, used by the CLI, the Python API (``rcnn.train`` / ``rcnn.load`` / ``rcnn.evaluate``)
and the benchmarks::

    model = rcnn.train("data/", split="trainval")        # the validated default recipe
    dets = model.detect(image)                           # ImageDetections (boxes xyxy, scores, labels)
    res = rcnn.evaluate(model, "data/", split="test")    # VOC AP + COCO mAP
    model.save("model.rcnn"); model = rcnn.load("model.rcnn")

A :class:`Recipe` names every choice (paper §2–3 and what this project added); :data:`PRESETS` holds
``"paper"`` (the paper's pipeline exactly: warp, fc7, no box regression) and ``"default"`` (the
recipe chosen on validation splits of several datasets, see ``bench/own_dataset.py``). Settings
that depend on the data (the trunk's image size, the smallest proposal) are resolved from the
*training* annotations by :func:`data_geometry` and stored in the model, so detection uses them too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from rcnn.bbox_regression import LAMBDA, MIN_IOU, BoxRegressor, attach, train_box_regressor
from rcnn.cache import save_json
from rcnn.data import Dataset, ImageReadError, ImageRecord, load_dataset, load_image
from rcnn.detect import DetectStats, ModelError, RCNNModel, detect_dataset, detect_image, fit
from rcnn.evaluate import (
    CocoMetrics,
    Detections,
    EvalResult,
    coco_metrics,
    evaluate_model,
    save_pr_curves,
    write_coco_results,
    write_comp4,
)
from rcnn.features import FeatureConfig, check_layer, features_for_dataset
from rcnn.progress import ProgressFn, report
from rcnn.proposals import ProposalConfig, propose_dataset
from rcnn.sources import CNNFeatures, HOGFeatures
from rcnn.svm import SVMConfig

log = logging.getLogger(__name__)

#: the size (pixels, square root of the area) the median training object gets on the trunk's
#: input: ~10 cells of a stride-16 map, the scale of objects in the 227-px crops ImageNet nets
#: were trained on (BCCD: cells ~100 px in 480-px images → trunk at ×1.53)
TARGET_OBJECT_PX = 160.0
#: bounds of the trunk's image size (shorter side, pixels): below ~224 a stride-16 map has too
#: few cells to place a 6×6 grid; above ~1024 a 2-core CPU spends seconds per image in the trunk
SHORT_SIDE_RANGE = (224, 1024)
#: smallest proposal kept (pixels of the segmented image, paper: 20 at 500 px): half the 5th
#: percentile of the training objects' shorter sides there, within these bounds
MIN_SIZE_RANGE = (4.0, 20.0)


@dataclass(frozen=True)
class Recipe:
    """Every choice of a training run. ``"auto"`` fields are resolved from the training data by
    :func:`data_geometry` (and recorded in the model). See :data:`PRESETS`."""

    name: str = "default"
    backbone: str = "squeezenet1_1"
    weights: str | None = None
    layer: str = "pool5+fire5"
    mode: str = "shared"
    grid: int = 6
    precision: str = "fp32"
    scales: tuple[float, ...] = (1.0,)
    short_side: int | str | None = "auto"  # shared mode: trunk image size (shorter side, px)
    context_pad: int = 0
    proposals: str = "rcnn-fast"
    ks: tuple[int, ...] = (50, 100)
    resize_width: int | None = None  # None: the proposal mode's own (500 px for rcnn-fast)
    min_size: float | str | None = "auto"  # smallest proposal (px of the segmented image)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox_reg: bool = True  # paper appendix C ("R-CNN BB")
    bbox_lambda: float = LAMBDA
    relocalize: int = 1  # rounds of iterative localisation at detection (0 = the paper; 1 chosen on validation)
    finetune: int = 0  # SGD iterations of fine-tuning before the SVMs (paper §2.3; 0 = frozen ImageNet net)

    def __post_init__(self) -> None:
        if self.short_side not in ("auto", None) and int(self.short_side) < 16:
            raise ValueError(f"short_side must be 'auto', None or >= 16 pixels, not {self.short_side!r}")
        if self.min_size not in ("auto", None) and float(self.min_size) < 0:
            raise ValueError(f"min_size must be 'auto', None or >= 0, not {self.min_size!r}")
        if self.relocalize < 0:
            raise ValueError("relocalize must be >= 0")
        if self.relocalize and not self.bbox_reg:
            raise ValueError("iterative localisation (relocalize) needs box regression")
        if self.finetune < 0:
            raise ValueError("finetune (iterations) must be >= 0")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["svm"] = self.svm.key()
        return d


#: ``paper``: R-CNN as published (warp each region, fc7, SVMs, no box regression; proposal and
#: SVM settings of the released code). ``default``: shared trunk + hypercolumn taps + box
#: regression, image size from the data (chosen on validation splits, ``bench/own_dataset.py``).
PRESETS: dict[str, Recipe] = {
    "paper": Recipe(name="paper", layer="fc7", mode="warp", grid=6, scales=(1.5,), short_side=None, min_size=None,
                    bbox_reg=False, relocalize=0),
    "default": Recipe(),
}


def recipe(preset: str | Recipe = "default", **overrides) -> Recipe:
    """A preset by name (or a recipe) with ``overrides`` applied; ``ValueError`` for unknown names."""
    if isinstance(preset, Recipe):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    bad = [k for k in overrides if k not in Recipe.__dataclass_fields__]
    if bad:
        raise ValueError(f"unknown recipe setting(s) {bad}")
    if overrides.get("bbox_reg") is False and overrides.get("relocalize") is None:
        overrides = {**overrides, "relocalize": 0}  # relocalisation regresses boxes: off with box regression
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def check_recipe(rec: Recipe) -> None:
    """Raise ``ValueError`` (one line) if the recipe's network or layer cannot be built here, before any work."""
    if rec.backbone == "hog":
        return
    from rcnn.backbones import get_backbone

    check_layer(get_backbone(rec.backbone, rec.weights), rec.layer)
    FeatureConfig(backbone=rec.backbone, weights=rec.weights, layer=rec.layer, mode=rec.mode, grid=rec.grid,
                  precision=rec.precision, scales=rec.scales, context_pad=rec.context_pad)
    ProposalConfig(mode=rec.proposals, ks=rec.ks)


# ------------------------------------------------------------------ geometry from the data


@dataclass(frozen=True)
class Geometry:
    """Sizes resolved from a training set's annotations (pixels)."""

    short_side: int  # the trunk's input: each image resized to this shorter side
    min_size: float  # smallest proposal kept, in the segmented image
    median_relative_size: float  # median over objects of sqrt(area) / the image's shorter side
    objects: int


def data_geometry(records: list[ImageRecord], proposal_width: int = 500) -> Geometry:
    """The trunk's image size and the smallest proposal for a training set.

    Trunk: every image is resized so its median object is :data:`TARGET_OBJECT_PX` pixels
    (square root of the area), i.e. to a shorter side of ``TARGET_OBJECT_PX / r`` where ``r`` is
    the median over training objects of ``sqrt(area) / shorter image side``; rounded to 32 px,
    within :data:`SHORT_SIDE_RANGE`. Relative sizes make photos of any resolution look alike to
    the network (a 4000-px photo and a 400-px one of the same scene get the same trunk input).
    Proposals: half the 5th percentile of the objects' shorter sides, measured in the image as
    selective search segments it (``proposal_width`` px wide when wider), within
    :data:`MIN_SIZE_RANGE` (the paper's 20 px when objects are large)."""
    rel, sides = [], []
    for r in records:
        b = np.asarray(r.boxes, np.float64).reshape(-1, 4)
        if len(b) == 0:
            continue
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        ok = (w > 0) & (h > 0)
        rel.append(np.sqrt(w[ok] * h[ok]) / max(1, min(r.width, r.height)))
        seg = min(1.0, proposal_width / max(1, r.width)) if proposal_width else 1.0
        sides.append(np.minimum(w[ok], h[ok]) * seg)
    if not rel or not np.concatenate(rel).size:
        raise ValueError("the training split has no objects: nothing to size the detector by")
    rel_all, sides_all = np.concatenate(rel), np.concatenate(sides)
    r = float(np.median(rel_all))
    short = int(np.clip(round(TARGET_OBJECT_PX / max(r, 1e-6) / 32) * 32, *SHORT_SIDE_RANGE))
    min_size = float(np.clip(math.floor(0.5 * np.percentile(sides_all, 5)), *MIN_SIZE_RANGE))
    return Geometry(short, min_size, round(r, 4), int(rel_all.size))


def resolve(rec: Recipe, records: list[ImageRecord]) -> tuple[ProposalConfig, FeatureConfig, dict]:
    """The proposal and feature settings of ``rec`` for these training records (``"auto"`` fields
    from :func:`data_geometry`), plus a record of what was resolved."""
    pc = ProposalConfig(mode=rec.proposals, ks=rec.ks, resize_width=rec.resize_width,
                        min_size=None if rec.min_size == "auto" else rec.min_size)
    resolved: dict = {}
    short_side = rec.short_side
    if "auto" in (rec.short_side, rec.min_size):
        geo = data_geometry(records, pc.effective_resize_width)
        resolved = asdict(geo)
        if rec.min_size == "auto":
            pc = replace(pc, min_size=geo.min_size)
        if rec.short_side == "auto":
            short_side = geo.short_side if rec.mode == "shared" else None
    fc = FeatureConfig(backbone=rec.backbone, weights=rec.weights, layer=rec.layer, mode=rec.mode, grid=rec.grid,
                       precision=rec.precision, scales=rec.scales, context_pad=rec.context_pad,
                       short_side=None if short_side in (None, "auto") else int(short_side), with_gt=True)
    return pc, fc, resolved


# ------------------------------------------------------------------ detector


@dataclass
class ImageDetections:
    """Detections in one image: ``boxes`` ``(K,4)`` float32 xyxy pixel edges of the input image,
    ``scores`` ``(K,)`` (SVM margins: > 0 is the decision boundary), ``labels`` ``(K,)`` indices into
    ``class_names``; sorted by decreasing score."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels]


class Detector:
    """A trained R-CNN detector (:class:`rcnn.detect.RCNNModel`) with its feature source ready."""

    def __init__(self, model: RCNNModel):
        self.model = model
        self._source = None

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)

    @property
    def recipe(self) -> dict:
        """The recipe and resolved sizes the model was trained with (empty for older models)."""
        return dict(self.model.training.get("recipe", {}))

    @property
    def relocalize(self) -> int:
        return int(self.recipe.get("relocalize", 0)) if self.model.bbox_reg is not None else 0

    def source(self, dataset_root: str | Path | None = None):
        if dataset_root is not None:
            return self.model.feature_source(dataset_root)
        if self._source is None:
            self._source = self.model.feature_source()
        return self._source

    def detect(self, image: np.ndarray | str | Path, threshold: float | None = None, max_per_class: int | None = 100,
               relocalize: int | None = None) -> ImageDetections:
        """Detect in an RGB uint8 ``(H,W,3)`` image (or an image file): proposals → features → SVM
        scores → box regression → NMS (``threshold``: keep scores above it; None keeps all)."""
        img = load_image(image) if isinstance(image, str | Path) else np.asarray(image)
        rounds = self.relocalize if relocalize is None else int(relocalize)
        b, s, lab = detect_image(self.model, img, self.source(), threshold=threshold, max_per_class=max_per_class,
                                 relocalize_rounds=rounds)
        return ImageDetections(b, s, lab, self.classes)

    def save(self, path: str | Path) -> Path:
        return self.model.save(path)


def load(path: str | Path):
    """A detector from a model file written by :func:`train` / ``rcnn train`` (:class:`ModelError` if
    unusable), or a shipped detector by name (``rcnn models``): ``"bccd"``, ``"person"`` (a
    :class:`Detector`) or ``"imagenet"`` (the zero-training :class:`rcnn.demo.ImagenetDetector`;
    its ``detect(image)`` gives boxes, scores, labels and class names alike)."""
    if isinstance(path, str) and not Path(path).exists() and "/" not in path and not path.endswith(".rcnn"):
        from rcnn import zoo

        if path in zoo.names():
            shipped = zoo.load(path)
            return Detector(shipped) if isinstance(shipped, RCNNModel) else shipped
    return Detector(RCNNModel.load(path))


# ------------------------------------------------------------------ training


@dataclass
class PrepareSummary:
    """What :func:`prepare` did: proposal and feature caches of one split."""

    images: int = 0
    failed: list[str] = field(default_factory=list)  # one line per unreadable image (dropped)
    proposal_seconds: float = 0.0
    feature_seconds: float = 0.0
    features_computed: int = 0
    features_cached: int = 0
    cache_mb: float = 0.0


def open_dataset(data: Dataset | str | Path, split: str | None) -> Dataset:
    return data if isinstance(data, Dataset) else load_dataset(data, split)


def prepare(ds: Dataset, pc: ProposalConfig, fc: FeatureConfig | None, workers: int | None = None,
            progress: ProgressFn | None = None) -> PrepareSummary:
    """Fill the proposal and (CNN) feature caches of every image of ``ds``; unreadable images are
    reported in the summary and removed from ``ds.records`` (the rest is still usable)."""
    s = PrepareSummary(images=len(ds.records))
    t0 = time.perf_counter()
    ps = propose_dataset(ds, pc, workers=workers, progress=progress)
    s.proposal_seconds = time.perf_counter() - t0
    bad = {i for i, _ in ps.failed}
    s.failed += [msg for _, msg in ps.failed]
    ds.records = [r for r in ds.records if r.image_id not in bad]
    if fc is not None:
        fs = features_for_dataset(ds, pc, fc, progress=progress)
        s.feature_seconds, s.features_computed, s.features_cached = fs.seconds, fs.computed, fs.cached
        s.cache_mb = fs.cache_mb
        s.failed += fs.failed
        bad = {f.split(":")[0] for f in fs.failed}
        ds.records = [r for r in ds.records if str(r.path) not in bad]
    return s


def train(data: Dataset | str | Path, split: str | None = "trainval", preset: str | Recipe = "default", *,
          workers: int | None = None, progress: ProgressFn | None = None, net_path: str | Path | None = None,
          **overrides) -> Detector:
    """Train a detector on ``data`` (a dataset folder / COCO file, or a loaded :class:`Dataset`).

    ``preset``: ``"default"`` or ``"paper"`` (:data:`PRESETS`) or a :class:`Recipe`; ``overrides``:
    recipe fields to change (``layer="pool5"``, ``bbox_reg=False`` …). Fills the caches (resumable),
    trains the per-class SVMs with hard-negative mining (paper §2.3) and, unless turned off, the box
    regressors (appendix C). With ``finetune=N`` the network is first fine-tuned for N iterations on
    the training regions (paper §2.3, resumable) and written to ``net_path`` (default: the cache),
    which the model then references by path and hash. The model records the recipe, the resolved
    sizes and the timings."""
    rec = recipe(preset, **overrides)
    ds = open_dataset(data, split)
    if not ds.records:
        raise ValueError(f"{ds.root}: split {split!r} has no images")
    t0 = time.perf_counter()
    pc, fc, resolved = resolve(rec, ds.records)
    if rec.backbone == "hog":
        source = HOGFeatures(pc, ds.root)
        fc = None
    else:
        bb = fc.backbone_obj()
        check_layer(bb, fc.layer)
        source = CNNFeatures(pc, fc, ds.root, backbone=bb)
    if rec.finetune and fc is not None:
        fc, source = _finetuned(rec, ds, pc, fc, net_path, workers, progress)
    prep = prepare(ds, pc, fc, workers, progress)
    if not ds.records:
        raise ValueError(f"{ds.root}: no readable training images")
    t1 = time.perf_counter()
    model, _ = fit(ds, source, rec.svm, progress=progress)
    t2 = time.perf_counter()
    if rec.bbox_reg and not isinstance(source, CNNFeatures):
        log.warning("box regression needs CNN features: the HOG model is trained without it")
        rec = replace(rec, bbox_reg=False, relocalize=0)
    if rec.bbox_reg:
        attach(model, train_box_regressor(ds.records, model.classes, source, lam=rec.bbox_lambda, progress=progress))
    t3 = time.perf_counter()
    model.training["recipe"] = {**rec.as_dict(), "resolved": resolved}
    model.training["prepare"] = {k: v for k, v in asdict(prep).items() if k != "failed"} | {"failed": len(prep.failed)}
    model.training["seconds_total"] = round(t3 - t0, 1)
    model.training["seconds_by_stage"] = {"prepare": round(t1 - t0, 1), "svm": round(t2 - t1, 1),
                                          "bbox_reg": round(t3 - t2, 1)}
    return Detector(model)


def _finetuned(rec: Recipe, ds: Dataset, pc: ProposalConfig, fc: FeatureConfig, net_path, workers, progress):
    """Fine-tune ``fc``'s network on ``ds`` (shared-mode regions at the features' geometry, the new
    classifier on the pool5 RoI grid scaled to norm 20: the recipe measured to fine-tune SqueezeNet
    on a CPU) and return the feature settings and source of the fine-tuned net."""
    from rcnn.cache import cache_dir, settings_hash
    from rcnn.finetune import FinetuneConfig
    from rcnn.finetune import finetune as run_finetune

    propose_dataset(ds, pc, workers=workers, progress=progress)
    # the trunk sees each image at its detection size: the scale that brings the median image there
    short = np.median([min(r.width, r.height) for r in ds.records])
    scale = (fc.short_side / short) if fc.short_side else fc.scales[0]
    cfg = FinetuneConfig(backbone=fc.backbone, weights=fc.weights, mode="shared", iterations=rec.finetune,
                         scales=(round(float(scale), 4),), grid=fc.grid, tap="pool5", input_norm=20.0,
                         precision=fc.precision)
    if net_path is None:
        key = settings_hash(cfg.key(), pc.key(), str(Path(ds.root).resolve()), [r.image_id for r in ds.records])
        net_path = cache_dir() / "finetuned" / f"{fc.backbone}-{key}.safetensors"
    Path(net_path).parent.mkdir(parents=True, exist_ok=True)
    if not Path(net_path).is_file():
        run_finetune(ds.records, ds.classes, net_path, cfg, pc, ds.root, progress=progress)
    fc = replace(fc, weights=str(Path(net_path).resolve()))
    return fc, CNNFeatures(pc, fc, ds.root, backbone=fc.backbone_obj())


def add_box_regressor(model: RCNNModel, ds: Dataset, layer: str = "pool5", lam: float = LAMBDA,
                      min_iou: float = MIN_IOU, progress: ProgressFn | None = None,
                      ) -> tuple[BoxRegressor, PrepareSummary]:
    """Train per-class box regressors (paper appendix C) on the ``layer`` features of the model's
    network over ``ds`` (proposal and feature caches filled first; unreadable images left out)
    and attach them to ``model``. Returns the regressor and what filling the caches did."""
    reg_src = model.feature_source(ds.root).with_layer(layer)
    prep = prepare(ds, reg_src.proposal_config, reg_src.feature_config, None, progress)
    reg = train_box_regressor(ds.records, model.classes, reg_src, lam=lam, min_iou=min_iou)
    attach(model, reg)
    return reg, prep


# ------------------------------------------------------------------ evaluation


@dataclass
class Evaluation:
    """A detector scored on one split: VOC AP (``result``, ``map``), COCO metrics (``coco``:
    ``mAP@[.5:.95]``, ``AP50``, ``AP75``, ``APs``/``APm``/``APl``), the detections."""

    result: EvalResult
    coco: dict
    detections: Detections
    seconds_per_image: float
    images: int
    failed: list[str]
    warnings: list[str]
    no_proposals: list[str] = field(default_factory=list)  # image ids without a region proposal
    prepare: PrepareSummary | None = None  # the caches filled first (its ``failed``: images left out)
    coco_metrics: CocoMetrics | None = None  # ``coco`` as computed (``line()`` for one printed line)

    @property
    def map(self) -> float:
        return self.result.mean_ap

    @property
    def per_class(self) -> dict[str, float]:
        return {c.name: c.ap for c in self.result.classes}

    def as_dict(self) -> dict:
        return {**self.result.as_dict(), "coco": self.coco, "seconds_per_image": round(self.seconds_per_image, 4),
                "images": self.images, "failed": self.failed, "warnings": self.warnings}


def evaluate(model: Detector | RCNNModel | str | Path, data: Dataset | str | Path, split: str | None = "test",
             metric: str = "voc07", *, relocalize: int | None = None, threshold: float | None = None,
             bbox_reg: bool = True, flip: bool = False, workers: int | None = None,
             progress: ProgressFn | None = None, source=None) -> Evaluation:
    """Detect on every image of ``split`` (proposals and features from the caches, filled first) and
    score: VOC AP (``metric`` ``voc07`` or ``voc2010``) and COCO mAP@[.5:.95] / AP50 / AP75.
    ``relocalize``: rounds of iterative localisation (None: the model's recipe); ``bbox_reg=False``
    scores the proposals' own boxes; ``flip``: test-time flip averaging (CNN features only);
    ``source``: the model's feature source for the dataset, when the caller built it already."""
    det = model if isinstance(model, Detector) else Detector(model if isinstance(model, RCNNModel) else
                                                             RCNNModel.load(model))
    ds = open_dataset(data, split)
    src = source or det.model.feature_source(ds.root, flip=True if flip else None)
    pc = det.model.proposal_config()
    prep = prepare(ds, pc, getattr(src, "feature_config", None), workers, progress)
    stats = DetectStats()
    rounds = (det.relocalize if bbox_reg else 0) if relocalize is None else int(relocalize)
    if rounds and (det.model.bbox_reg is None or not bbox_reg):
        raise ModelError("iterative localisation needs box regression (a model with a box regressor, bbox_reg=True)")
    dets = detect_dataset(det.model, ds, src, threshold=threshold, stats=stats, bbox_reg=bbox_reg,
                          relocalize_rounds=rounds, progress=progress)
    result, warnings = evaluate_model(det.model, ds, dets, metric)
    coco = coco_metrics(ds, dets, det.model.classes)
    return Evaluation(result, coco.as_dict(), dets, stats.seconds_per_image, stats.images, prep.failed + stats.failed,
                      warnings, stats.no_proposals, prep, coco)


def write_detections(dets: Detections, classes: Sequence[str], out_dir: str | Path, split: str,
                     skip_empty: bool = False) -> None:
    """``out_dir/detections_coco.json`` (category ids 1..len(classes)) and the VOC comp4 files of
    ``split`` (``skip_empty``: only for classes with detections)."""
    write_coco_results(dets, list(range(1, len(classes) + 1)), Path(out_dir) / "detections_coco.json")
    write_comp4(dets, classes, out_dir, split, skip_empty=skip_empty)


def write_evaluation(ev: Evaluation, classes: Sequence[str], out_dir: str | Path, meta: dict) -> list[Path]:
    """``out_dir/results.json`` (AP table, COCO metrics, ``meta``, warnings, timing), one PR-curve
    PNG per class with a defined AP, and the detections (:func:`write_detections` of
    ``meta["split"]``). Returns the PR-curve paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "results.json", {**ev.result.as_dict(), "coco": ev.coco, **meta, "warnings": ev.warnings,
                                         "images": ev.images, "seconds_per_image_cached": ev.seconds_per_image,
                                         "no_proposals": ev.no_proposals})
    pngs = save_pr_curves(ev.result, out_dir)
    write_detections(ev.detections, classes, out_dir, meta["split"])
    return pngs


# ------------------------------------------------------------------ image files


@dataclass
class FileDetections:
    """What :func:`detect_files` did: the detections (image ids: file stems) and the files it
    could not read (one line each)."""

    detections: Detections
    images: int
    failed: list[str]


def detect_files(images: Sequence[Path], detect_one: Callable[[np.ndarray, Path], tuple], classes: Sequence[str],
                 out_dir: Path, png: bool = True, progress: ProgressFn | None = None,
                 on_error: Callable[[str], None] | None = None) -> FileDetections:
    """Run ``detect_one(rgb uint8 (H,W,3) image, path) -> (boxes (K,4) xyxy px, scores (K,), labels
    (K,) indices into classes)`` over image files, into ``out_dir``: COCO results JSON, comp4 files
    (only classes with detections) and, with ``png``, an annotated PNG per image. An unreadable
    file is passed to ``on_error`` (one line) and skipped."""
    from rcnn.visualize import draw_detections, save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    parts, failed = [], []
    for i, p in enumerate(images):
        try:
            img = load_image(p)
        except ImageReadError as e:
            failed.append(str(e))
            if on_error is not None:
                on_error(str(e))
            report(progress, "detect", i + 1, len(images))
            continue
        t0 = time.perf_counter()
        b, s, lab = detect_one(img, p)
        dt = time.perf_counter() - t0
        parts.append(Detections(np.array([p.stem] * len(s), dtype=object), b, s, lab))
        if png:
            save_png(out_dir / f"{p.stem}.png", draw_detections(img, b, lab, s, classes))
        counts = ", ".join(f"{classes[c]} {int((lab == c).sum())}" for c in np.unique(lab)) or "nothing"
        report(progress, "detect", i + 1, len(images), f"{p.name}: {counts} ({dt:.1f} s)")
    dets = Detections.concat(parts)
    write_detections(dets, classes, out_dir, "detect", skip_empty=True)
    return FileDetections(dets, len(parts), failed)


__all__ = [
    "PRESETS",
    "Detector",
    "Evaluation",
    "FileDetections",
    "Geometry",
    "ImageDetections",
    "ImageReadError",
    "PrepareSummary",
    "Recipe",
    "add_box_regressor",
    "check_recipe",
    "data_geometry",
    "detect_files",
    "evaluate",
    "load",
    "prepare",
    "recipe",
    "resolve",
    "train",
    "write_detections",
    "write_evaluation",
]
