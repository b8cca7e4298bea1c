"""Supervised fine-tuning of a pretrained backbone on warped (or RoI-pooled) regions (paper §2.3).

What the paper does (§2.3 "Domain-specific fine-tuning"), and what :func:`finetune` does:

* the 1000-way ImageNet classifier is replaced by a randomly initialised ``(N+1)``-way layer
  (N object classes + background), Gaussian std 0.01, bias 0 (Caffe's fc8 init);
* every proposal (and every ground-truth box) with IoU ≥ 0.5 to a ground-truth box is a positive
  of that box's class, the rest are background;
* each SGD iteration samples 2 images and 64 regions from each (mini-batch 128), at most a
  quarter positive (Fast R-CNN's rule: up to 16 positives per image, background fills the rest;
  BCCD images have far more than 16 positive proposals, so the batches are 1/4 positive);
* SGD, momentum 0.9, weight decay 5e-4, learning rate 1/10 of the pre-training rate (the paper:
  "0.001, 1/10th of the initial pre-training rate"; see :data:`BASE_LR`), step decay ×0.1;
* horizontal flips (each sampled image is mirrored with probability 1/2).

Two modes: ``warp`` (faithful: every region is warped to the network input and the whole network
runs per region, §2.1) and ``shared`` (Fast R-CNN style: the trunk runs once per image at the
feature extractor's scale, each region is RoIAligned onto the head's grid and gradients flow back
through RoIAlign into the trunk). The new classifier reads the backbone's ``fc7`` tap (AlexNet:
fc7 → fc8; SqueezeNet: the global mean of fire9, i.e. what conv10 reads; EfficientNet: the
pooled conv_head embedding), after dropout 0.5. Options (not the paper's defaults):
``tap="pool5"`` (the classifier reads the flattened RoI grid, Fast R-CNN style), ``input_norm``
(the tap times a constant measured on the pre-trained net so its mean L2 norm is e.g. 20 —
SqueezeNet's raw norm of ~100–400 makes SGD on the new layer oscillate) and ``precision="bf16"``
(CPU bfloat16 autocast of forward and backward).

Robustness: a checkpoint (parameters, SGD momentum buffers, torch RNG state, history, config) is
written atomically every ``checkpoint_every`` iterations and carries a sha256 of its tensors; a
corrupt one is reported (:class:`CheckpointError`). Sampling, flips and dropout are seeded *per
iteration* from ``(seed, iteration)``, so a run resumed after a kill is bit-identical to an
uninterrupted one.

The result is a fine-tuned network file (:func:`rcnn.backbones.save_finetuned`: the whole network's
state dict, the new classifier and a header with classes, preprocessing, settings and history).
``rcnn.backbones.get_backbone(base, weights=that_file)`` loads it like any backbone, with an extra
tap :data:`rcnn.backbones.FT_TAP` = the fine-tuned ``(N+1)``-way log-softmax;
:func:`rcnn.detect.softmax_model` wraps that tap as a detector model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcnn.backbones import Backbone, build_backbone, save_finetuned, set_threads
from rcnn.boxes import box_area, box_iou, flip_boxes
from rcnn.cache import atomic_write, save_json, settings_hash
from rcnn.data import ImageRecord, load_image
from rcnn.device import PRECISIONS, autocast
from rcnn.features import roi_cells, scaled_image, warp_regions
from rcnn.progress import ProgressFn, report

log = logging.getLogger(__name__)

CKPT_VERSION = 1

#: Fine-tuning learning rate per backbone = 1/10 of the base rate it was pre-trained with
#: (paper §2.3: 0.001 for CaffeNet, pre-trained at 0.01).
#:   alexnet / vgg*: pre-trained at 0.01 (SGD)                      → 0.001 (paper)
#:   squeezenet1_1: pre-trained at 0.04 (SqueezeNet v1.1 Caffe solver) → 0.004
#:   efficientnet_lite0: 0.016 per 256 images (TF reference, RMSProp) → 0.0016
#:   resnet* / other torchvision classifiers: 0.1 (SGD)              → 0.01
#: (The paper's ratio: 0.001 for CaffeNet pre-trained at 0.01.)
BASE_LR = {"alexnet": 0.001, "vgg": 0.001, "squeezenet1_1": 0.004, "efficientnet_lite0": 0.0016}
DEFAULT_LR = 0.01


def default_lr(backbone: str) -> float:
    """Fine-tuning learning rate of ``backbone`` (1/10 of its pre-training rate, see :data:`BASE_LR`)."""
    for k, v in BASE_LR.items():
        if backbone == k or backbone.startswith(k):
            return v
    return DEFAULT_LR


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (one line naming the file and the problem)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning run (all but the bookkeeping ones enter :meth:`key`)."""

    backbone: str = "squeezenet1_1"
    weights: str | None = None
    mode: str = "warp"  # paper §2.3 fine-tunes on warped regions; "shared" = Fast R-CNN style
    iterations: int = 1000
    lr: float | None = None  # None: default_lr(backbone), 1/10 of the pre-training rate (§2.3)
    momentum: float = 0.9  # paper §2.3 (Caffe solver)
    weight_decay: float = 5e-4  # paper §2.3 (Caffe solver)
    step_size: int | None = None  # lr ×gamma every step_size iterations; None: at 2/3 of the run
    gamma: float = 0.1  # Caffe "step" policy
    images_per_batch: int = 2  # paper §2.3: 32 positive + 96 background windows per 128 batch; 2 images × 64
    rois_per_image: int = 64
    fg_fraction: float = 0.25  # paper §2.3: batches biased to 1/4 positives
    fg_iou: float = 0.5  # paper §2.3: IoU ≥ 0.5 → positive of that box's class
    flip: bool = True  # horizontal flip augmentation
    dropout: float = 0.5  # before the new classifier (AlexNet fc layers / SqueezeNet's classifier use 0.5)
    seed: int = 0
    # region geometry: must match the features the detector later extracts
    context_pad: int = 0  # warp mode (features.FeatureConfig default, paper §2.1 tight box)
    method: str = "warp"
    scales: tuple[float, ...] = (1.5,)  # shared mode: image scale (features.SHARED_SCALES)
    grid: int = 6  # shared mode RoI grid (features.SHARED_GRID)
    max_side: int = 2000
    freeze: int = 0  # number of leading trunk modules kept frozen (0: fine-tune everything, §2.3)
    # which tap the new classifier reads: paper §2.3 replaces fc8, i.e. reads fc7. "pool5": the RoI
    # grid flattened (Fast R-CNN's classifier reads the RoI-pooled grid through its fc layers);
    # SqueezeNet/EfficientNet have no fc layers and their "fc7" is a global mean that discards
    # where the object sits in the box (frozen fc7 0.07 vs pool5 0.72 mAP on BCCD).
    tap: str = "fc7"
    # None (paper): the tap as it is. A number: the tap is multiplied by a constant (measured once
    # on the pre-trained net) that brings its mean L2 norm to this value, like the SVM features
    # (rcnn_scale_features, 20). SqueezeNet's fire9 has norm ~110 (fc7) / ~420 (pool5 3×3): SGD
    # on a linear softmax over such inputs oscillates at lr 0.004 (effective step lr·|x|² ≫ 1).
    input_norm: float | None = None
    precision: str = "fp32"  # "bf16": CPU bfloat16 autocast for forward/backward (rcnn.device)
    val_images: int = 16  # training images held out for the validation curve (every k-th image)
    val_every: int = 50
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.mode not in ("warp", "shared"):
            raise ValueError(f"mode must be 'warp' or 'shared', not {self.mode!r}")
        if self.iterations < 1 or self.images_per_batch < 1 or self.rois_per_image < 1:
            raise ValueError("iterations, images_per_batch and rois_per_image must be ≥ 1")
        if not 0 <= self.fg_fraction <= 1:
            raise ValueError(f"fg_fraction must be in [0, 1], not {self.fg_fraction}")
        if self.tap not in ("fc7", "fc6", "pool5"):
            raise ValueError(f"tap must be fc7, fc6 or pool5, not {self.tap!r}")
        if self.input_norm is not None and not self.input_norm > 0:
            raise ValueError(f"input_norm must be positive, not {self.input_norm}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.backbone)

    @property
    def step(self) -> int:
        return self.step_size or max(1, round(self.iterations * 2 / 3))

    def lr_at(self, it: int) -> float:
        return self.base_lr * self.gamma ** (it // self.step)

    def key(self) -> str:
        d = asdict(self)
        for k in ("val_every", "checkpoint_every"):
            d.pop(k)
        # settings added later enter the key only when not at their default (old runs keep their key)
        for k, default in (("tap", "fc7"), ("input_norm", None), ("precision", "fp32")):
            if d[k] == default:
                d.pop(k)
        return settings_hash("finetune", d)


# ----------------------------------------------------------------------------- region labels


def label_regions(record: ImageRecord, proposals: np.ndarray, fg_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth boxes + proposals of one image and their labels (paper §2.3).

    Returns ``boxes (M,4) float32`` and ``labels (M,) int64``: ``1 + class`` of the ground-truth
    box with the highest IoU when that IoU ≥ ``fg_iou``, else 0 (background). Zero-area boxes are
    dropped (BCCD has degenerate annotations)."""
    gt = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    glab = np.asarray(record.labels, np.int64).reshape(-1)
    boxes = np.concatenate([gt, np.asarray(proposals, np.float32).reshape(-1, 4)])
    boxes = boxes[box_area(boxes) > 0]
    labels = np.zeros(len(boxes), np.int64)
    ok = box_area(gt) > 0
    if ok.any() and len(boxes):
        iou = box_iou(boxes, gt[ok])
        best = iou.argmax(1)
        pos = iou.max(1) >= fg_iou
        labels[pos] = glab[ok][best[pos]] + 1
    return boxes, labels


def sample_regions(labels: np.ndarray, n: int, fg_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` regions: up to ``round(fg_fraction·n)`` positives (without replacement),
    background for the rest (with replacement only if an image has fewer than needed)."""
    fg = np.flatnonzero(labels > 0)
    bg = np.flatnonzero(labels == 0)
    n_fg = min(len(fg), round(fg_fraction * n))
    pick = [rng.choice(fg, n_fg, replace=False)] if n_fg else []
    n_bg = n - n_fg
    if len(bg):
        pick.append(rng.choice(bg, n_bg, replace=len(bg) < n_bg))
    elif n_bg and len(fg):  # no background at all: fill with positives
        pick.append(rng.choice(fg, n_bg, replace=True))
    return np.concatenate(pick).astype(np.int64) if pick else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- the network


class FinetuneNet(nn.Module):
    """A backbone plus a new ``(N+1)``-way classifier on its ``fc7`` tap."""

    def __init__(self, bb: Backbone, num_classes: int, config: FinetuneConfig, init_seed: int = 0):
        super().__init__()
        self.bb = bb
        self.config = config
        self.net = bb.modules
        dim = bb.dim(config.tap, config.grid)
        #: constant factor on the tap (see FinetuneConfig.input_norm); set by measure_input_scale
        self.input_scale = 1.0
        self.cls = nn.Linear(dim, num_classes + 1)
        g = torch.Generator().manual_seed(init_seed)
        with torch.no_grad():  # Caffe fc8 init: N(0, 0.01²), bias 0
            self.cls.weight.copy_(torch.randn(self.cls.weight.shape, generator=g) * 0.01)
            self.cls.bias.zero_()
        self.drop = nn.Dropout(config.dropout)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        frozen = set()
        for i, mod in enumerate(self.bb.trunk.children()):
            if i < self.config.freeze:
                frozen |= {id(p) for p in mod.parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in frozen]

    def set_train(self, on: bool) -> None:
        self.train(on)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # BN statistics stay frozen (2 images per batch are too few to estimate them)

    def forward_regions(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> torch.Tensor:
        """Logits ``(sum M_i, N+1)`` (float32) of the regions ``boxes[i]`` (M_i,4) of RGB uint8 ``images[i]``."""
        with autocast(torch.device("cpu"), self.config.precision):
            feat = self.tap_features(images, boxes)
            logits = self.cls(self.drop(feat * self.input_scale))
        return logits.float()

    def tap_features(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> torch.Tensor:
        """The (unscaled) tap the classifier reads, ``(sum M_i, D)``."""
        bb, c = self.bb, self.config
        if c.mode == "warp":
            crops = np.concatenate([warp_regions(im, b, bb.input_size, c.context_pad, c.method, fill=bb.mean_rgb(),
                                                 interpolation=bb.interpolation) for im, b in zip(images, boxes, strict=True)])
            x = bb.preprocess(crops)
            grid = bb.to_grid(bb.trunk(x))
            g = c.grid if c.tap == "pool5" else None  # the features' grid (rcnn.features: FeatureConfig.grid)
        else:
            pooled = []
            g = c.grid
            for im, b in zip(images, boxes, strict=True):
                img, sx, sy = scaled_image(im, c.scales[0], c.max_side, bb.interpolation)
                fmap = bb.trunk(bb.preprocess(img[None]))
                # Fast R-CNN: gradients flow through RoIAlign into the shared trunk map
                pooled.append(roi_cells(fmap, np.asarray(b, np.float32) * np.array([sx, sy, sx, sy], np.float32), g,
                                        bb.stride))
            grid = torch.cat(pooled)
        return bb.head(grid, [c.tap], g)[c.tap]


# ----------------------------------------------------------------------------- data


class RegionData:
    """Images (decoded once, kept in RAM) and labelled regions of the training records."""

    def __init__(self, records: Sequence[ImageRecord], proposal_config, dataset_root, fg_iou: float,
                 progress: Callable[[int, int], None] | None = None):
        from rcnn.proposals import get_proposals

        self.records = list(records)
        self.boxes: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self._images: dict[int, np.ndarray] = {}
        for i, r in enumerate(self.records):
            props = get_proposals(r, proposal_config, dataset_root)
            b, lab = label_regions(r, props, fg_iou)
            self.boxes.append(b)
            self.labels.append(lab)
            if progress:
                progress(i + 1, len(self.records))

    def image(self, i: int) -> np.ndarray:
        if i not in self._images:
            self._images[i] = load_image(self.records[i].path)
        return self._images[i]

    def batch(self, idx: Sequence[int], n: int, fg_fraction: float, rng: np.random.Generator, flip: bool):
        """Sample ``n`` regions of each image ``idx``: (images, boxes, labels) lists."""
        ims, bxs, labs = [], [], []
        for i in idx:
            sel = sample_regions(self.labels[i], n, fg_fraction, rng)
            im, b = self.image(i), self.boxes[i][sel]
            if flip and rng.random() < 0.5:
                im, b = im[:, ::-1], flip_boxes(b, im.shape[1])
            ims.append(np.ascontiguousarray(im))
            bxs.append(b)
            labs.append(self.labels[i][sel])
        return ims, bxs, np.concatenate(labs)


def split_validation(records: Sequence[ImageRecord], n_val: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out ``n_val`` evenly spaced images (a fixed, documented choice) for the validation curve."""
    recs = list(records)
    if n_val <= 0 or len(recs) < 2:
        return recs, []
    n_val = min(n_val, len(recs) // 2)
    step = len(recs) / n_val
    val_idx = {int(i * step + step / 2) for i in range(n_val)}
    return [r for i, r in enumerate(recs) if i not in val_idx], [r for i, r in enumerate(recs) if i in val_idx]


def _iter_rng(seed: int, it: int) -> np.random.Generator:
    return np.random.default_rng([seed, it])


def batch_images(it: int, n_images: int, per_batch: int, seed: int) -> list[int]:
    """Image indices of iteration ``it``: a fresh seeded permutation each epoch, consumed in order."""
    out = []
    for j in range(per_batch):
        k = it * per_batch + j
        epoch, pos = divmod(k, n_images)
        out.append(int(np.random.default_rng([seed, 1_000_003, epoch]).permutation(n_images)[pos]))
    return out


# ----------------------------------------------------------------------------- checkpoints


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach()
        h.update(k.encode())
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())  # C-order bytes whatever the memory layout
    return h.hexdigest()


def save_checkpoint(path: Path, net: FinetuneNet, opt: torch.optim.Optimizer, it: int, history: dict, config: FinetuneConfig) -> Path:
    """Atomically write parameters, momentum buffers and RNG state after ``it`` iterations."""
    from safetensors.torch import save_file

    tensors = {f"param.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{names[id(p)]}"] = buf.detach().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"version": CKPT_VERSION, "iteration": it, "config_key": config.key(), "history": history}
    digest = _tensor_digest(tensors)
    header = {"rcnn_checkpoint": json.dumps(meta), "sha256": digest}
    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header))


def load_checkpoint(path: Path, net: FinetuneNet, opt: torch.optim.Optimizer, config: FinetuneConfig) -> tuple[int, dict]:
    """Restore a checkpoint into ``net``/``opt``; returns ``(iteration, history)``.

    Raises :class:`CheckpointError` if the file is unreadable, its tensors do not hash to the
    recorded sha256 (corrupt), or it belongs to a run with different settings."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}); delete it to restart") from None
    if "rcnn_checkpoint" not in header or "sha256" not in header:
        raise CheckpointError(f"{path}: not an rcnn fine-tuning checkpoint")
    if _tensor_digest(tensors) != header["sha256"]:
        raise CheckpointError(f"{path}: checkpoint is corrupt (sha256 of its tensors does not match its header); "
                              "delete it to restart")
    meta = json.loads(header["rcnn_checkpoint"])
    if meta.get("config_key") != config.key():
        raise CheckpointError(f"{path}: checkpoint was written with different fine-tuning settings; "
                              "use the same settings or delete it to restart")
    sd = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    net.load_state_dict(sd, strict=True)
    params = dict(net.named_parameters())
    for k, v in tensors.items():
        if k.startswith("momentum."):
            opt.state[params[k[len("momentum."):]]]["momentum_buffer"] = v.clone()
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["iteration"]), meta["history"]


# ----------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    """What :func:`finetune` did."""

    output: Path
    iterations: int
    seconds: float  # training time of this process (excludes time before a resume)
    seconds_per_iteration: float
    history: dict = field(default_factory=dict)
    resumed_from: int = 0


def _make_optimizer(net: FinetuneNet, c: FinetuneConfig) -> torch.optim.SGD:
    # Caffe convention of the released prototxts: biases at 2× the rate and without weight decay
    params = net.trainable()
    w = [p for n, p in params if not n.endswith("bias")]
    b = [p for n, p in params if n.endswith("bias")]
    return torch.optim.SGD([{"params": w, "lr_mult": 1.0, "weight_decay": c.weight_decay},
                            {"params": b, "lr_mult": 2.0, "weight_decay": 0.0}],
                           lr=c.base_lr, momentum=c.momentum)


@torch.no_grad()
def measure_input_scale(net: FinetuneNet, data: RegionData, c: FinetuneConfig, n_images: int = 4) -> float:
    """``c.input_norm`` / mean L2 norm of the tap over 64 seeded regions of each of the first
    ``n_images`` training images, on the network as it is (call before training: a pure function
    of the pre-trained weights, so a resumed run recomputes the same constant). 1.0 if unset."""
    if c.input_norm is None:
        return 1.0
    net.set_train(False)
    norms = []
    for i in range(min(n_images, len(data.records))):
        rng = np.random.default_rng([c.seed, 5_555_555, i])
        ims, bxs, _ = data.batch([i], c.rois_per_image, c.fg_fraction, rng, flip=False)
        norms.append(net.tap_features(ims, bxs).float().norm(dim=1))
    mean = float(torch.cat(norms).mean()) if norms else 0.0
    return float(c.input_norm / mean) if mean > 0 else 1.0


@torch.no_grad()
def validate(net: FinetuneNet, data: RegionData, c: FinetuneConfig) -> dict:
    """Loss / accuracy / foreground accuracy on a fixed sample of the held-out images (no flips)."""
    net.set_train(False)
    loss_sum, correct, n, fg_ok, fg_n = 0.0, 0, 0, 0, 0
    for i in range(len(data.records)):
        rng = np.random.default_rng([c.seed, 7_777_777, i])
        ims, bxs, lab = data.batch([i], c.rois_per_image, c.fg_fraction, rng, flip=False)
        if len(lab) == 0:
            continue
        logits = net.forward_regions(ims, bxs)
        y = torch.from_numpy(lab)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1)
        correct += int((pred == y).sum())
        n += len(y)
        fg = y > 0
        fg_ok += int((pred[fg] == y[fg]).sum())
        fg_n += int(fg.sum())
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "fg_accuracy": fg_ok / max(fg_n, 1),
            "regions": n}


def finetune(
    records: Sequence[ImageRecord],
    classes: Sequence[str],
    output: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
    proposal_config=None,
    dataset_root: str | Path | None = None,
    val_records: Sequence[ImageRecord] | None = None,
    checkpoint: str | Path | None = None,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
    threads: int | None = None,
) -> FinetuneResult:
    """Fine-tune ``config.backbone`` on ``records`` and write the net to ``output`` (safetensors).

    ``val_records``: images for the validation curve (default: ``config.val_images`` evenly spaced
    images held out of ``records``). ``checkpoint``: file to resume from / write to (default
    ``<output>.ckpt``); an existing one is resumed (after its hash is verified). ``stop_after``:
    stop (after checkpointing) once this many iterations are done — simulates a kill in tests.
    Writes ``<output stem>.curve.json`` and ``.curve.png`` next to ``output``.

    One function on purpose: the SGD loop, its validation and its checkpoints share the net,
    optimiser, sampler and RNG state that a resumed run must restore exactly; split apart they
    would be passed around as one bundle of mutable state.
    """
    from rcnn.proposals import ProposalConfig

    c = config
    set_threads(threads)
    pc = proposal_config or ProposalConfig()
    output = Path(output)
    ckpt = Path(checkpoint) if checkpoint else output.with_name(output.name + ".ckpt")
    if val_records is None:
        train_recs, val_recs = split_validation(records, c.val_images)
    else:
        train_recs, val_recs = list(records), list(val_records)
    if not train_recs:
        raise ValueError("no training images")
    torch.manual_seed(c.seed)
    bb = build_backbone(c.backbone, c.weights)
    net = FinetuneNet(bb, len(classes), c, init_seed=c.seed)
    for _, p in net.named_parameters():
        p.requires_grad_(False)
    for _, p in net.trainable():
        p.requires_grad_(True)
    opt = _make_optimizer(net, c)
    history: dict = {"train": [], "val": []}
    start = 0
    if ckpt.is_file():
        start, history = load_checkpoint(ckpt, net, opt, c)
        log.info("resumed from %s at iteration %d", ckpt, start)
    n_prep = len(train_recs) + len(val_recs)
    done = [0]

    def tick(i: int, n: int) -> None:
        done[0] += 1
        report(progress, "labelling regions", done[0], n_prep)

    train = RegionData(train_recs, pc, dataset_root, c.fg_iou, tick)
    val = RegionData(val_recs, pc, dataset_root, c.fg_iou, tick) if val_recs else None
    if start == 0:
        net.input_scale = measure_input_scale(net, train, c)
    else:  # measured on the pre-trained net at iteration 0, kept in the checkpoint's history
        net.input_scale = float(history.get("input_scale", 1.0))
    history["input_scale"] = net.input_scale
    n_pos = int(sum((lab > 0).sum() for lab in train.labels))
    n_all = int(sum(len(lab) for lab in train.labels))
    task = f"fine-tune {c.backbone} ({c.mode})"
    report(progress, task, start, c.iterations)
    t0 = time.perf_counter()
    end = c.iterations if stop_after is None else min(c.iterations, stop_after)
    it = start
    while it < end:
        for g in opt.param_groups:
            g["lr"] = c.lr_at(it) * g["lr_mult"]
        rng = _iter_rng(c.seed, it)
        torch.manual_seed(int(rng.integers(2**62)))  # dropout of this iteration (resume-exact)
        idx = batch_images(it, len(train.records), c.images_per_batch, c.seed)
        ims, bxs, lab = train.batch(idx, c.rois_per_image, c.fg_fraction, rng, c.flip)
        net.set_train(True)
        with torch.enable_grad():  # robust to a caller that disabled autograd globally
            logits = net.forward_regions(ims, bxs)
            y = torch.from_numpy(lab)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning diverged at iteration {it} (loss {float(loss)}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = float((logits.detach().argmax(1) == y).float().mean())
        loss = loss.detach()
        it += 1
        history["train"].append({"iteration": it, "loss": round(float(loss), 5), "accuracy": round(acc, 4),
                                 "fg_fraction": round(float((y > 0).float().mean()), 4), "lr": c.lr_at(it - 1)})
        if val is not None and (it % c.val_every == 0 or it == c.iterations):
            v = validate(net, val, c)
            history["val"].append({"iteration": it, **{k: round(x, 5) if isinstance(x, float) else x for k, x in v.items()}})
        if it % c.checkpoint_every == 0 or it == end:
            save_checkpoint(ckpt, net, opt, it, history, c)
        if progress is not None:
            el = time.perf_counter() - t0
            rate = (it - start) / el if el > 0 else 0.0
            last_val = history["val"][-1] if history["val"] else None
            info = f"{rate:.2f} it/s · loss {float(loss):.3f} · acc {acc:.2f}"
            if last_val:
                info += f" · val loss {last_val['loss']:.3f} acc {last_val['accuracy']:.2f}"
            report(progress, task, it, c.iterations, info)
    seconds = time.perf_counter() - t0
    history["data"] = {"train_images": len(train_recs), "val_images": len(val_recs), "train_regions": n_all,
                       "train_positives": n_pos}
    history["seconds_this_run"] = round(seconds, 1)
    history["seconds_total"] = round(history.get("seconds_total_before", 0.0) + seconds, 1)
    if it >= c.iterations:
        _save_net(output, net, classes, c, history)
        write_curve(history, output)
    else:  # stopped early: keep the total time across resumes in the checkpoint's history
        history["seconds_total_before"] = history["seconds_total"]
        save_checkpoint(ckpt, net, opt, it, history, c)
    return FinetuneResult(output, it, seconds, seconds / max(it - start, 1), history, start)


def _save_net(path: Path, net: FinetuneNet, classes: Sequence[str], c: FinetuneConfig, history: dict) -> Path:
    """The fine-tuned network as a backbone weights file (:func:`rcnn.backbones.save_finetuned`)."""
    bb = net.bb
    meta = {
        "base": c.backbone, "classes": ["__background__", *classes], "input_size": bb.input_size, "color": bb.color,
        "mean": list(bb.mean), "std": list(bb.std), "tap": c.tap, "grid": c.grid, "input_scale": net.input_scale,
        "config": asdict(c), "lr": c.base_lr,
        "iterations": c.iterations, "history_summary": {"val": history.get("val", [])[-1:], "data": history.get("data")},
        "seconds_total": history.get("seconds_total"),
    }
    return save_finetuned(path, net.net.state_dict(), net.cls.weight, net.cls.bias, meta)


# ----------------------------------------------------------------------------- outputs


def write_curve(history: dict, output: Path) -> tuple[Path, Path]:
    """``<stem>.curve.json`` (the whole history) and ``<stem>.curve.png`` (training loss smoothed
    over 20 iterations, validation loss and accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = output.with_suffix("")
    jpath = save_json(base.with_name(base.name + ".curve.json"), history)
    tr, va = history.get("train", []), history.get("val", [])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    if tr:
        its = np.array([h["iteration"] for h in tr])
        loss = np.array([h["loss"] for h in tr])
        k = min(20, len(loss))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax[0].plot(its, loss, color="0.8", lw=0.6, label="train (per iteration)")
        ax[0].plot(its[k - 1:], smooth, color="C0", label=f"train (mean of {k})")
    if va:
        ax[0].plot([h["iteration"] for h in va], [h["loss"] for h in va], "o-", color="C1", label="validation")
        ax[1].plot([h["iteration"] for h in va], [h["accuracy"] for h in va], "o-", color="C1", label="val accuracy")
        ax[1].plot([h["iteration"] for h in va], [h["fg_accuracy"] for h in va], "s--", color="C2",
                   label="val accuracy (positives)")
    ax[0].set_xlabel("iteration")
    ax[0].set_ylabel("cross-entropy")
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    ax[1].set_xlabel("iteration")
    ax[1].set_ylabel("accuracy")
    ax[1].set_ylim(0, 1)
    if va:
        ax[1].legend()
    ax[1].grid(alpha=0.3)
    fig.suptitle("fine-tuning (128 regions / iteration, 1/4 positive)")
    fig.tight_layout()
    ppath = base.with_name(base.name + ".curve.png")
    fig.savefig(ppath, dpi=90)
    plt.close(fig)
    return jpath, ppath


__all__ = [
    "BASE_LR", "CheckpointError", "FinetuneConfig", "FinetuneNet", "FinetuneResult", "default_lr", "finetune",
    "label_regions", "load_checkpoint", "measure_input_scale", "sample_regions", "save_checkpoint", "split_validation",
    "validate", "write_curve",
]
