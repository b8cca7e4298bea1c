"""Benchmark region proposals: recall, MABO, boxes/img and speed per mode, on VOC and BCCD.

    python bench/proposals.py [--bccd-limit 24] [--workers 2] [--modes rcnn-fast,fast,...]

For every (dataset, mode): the proposals are computed from scratch in a private cache
(a temporary folder, removed afterwards) with ``--workers`` processes, each running
OpenCV single-threaded. ``s_per_img_1core`` is the mean CPU time of one image's
selective search inside a worker (single-threaded, so one core's time; CPU time rather
than wall time because the shared 2-core machine is loaded by other jobs, see
``loadavg``); ``img_per_s`` is images / wall time of the whole
parallel run (including image decoding and cache writes); ``speedup`` = their product.
The authors' own boxes for two VOC images are scored next to ours (``reference``).
Writes ``bench/results/proposals.json`` and recall-vs-#proposals PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results"
CACHE = Path(tempfile.gettempdir()) / f"rcnn-bench-proposals-{os.getpid()}"

MODES = {
    "rcnn-fast": {},  # the default: the paper's fast mode (§2.1)
    "rcnn-fast-small": {"ks": (25, 50)},  # documented small-object setting
    "rcnn-fast-upscale": {"upscale": True},  # exactly the original resize (narrow images enlarged)
    "fast": {"mode": "fast"},  # OpenCV preset
    "quality": {"mode": "quality"},  # OpenCV preset
}


def authors_boxes(image_id: str) -> np.ndarray:
    """The authors' .mat boxes (uint16 0-based inclusive [x1 y1 x2 y2]) as pixel-edge xyxy."""
    from scipy.io import loadmat

    b = loadmat(DATA / "VOC2007-test-sample" / "selective_search" / f"{image_id}_boxes.mat")["boxes"]
    b = b.astype(np.float32)
    b[:, 2:] += 1
    return b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bccd-limit", type=int, default=24, help="first N images of the BCCD test split (0 = all)"
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--datasets", default="voc,bccd")
    ap.add_argument("--output", type=Path, default=OUT / "proposals.json")
    args = ap.parse_args()
    if not DATA.exists():
        print(f"data not found: {DATA}", file=sys.stderr)
        return 2
    os.environ["RCNN_CACHE_DIR"] = str(CACHE)
    shutil.rmtree(CACHE, ignore_errors=True)

    import cv2

    from rcnn.data import load_dataset
    from rcnn.proposals import (
        ProposalConfig,
        get_proposals,
        plot_recall_curve,
        proposal_recall,
        propose_dataset,
    )

    results: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "workers": args.workers,
            "opencv": cv2.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "datasets": {},
        "reference": {},
    }
    sets = {
        "voc": ("VOC2007-test-sample", "test", 0),
        "bccd": ("BCCD", "test", args.bccd_limit),
    }
    for dname in args.datasets.split(","):
        folder, split, limit = sets[dname]
        ds = load_dataset(DATA / folder, split)
        recs = ds.records[:limit] if limit else ds.records
        entry = {"dataset": folder, "split": split, "images": len(recs), "of": len(ds.records), "modes": {}}
        curves = {}
        for mname in args.modes.split(","):
            if mname == "rcnn-fast-upscale" and all(r.width >= 500 for r in recs):
                continue  # no image is narrower than 500 px: identical to rcnn-fast
            cfg = ProposalConfig(**MODES[mname])
            t0 = time.perf_counter()
            s = propose_dataset(ds, cfg, workers=args.workers, records=recs)
            wall = time.perf_counter() - t0
            props = [get_proposals(r, cfg, ds.root) for r in recs]
            res = proposal_recall(recs, props, ds.classes)
            row = {
                "config": cfg.describe(),
                "boxes_per_img": round(res.mean_boxes, 1),
                "recall@0.5": round(res.recall["0.5"], 4),
                "recall@0.7": round(res.recall["0.7"], 4),
                "mabo": round(res.mabo, 4),
                "abo_objects": round(res.abo_objects, 4),
                "s_per_img_1core": round(s.compute_cpu_seconds / max(s.computed, 1), 3),
                "s_per_img_wall_in_worker": round(s.compute_seconds / max(s.computed, 1), 3),
                "img_per_s": round(s.computed / wall, 3),
                "failed": len(s.failed),
                "objects": res.objects,
                "per_class": res.per_class,
                "recall_curve@0.5": res.curve["0.5"],
                "loadavg_after": os.getloadavg(),
            }
            row["speedup_vs_1core"] = round(row["img_per_s"] * row["s_per_img_1core"], 2)
            entry["modes"][mname] = row
            curves[mname] = res
            print(
                f"{dname:5s} {mname:18s} {row['boxes_per_img']:7.0f} boxes  R@.5 {row['recall@0.5']:.3f}  "
                f"R@.7 {row['recall@0.7']:.3f}  MABO {row['mabo']:.3f}  {row['s_per_img_1core']:.2f} s/img  "
                f"{row['img_per_s']:.2f} img/s ({args.workers} workers)  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if dname == "voc" and mname == "rcnn-fast":
                results["reference"] = reference(ds, cfg, get_proposals, proposal_recall)
        results["datasets"][dname] = entry
        if curves:
            png = OUT / f"proposals_recall_{dname}.png"
            plot_recall_curve(curves, png, title=f"{folder} {split} ({len(recs)} images)")
            entry["plot"] = str(png.relative_to(ROOT))
    results["machine"]["loadavg_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    shutil.rmtree(CACHE, ignore_errors=True)
    return 0


def reference(ds, cfg, get_proposals, proposal_recall) -> dict:
    """Our default boxes vs the authors' on the two images they were published for."""
    from rcnn.proposals import best_overlaps

    recs = [r for r in ds.records if r.image_id in ("000004", "001551")]
    theirs = [authors_boxes(r.image_id) for r in recs]
    ours = [get_proposals(r, cfg, ds.root) for r in recs]
    rt, ro = proposal_recall(recs, theirs, ds.classes), proposal_recall(recs, ours, ds.classes)
    twins = [float(np.mean(best_overlaps(t, o)[0] >= 0.9)) for t, o in zip(theirs, ours, strict=True)]
    out = {
        "images": [r.image_id for r in recs],
        "objects": rt.objects,
        "authors": {
            "boxes_per_img": rt.mean_boxes,
            "recall@0.5": rt.recall["0.5"],
            "recall@0.7": rt.recall["0.7"],
            "mabo": rt.mabo,
        },
        "ours": {
            "boxes_per_img": ro.mean_boxes,
            "recall@0.5": ro.recall["0.5"],
            "recall@0.7": ro.recall["0.7"],
            "mabo": ro.mabo,
        },
        "authors_boxes_with_iou0.9_twin_in_ours": {r.image_id: t for r, t in zip(recs, twins, strict=True)},
    }
    print(f"reference (2 images): authors {out['authors']}  ours {out['ours']}  twins {twins}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
