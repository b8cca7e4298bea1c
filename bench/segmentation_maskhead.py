"""Train the packaged mask head on Penn-Fudan's train split (mask proposals ``"cnn"``).

A class-agnostic mask predictor on the frozen SqueezeNet 1.1 trunk (DeepMask / Mask R-CNN
mask head style, see :mod:`rcnn.segmentation.maskhead`), trained on the train split's
instance masks only, so the val/test mask recall of ``bench/segmentation.py`` is held out.
Writes ``src/rcnn/segmentation/maskheads/pennfudan.safetensors`` (float16) and
``bench/results/segmentation_maskhead.json`` (settings, losses, time). Seeded: a re-run on
the same data and torch build gives the same head.

    python bench/segmentation_maskhead.py [--limit N] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import torch

from rcnn.cache import save_json
from rcnn.data import load_dataset
from rcnn.segmentation.maskhead import MASKHEADS, train_mask_head
from rcnn.segmentation.masks import images_and_masks

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "PennFudanPed"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="training images (0 = the whole train split)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=MASKHEADS / "pennfudan.safetensors")
    args = ap.parse_args()
    torch.set_num_threads(1)  # shared CPU; the head is small
    cv2.setNumThreads(1)
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: Penn-Fudan not found")
    images, gts = images_and_masks(load_dataset(DATA, "train"), args.limit)  # never val or test
    pred = train_mask_head(images, gts, epochs=args.epochs, log=print)
    pred.save(args.out)
    info = {"dataset": "PennFudanPed", "split": "train", **pred.info, "load_average": os.getloadavg()[0],
            "file": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out),
            "file_kb": args.out.stat().st_size / 1024,
            "parameters": sum(p.numel() for p in pred.head.parameters())}
    # the packaged head's record goes to bench/results; a head written elsewhere gets <out>.json
    packaged = args.out.resolve() == (MASKHEADS / "pennfudan.safetensors").resolve()
    save_json(ROOT / "bench" / "results" / "segmentation_maskhead.json" if packaged else args.out.with_suffix(".json"), info)
    print({k: v for k, v in info.items() if k != "log"})


if __name__ == "__main__":
    main()
