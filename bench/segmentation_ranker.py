"""Train the packaged mask-proposal ranker on Penn-Fudan's train split (paper §4: CPMC's
learned ranking of figure-ground segments).

Writes ``src/rcnn/segmentation/rankers/pennfudan.npz`` (a regression forest as arrays,
see :class:`rcnn.segmentation.ranking.ForestRanker`) and
``bench/results/segmentation_ranker.json`` (training rows, time, forest size). Only the train split is used, so
the val/test mask recall of ``bench/segmentation.py`` is held out.

    python bench/segmentation_ranker.py [--limit N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2

from rcnn.cache import save_json
from rcnn.data import load_dataset
from rcnn.segmentation import MaskProposalConfig
from rcnn.segmentation.masks import images_and_masks
from rcnn.segmentation.regions import RANKERS, train_mask_ranker

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "PennFudanPed"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="training images (0 = the whole train split)")
    ap.add_argument("--trees", type=int, default=40)
    ap.add_argument("--out", type=Path, default=RANKERS / "pennfudan.npz")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: Penn-Fudan not found")
    images, gts = images_and_masks(load_dataset(DATA, "train"), args.limit)  # never val or test
    cfg = MaskProposalConfig()
    t0 = time.perf_counter()
    ranker, summary = train_mask_ranker(images, gts, cfg, n_trees=args.trees)
    secs = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ranker.save(args.out)
    info = {"dataset": "PennFudanPed", "split": "train", **summary, "trees": args.trees,
            "nodes": len(ranker.value), "features": list(ranker.features), "train_seconds": secs,
            "load_average": os.getloadavg()[0], "file": str(args.out.relative_to(ROOT)),
            "file_kb": args.out.stat().st_size / 1024}
    save_json(ROOT / "bench" / "results" / "segmentation_ranker.json", info)
    print(info)


if __name__ == "__main__":
    main()
