"""Ray engine vs local engine: throughput with the same worker count, per-task overhead.

Fills the proposal + feature caches of the first ``--images`` VOC sample images twice, each
time into a fresh cache: with the ``local`` engine (proposals in ``--workers`` processes, then
features with torch on every core) and with the ``ray`` engine (a local Ray instance with
``--workers`` CPUs, one image per task, one torch thread per task). Reports images/s of both
(Ray's startup — instance + worker processes importing torch — reported separately), checks
that both caches hold the same features, and measures Ray's fixed costs: a trivial task's
round trip and the per-image time of a run where every image is already cached.

Usage: ``python bench/ray_engine.py [--images 8] [--workers 2] [--max-boxes 300]``
→ ``bench/results/ray_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "VOC2007-test-sample"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-boxes", type=int, default=300, help="proposals per image (fewer: a quicker run)")
    ap.add_argument("-o", "--out", default=str(Path(__file__).parent / "results" / "ray_engine.json"))
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"data not found: {DATA}")

    from rcnn.data import load_dataset
    from rcnn.distributed import extract_dataset, ray_session, ray_task_overhead
    from rcnn.features import FeatureConfig, get_features
    from rcnn.proposals import ProposalConfig

    ds = load_dataset(DATA, "test")
    ds = replace(ds, records=ds.records[: args.images])
    pc = ProposalConfig(max_boxes=args.max_boxes)
    fc = FeatureConfig()
    tmp = Path(tempfile.mkdtemp(prefix="rcnn-ray-bench-"))
    out: dict = {"benchmark": "feature engines: local vs ray", "images": len(ds.records), "workers": args.workers,
                 "proposals": pc.describe(), "features": fc.describe(),
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}

    # local engine, fresh cache
    os.environ["RCNN_CACHE_DIR"] = str(tmp / "local")
    fc.backbone_obj()  # weights conversion is setup, not throughput (Ray's warm-up excludes it too)
    loc = extract_dataset(ds, pc, fc, engine="local", workers=args.workers)
    t0 = time.perf_counter()
    extract_dataset(ds, pc, fc, engine="local", workers=args.workers)
    loc_cached = time.perf_counter() - t0
    local_feats = {r.image_id: get_features(r, pc, fc, ds.root) for r in ds.records}
    print(f"local: {loc.seconds:.1f} s, {loc.images_per_s:.3f} images/s ({loc.regions} regions)", flush=True)

    # ray engine, fresh cache, one session for everything (startup measured once)
    os.environ["RCNN_CACHE_DIR"] = str(tmp / "ray")
    with ray_session(None, args.workers) as startup:
        ray_s = extract_dataset(ds, pc, fc, engine="ray", workers=args.workers)
        t0 = time.perf_counter()
        again = extract_dataset(ds, pc, fc, engine="ray", workers=args.workers)
        ray_cached = time.perf_counter() - t0
        overhead = ray_task_overhead(200)
    print(f"ray: {ray_s.seconds:.1f} s, {ray_s.images_per_s:.3f} images/s; startup {startup:.1f} s + workers "
          f"{ray_s.startup_s:.1f} s; task round trip {overhead * 1e3:.2f} ms", flush=True)

    diffs, same_boxes = [], True
    for r in ds.records:
        b, f = get_features(r, pc, fc, ds.root)
        lb, lf = local_feats[r.image_id]
        same_boxes &= bool(np.array_equal(b, lb))
        diffs.append(float(np.abs(f.astype(np.float32) - lf.astype(np.float32)).max()) if len(f) else 0.0)
    per_image_s = ray_s.seconds * args.workers / max(ray_s.computed, 1)  # one worker's seconds per image
    out.update({
        "local": {"seconds": round(loc.seconds, 2), "images_per_s": round(loc.images_per_s, 4),
                  "regions": loc.regions, "cached_rerun_s": round(loc_cached, 3)},
        "ray": {"seconds": round(ray_s.seconds, 2), "images_per_s": round(ray_s.images_per_s, 4),
                "regions": ray_s.regions, "ray_init_s": round(startup, 2), "worker_warmup_s": round(ray_s.startup_s, 2),
                "cached_rerun_s": round(ray_cached, 3), "cached_rerun_computed": again.computed},
        "ray_vs_local_throughput": round(ray_s.images_per_s / loc.images_per_s, 3) if loc.images_per_s else None,
        "task_round_trip_ms": round(overhead * 1e3, 3),
        "cached_per_image_ms": {"local": round(loc_cached / len(ds.records) * 1e3, 1),
                                "ray": round(ray_cached / len(ds.records) * 1e3, 1)},
        "worker_seconds_per_image": round(per_image_s, 2),
        # the driver does ~one task round trip of serial work per image: it saturates near
        # 1 / round_trip images/s, i.e. per_image_s / round_trip workers stay busy
        "linear_scaling_bound_workers": int(per_image_s / overhead) if overhead > 0 else None,
        "same_boxes": same_boxes, "max_abs_feature_diff": max(diffs) if diffs else 0.0,
        "load_avg_at_end": os.getloadavg(),
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("ray_vs_local_throughput", "task_round_trip_ms", "linear_scaling_bound_workers",
                                          "same_boxes", "max_abs_feature_diff")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
