"""Feature extraction speed and cache size, per backbone × mode → ``bench/results/features.json``.

Inputs: genuine VOC 2007 test images with the R-CNN authors' own selective-search boxes
(first 2000 per image), from ``../shared/data/VOC2007-test-sample``. Per backbone:

* ``network_regions_per_s``: trunk + head on a ready, normalised batch (the limit);
* ``warp``: regions/s end to end (warping + preprocessing + network), and its share of the limit;
* ``shared``: regions/s end to end (resize + trunk once + RoI pooling + head), speed-up over warp;
* cache: bytes per region of the stored float16 entry (compressed npz, boxes included), MB per
  1000 images at 2000 regions/image, against the original's float32 bytes for the same layer.

AlexNet has no bundled weights: it runs with random weights (speed and sizes only).
Usage: ``python bench/features.py [--images N] [--warp-images N] [--backbones a,b]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "VOC2007-test-sample"
OUT = ROOT / "bench" / "results" / "features.json"
ORIGINAL_DIMS = {"pool5": 9216, "fc6": 4096, "fc7": 4096}  # AlexNet, stored as float32 by the original


def load_inputs(n_images: int, n_boxes: int = 2000):
    from scipy.io import loadmat

    from rcnn.data import load_image

    out = []
    for mat in sorted((DATA / "selective_search").glob("*_boxes.mat"))[:n_images]:
        image_id = mat.name.split("_")[0]
        b = loadmat(mat)["boxes"].astype(np.float32)[:n_boxes]
        b[:, 2:] += 1  # 0-based inclusive pixels -> pixel edges
        out.append((image_id, load_image(DATA / "JPEGImages" / f"{image_id}.jpg"), b))
    return out


def backbone(name: str, tmp: Path):
    from rcnn.backbones import get_backbone

    if name == "alexnet":
        from safetensors.torch import save_file
        from torchvision.models import alexnet

        torch.manual_seed(0)
        f = tmp / "alexnet-random.safetensors"
        save_file(alexnet().state_dict(), str(f))
        return get_backbone("alexnet", f)
    return get_backbone(name)


def network_throughput(bb, layer: str, batch: int = 128) -> float:
    from rcnn.features import warp_regions

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (400, 500, 3), dtype=np.uint8)
    crops = warp_regions(img, np.tile([[0, 0, 500, 400]], (batch, 1)), bb.input_size)
    x = bb.preprocess(crops)
    with torch.inference_mode():
        bb.head(bb.to_grid(bb.trunk(x[:8])), [layer])  # warm-up
        t = time.perf_counter()
        bb.head(bb.to_grid(bb.trunk(x)), [layer])
        return batch / (time.perf_counter() - t)


def stored_bytes(boxes: np.ndarray, feats: np.ndarray, tmp: Path) -> int:
    """Bytes of one feature-cache entry as rcnn.features.get_features writes it (compressed .npz)."""
    p = tmp / "entry.npz"
    with open(p, "wb") as f:
        np.savez_compressed(f, boxes=boxes, feats=feats.astype(np.float16), image_sha256=np.array("0" * 64),
                            n_gt=np.array(0, np.int32))
    return p.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2, help="images for shared mode")
    ap.add_argument("--warp-images", type=int, default=1, help="images for warp mode (~1 min each)")
    ap.add_argument("--backbones", default="squeezenet1_1,efficientnet_lite0,alexnet")
    ap.add_argument("--layer", default="fc7")
    ap.add_argument("--warp-regions", type=int, default=2000,
                    help="time warp mode on the first N of the 2000 (rate is per region; saves time on a busy CPU)")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} absent: nothing to benchmark")
    from rcnn.backbones import set_threads
    from rcnn.features import SHARED_GRID, SHARED_SCALES, extract_features

    threads = set_threads()
    inputs = load_inputs(max(args.images, args.warp_images))
    results = {"threads": threads, "torch": torch.__version__, "layer": args.layer,
               "images": [i for i, _, _ in inputs], "regions_per_image": [len(b) for _, _, b in inputs],
               "shared_scales": list(SHARED_SCALES), "shared_grid": SHARED_GRID,
               "load_average_at_start": os.getloadavg(), "backbones": {}}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in args.backbones.split(","):
            bb = backbone(name, tmp)
            r: dict = {"input_size": bb.input_size, "taps": bb.taps}
            r["network_regions_per_s"] = network_throughput(bb, args.layer)
            print(name, "network", f"{r['network_regions_per_s']:.1f} regions/s", flush=True)
            for mode, imgs in (("warp", inputs[: args.warp_images]), ("shared", inputs[: args.images])):
                n, secs, sizes = 0, 0.0, {}
                for _, img, boxes in imgs:
                    if mode == "warp":
                        boxes = boxes[: args.warp_regions]
                    t = time.perf_counter()
                    out = extract_features(img, boxes, bb, ["pool5", args.layer], mode)
                    secs += time.perf_counter() - t
                    n += len(boxes)
                    for k, f in out.items():
                        sizes.setdefault(k, []).append(stored_bytes(boxes, f, tmp) / len(boxes))
                r[mode] = {"images": len(imgs), "regions": n, "seconds": secs, "regions_per_s": n / secs,
                           "s_per_image_2000": 2000 * secs / n}
                r[mode]["cache"] = {
                    k: {"dims": int(out[k].shape[1]), "bytes_per_region": float(np.mean(v)),
                        "mb_per_1000_images": float(np.mean(v)) * 2000 * 1000 / 1e6,
                        "fraction_of_original": float(np.mean(v)) / (4 * ORIGINAL_DIMS[k])}
                    for k, v in sizes.items()
                }
                print(name, mode, f"{r[mode]['regions_per_s']:.1f} regions/s", json.dumps(r[mode]["cache"]), flush=True)
            r["warp_fraction_of_network"] = r["warp"]["regions_per_s"] / r["network_regions_per_s"]
            r["shared_speedup_over_warp"] = r["shared"]["regions_per_s"] / r["warp"]["regions_per_s"]
            results["backbones"][name] = r
    # other jobs share these cores: the load average says how contended the figures are
    results["load_average_at_end"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
