"""A learned, class-agnostic mask predictor on frozen CNN features (mask proposals ``"cnn"``).

The grouping pool caps mask recall (README, Semantic segmentation): pedestrians' clothes and
limbs rarely form one grouping region. CPMC (paper §4) *generates* figure-ground segments from
seeds; its colour-model cuts measured worse on this data. Here a box is turned into a mask by
a small network in the style of DeepMask / Mask R-CNN's mask head:

* the frozen trunk of the detector's default backbone (SqueezeNet 1.1, ``fire9``, stride
  16) runs once per image at the shared-mode scale (:data:`rcnn.features.SHARED_SCALES`);
* ``torchvision.ops.roi_align`` reads a ``14×14`` grid of the map for each box;
* :class:`MaskHead` (1×1 reduction, two 3×3 convs, a 2× transposed conv) predicts the
  ``28×28`` mask of the object the box is on, and a pooled branch predicts the box's IoU with
  the nearest object (an objectness score used for ranking);
* :func:`snap` pastes each mask into the image and keeps the superpixel cells whose mean
  probability exceeds a threshold, so candidates follow image edges.

Training (:func:`train_mask_head`) uses instance masks only (foreground = the annotated
instance the box is on, whatever its class): ground-truth boxes jittered to IoU >= 0.5 for the
mask loss, plus random boxes for the objectness score. The packaged ``pennfudan`` head
(``maskheads/pennfudan.safetensors``, float16, ~0.6 MB) is trained on Penn-Fudan's train split
by ``bench/segmentation_maskhead.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.ops import box_iou, roi_align

from rcnn.backbones import Backbone, get_backbone, set_threads
from rcnn.boxes import flip_boxes
from rcnn.features import SHARED_MAX_SIDE, SHARED_SCALES, scaled_image
from rcnn.progress import ProgressFn, tracked
from rcnn.segmentation.features import mask_boxes
from rcnn.segmentation.packaged import load_once, packaged_file

MASKHEADS = Path(__file__).resolve().parent / "maskheads"
ROI = 14  # RoIAlign grid read for each box (Mask R-CNN's mask head)
OUT = 28  # predicted mask resolution (2x the grid)


class MaskHead(nn.Module):
    """RoI features -> mask logits ``(B,28,28)`` and objectness logit ``(B,)``.

    ``x`` (B,C,14,14) from the trunk's last map (stride 16); with ``fine_ch`` > 0 also
    ``fine`` (B,fine_ch,28,28) from an earlier map (stride 8), fused after the 2x upsampling
    (FPN-style: the coarse map knows *what*, the fine one *where* the edges are).
    """

    def __init__(self, in_ch: int = 512, width: int = 64, fine_ch: int = 0):
        super().__init__()
        self.fine_ch = fine_ch
        self.reduce = nn.Conv2d(in_ch, width, 1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.up = nn.ConvTranspose2d(width, width // 2, 2, stride=2)
        if fine_ch:
            self.fine_reduce = nn.Conv2d(fine_ch, width // 4, 1)
            self.fuse = nn.Conv2d(width // 2 + width // 4, width // 2, 3, padding=1)
        self.mask = nn.Conv2d(width // 2, 1, 1)
        self.score = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, fine: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits of ``rows`` (all when None; training skips the negatives' masks)."""
        h = F.relu(self.reduce(x))
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        s = self.score(h.mean((2, 3)))[:, 0]
        if rows is not None:
            h = h[rows]
            fine = fine[rows] if fine is not None else None
        u = F.relu(self.up(h))
        if self.fine_ch:
            u = F.relu(self.fuse(torch.cat([u, F.relu(self.fine_reduce(fine))], 1)))
        m = self.mask(u)[:, 0]
        return m, s


#: the backbones' stride-8 side tap (:attr:`rcnn.backbones.Backbone.side_taps`)
FINE_TAP = {"squeezenet1_1": "fire5"}


def trunk_map(image: np.ndarray, bb: Backbone, fine: bool = False):
    """The backbone's trunk map ``(1,C,h,w)`` of an RGB uint8 image at the shared-mode scale,
    and the x/y factors from image pixels to the scaled input's pixels. With ``fine`` (only
    backbones in :data:`FINE_TAP`), returns ``(coarse, fine_map, sx, sy)`` with the
    stride-8 map as well."""
    img, sx, sy = scaled_image(image, SHARED_SCALES[0], SHARED_MAX_SIDE, bb.interpolation)
    with torch.inference_mode():
        x = bb.preprocess(img[None])
        if fine:
            tap = FINE_TAP[bb.name]
            coarse, side = bb.run_trunk(x, [tap])
            return coarse.contiguous(), side[tap].contiguous(), sx, sy
        fmap = bb.trunk(x)
    return fmap.contiguous(), sx, sy


def _rois(boxes: np.ndarray | torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4) * torch.tensor([sx, sy, sx, sy])
    return torch.cat([torch.zeros(len(b), 1), b], 1)


def _roi_feats(fmap: torch.Tensor, fine: torch.Tensor | None, rois: torch.Tensor, stride: int, size: int = ROI):
    x = roi_align(fmap, rois, size, 1.0 / stride, sampling_ratio=2, aligned=True)
    if fine is None:
        return (x,)
    return x, roi_align(fine, rois, OUT, 2.0 / stride, sampling_ratio=2, aligned=True)


@dataclass
class TrunkMaps:
    """The maps :class:`MaskPredictor` reads for one image: ``coarse`` (1,C,h,w) stride 16,
    ``fine`` (1,C',2h,2w) stride 8 or None, image->input factors, image width, and the
    mirrored image's maps (or None)."""

    coarse: torch.Tensor
    fine: torch.Tensor | None
    sx: float
    sy: float
    width: int
    mirrored: TrunkMaps | None = None


class MaskPredictor:
    """A trained :class:`MaskHead` with the backbone it reads (``predict`` boxes of an image)."""

    def __init__(self, head: MaskHead, backbone: str = "squeezenet1_1", info: dict | None = None):
        self.head = head.eval()
        self.backbone_name = backbone
        self.info = dict(info or {})
        self._bb: Backbone | None = None

    @property
    def backbone(self) -> Backbone:
        if self._bb is None:
            self._bb = get_backbone(self.backbone_name)
        return self._bb

    def maps(self, image: np.ndarray, flip: bool = False) -> TrunkMaps:
        """The trunk map(s) of an image that :meth:`predict` reads (compute once, predict often);
        with ``flip`` also those of the mirrored image (test-time flip averaging)."""
        image = np.asarray(image)
        if self.head.fine_ch:
            coarse, fine, sx, sy = trunk_map(image, self.backbone, fine=True)
        else:
            (coarse, sx, sy), fine = trunk_map(image, self.backbone), None
        mirrored = self.maps(image[:, ::-1].copy()) if flip else None
        return TrunkMaps(coarse, fine, sx, sy, image.shape[1], mirrored)

    @torch.inference_mode()
    def predict(self, image: np.ndarray | TrunkMaps, boxes: np.ndarray, flip: bool = False,
                batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """Mask probabilities ``(N,28,28)`` float32 over each box (pixel-edge xyxy, image
        pixels) and objectness ``(N,)`` in [0,1] (predicted box IoU with an object).
        ``image``: (H,W,3) RGB uint8, or its :meth:`maps`; ``flip``: average with the
        prediction on the mirrored image (needs maps computed with ``flip``)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, OUT, OUT), np.float32), np.zeros(0, np.float32)
        maps = image if isinstance(image, TrunkMaps) else self.maps(image, flip)
        probs, obj = self._predict(maps, boxes, batch)
        if flip:
            if maps.mirrored is None:
                raise ValueError("flip=True needs maps(image, flip=True)")
            w = maps.width
            pf, of = self._predict(maps.mirrored, flip_boxes(boxes, w),
                                   batch)
            probs, obj = (probs + pf[:, :, ::-1]) / 2, (obj + of) / 2
        return probs, obj

    def _predict(self, maps: TrunkMaps, boxes: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        ms, ss = [], []
        for s in range(0, len(boxes), batch):
            rois = _rois(boxes[s:s + batch], maps.sx, maps.sy)
            m, sc = self.head(*_roi_feats(maps.coarse, maps.fine, rois, self.backbone.stride))
            ms.append(torch.sigmoid(m).numpy())
            ss.append(torch.sigmoid(sc).numpy())
        return np.concatenate(ms).astype(np.float32), np.concatenate(ss).astype(np.float32)

    def save(self, path: str | Path, half: bool = True) -> Path:
        """safetensors (float16 by default: the head is tiny either way) + JSON metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.half() if half else v).contiguous() for k, v in self.head.state_dict().items()}
        meta = {"backbone": self.backbone_name, "in_ch": str(self.head.reduce.in_channels),
                "width": str(self.head.reduce.out_channels), "fine_ch": str(self.head.fine_ch),
                "info": json.dumps(self.info)}
        save_file(sd, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MaskPredictor:
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            sd = load_file(str(path))
            head = MaskHead(int(meta["in_ch"]), int(meta["width"]), int(meta.get("fine_ch", 0)))
            head.load_state_dict({k: v.float() for k, v in sd.items()})
        except FileNotFoundError:
            raise ValueError(f"{path}: mask head file not found") from None
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a mask head file ({str(e).splitlines()[0]})") from None
        return cls(head, meta.get("backbone", "squeezenet1_1"), json.loads(meta.get("info", "{}")))


def maskhead_path(name: str) -> Path:
    """The file of ``name``: a packaged head (``maskheads/<name>.safetensors``) or a path."""
    return packaged_file(MASKHEADS, name, ".safetensors", "mask head")


def load_mask_head(name: str) -> MaskPredictor:
    return load_once(maskhead_path(name), MaskPredictor.load)


# ------------------------------------------------------------------------ snapping


def paste_probs(probs: np.ndarray, box: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize one ``(28,28)`` mask to its box (xyxy in the pixels of an image of ``shape``)
    -> the probabilities over the box's integer window and that window ``(x0,y0,x1,y1)``."""
    h, w = shape
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x1, y1 = int(np.clip(np.ceil(box[2]), x0 + 1, w)), int(np.clip(np.ceil(box[3]), y0 + 1, h))
    bw, bh = max(float(box[2] - box[0]), 1e-3), max(float(box[3] - box[1]), 1e-3)
    # sample the 28x28 map at the window's pixel centres (the mask covers the box exactly)
    xs = ((np.arange(x0, x1) + 0.5 - box[0]) / bw * OUT - 0.5).astype(np.float32)
    ys = ((np.arange(y0, y1) + 0.5 - box[1]) / bh * OUT - 0.5).astype(np.float32)
    mx, my = np.meshgrid(xs, ys)
    p = cv2.remap(probs.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = (mx >= -0.5) & (mx <= OUT - 0.5) & (my >= -0.5) & (my <= OUT - 0.5)
    return np.where(inside, p, 0.0), (x0, y0, x1, y1)


def snap(probs: np.ndarray, boxes: np.ndarray, segments: np.ndarray,
         thresholds: Sequence[float] = (0.5,)) -> np.ndarray:
    """Masks snapped to superpixels: ``probs`` (N,28,28) over ``boxes`` (N,4) xyxy in the
    pixels of ``segments`` (H,W) int labels 0..S-1. A segment joins box ``i``'s region at
    threshold ``t`` when its mean probability over *all* its pixels (zero outside the box)
    exceeds ``t``. Returns ``(N*len(thresholds), S)`` bool rows, box-major."""
    S = int(segments.max()) + 1
    area = np.bincount(segments.ravel(), minlength=S).astype(np.float64)
    th = np.asarray(thresholds, np.float64)
    out = np.zeros((len(boxes), len(th), S), bool)
    for i in range(len(boxes)):
        p, (x0, y0, x1, y1) = paste_probs(probs[i], boxes[i], segments.shape)
        seg = segments[y0:y1, x0:x1].ravel()
        mean = np.bincount(seg, weights=p.ravel(), minlength=S) / np.maximum(area, 1)
        out[i] = mean[None, :] > th[:, None]
    return out.reshape(-1, S)


# ----------------------------------------------------------------------- training


def _jitter(gt: np.ndarray, n: int, rng: np.random.Generator, scale: float, w: int, h: int) -> np.ndarray:
    """``n`` boxes around each ground-truth box (G,4): corners moved by N(0, scale·size)."""
    g = np.repeat(gt, n, 0)
    bw, bh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    d = rng.normal(0, scale, (len(g), 4)) * np.stack([bw, bh, bw, bh], 1)
    b = g + d
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, w)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, h)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 4)
    return b.astype(np.float32)


def _random_boxes(n: int, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    cw = w * rng.uniform(0.05, 0.7, n)
    ch = np.minimum(cw * np.exp(rng.uniform(-0.5, 1.5, n)), h * 0.95)  # pedestrians are tall
    x = rng.uniform(0, 1, n) * (w - cw)
    y = rng.uniform(0, 1, n) * (h - ch)
    return np.stack([x, y, x + cw, y + ch], 1).astype(np.float32)


def train_mask_head(
    images: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], backbone: str = "squeezenet1_1",
    epochs: int = 20, jitters: int = 8, negatives: int = 24, lr: float = 1e-3, seed: int = 0,
    fine: bool = True, progress: ProgressFn | None = None, log=None,
) -> MaskPredictor:
    """Fit a :class:`MaskHead` on instance masks.

    ``images`` (H,W,3) uint8 RGB; ``gt_masks`` per image (G,H,W) bool instance masks (any
    class). Each image is also used mirrored. Per epoch and instance: ``jitters`` boxes
    around its box (mask loss where box IoU >= 0.5, BCE on the matched instance's mask
    resampled by RoIAlign), and per image ``negatives`` random boxes; the objectness branch
    regresses every box's IoU with its best ground-truth box (BCE on the soft target).
    Adam, ``lr`` halved at 2/3 of the epochs.
    """
    set_threads(None)  # $RCNN_THREADS (small batches: 1 thread is fastest on a shared CPU)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    bb = get_backbone(backbone)
    data = []
    items = list(zip(images, gt_masks, strict=True))
    for image, gt in tracked(items, progress, "mask-head training images"):
        gt = np.asarray(gt, bool)
        if len(gt) == 0:
            continue
        for flip in (False, True):
            im = image[:, ::-1].copy() if flip else image
            g = gt[:, :, ::-1].copy() if flip else gt
            if fine:
                fmap, fmap8, sx, sy = trunk_map(im, bb, fine=True)
            else:
                (fmap, sx, sy), fmap8 = trunk_map(im, bb), None
            data.append((fmap, fmap8, sx, sy, torch.from_numpy(g.astype(np.float32))[:, None], mask_boxes(g), im.shape[:2]))
    if not data:
        raise ValueError("no training image has an instance mask")
    head = MaskHead(int(data[0][0].shape[1]), fine_ch=int(data[0][1].shape[1]) if fine else 0)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(epochs * 2 / 3)], 0.5)
    t0 = time.perf_counter()
    history: list[dict] = []
    for ep in range(epochs):
        head.train()
        tot = {"mask": 0.0, "score": 0.0, "n": 0}
        for i in rng.permutation(len(data)):
            fmap, fmap8, sx, sy, gtm, gtb, (h, w) = data[i]
            boxes = np.concatenate([_jitter(gtb, jitters, rng, 0.12, w, h), _random_boxes(negatives, rng, w, h)])
            iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gtb))
            best, which = iou.max(1)
            pos = torch.nonzero(best >= 0.5)[:, 0]
            rois = _rois(boxes, sx, sy)
            m, s = head(*_roi_feats(fmap, fmap8, rois, bb.stride), rows=pos)  # masks of the positives only
            loss_s = F.binary_cross_entropy_with_logits(s, best)
            loss_m = torch.zeros(())
            if len(pos):
                # the target: the matched instance's mask resampled over each box, 28x28
                tb = torch.from_numpy(boxes[pos.numpy()])
                rois = torch.cat([which[pos, None].float(), tb], 1)
                target = roi_align(gtm, rois, OUT, 1.0, sampling_ratio=2, aligned=True)[:, 0]
                loss_m = F.binary_cross_entropy_with_logits(m, target)
            opt.zero_grad()
            (loss_m + loss_s).backward()
            opt.step()
            tot["mask"] += float(loss_m.detach())
            tot["score"] += float(loss_s.detach())
            tot["n"] += 1
        sched.step()
        history.append({"epoch": ep + 1, "mask_loss": tot["mask"] / tot["n"], "score_loss": tot["score"] / tot["n"],
                        "seconds": time.perf_counter() - t0})
        if log:
            log(history[-1])
    info = {"images": len(items), "maps": len(data), "epochs": epochs, "jitters": jitters, "negatives": negatives,
            "lr": lr, "seed": seed, "fine": fine, "train_seconds": time.perf_counter() - t0, "log": history}
    return MaskPredictor(head.eval(), backbone, info)
