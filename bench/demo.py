"""Benchmark ``rcnn demo``: time and detections of the zero-training detector on the sample photos.

Run: ``python bench/demo.py [-o OUT]`` → ``bench/results/demo.json``. Reports wall and CPU
seconds (CPU = user+sys of this process, all threads: an upper bound on the wall time of
the same work on idle cores, so it stays meaningful on a busy machine) per stage and image.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def head_precision(det) -> dict:
    """CPU seconds of the person head's network pass in fp32 and bf16 on one photo (its own
    proposals), and how far the two agree (relative L2 difference of the SVM's features)."""
    import numpy as np

    from rcnn.demo import sample_images
    from rcnn.features import extract_features
    from rcnn.proposals import selective_search

    head = det.heads[0]
    image = next(s for s in sample_images() if s.name == "astronaut").load()
    boxes = selective_search(image)
    out = {"image": "astronaut", "boxes": len(boxes)}
    feats = {}
    for prec in ("fp32", "bf16"):
        fc = replace(head.source.feature_config, precision=prec)
        c = _cpu()
        feats[prec] = extract_features(image, boxes, head.source.backbone, fc.layer, **fc.extract_options())
        out[f"{prec}_cpu_s"] = round(_cpu() - c, 2)
    out["relative_difference"] = round(float(np.linalg.norm(feats["fp32"] - feats["bf16"]) / np.linalg.norm(feats["fp32"])), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--output", type=Path, default=Path("/tmp/rcnn-demo-bench"))
    ap.add_argument("--mode", default="shared", choices=["shared", "warp"])
    args = ap.parse_args()

    w0, c0 = time.perf_counter(), _cpu()
    from rcnn import zoo
    from rcnn.demo import DemoConfig, run_demo, sample_images

    det = zoo.load("imagenet", config=DemoConfig(mode=args.mode))  # what `rcnn demo` runs
    load_wall, load_cpu = time.perf_counter() - w0, _cpu() - c0
    rows = []
    last = [time.perf_counter(), _cpu()]

    def on_image(r) -> None:
        w, c = time.perf_counter(), _cpu()
        res = r.result
        rows.append({
            "image": r.name, "size": [r.width, r.height], "proposals": res.num_proposals,
            "detections": [[n, round(s, 3)] for n, s in res.top(len(res.scores))],
            "seconds": {k: round(v, 2) for k, v in res.seconds.items()},
            "wall_s": round(w - last[0], 2), "cpu_s": round(c - last[1], 2),
        })  # fmt: skip
        last[:] = [w, c]
        print(rows[-1], flush=True)

    report = run_demo(sample_images(), args.output, det, on_image=on_image)
    total_wall, total_cpu = time.perf_counter() - w0, _cpu() - c0
    doc = {
        "what": "rcnn demo on the packaged sample photos (imports + model load + 5 images + outputs)",
        "config": det.config.__dict__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores usable",
        "load_avg_1min": round(__import__("os").getloadavg()[0], 1),
        "model_load": {"wall_s": round(load_wall, 2), "cpu_s": round(load_cpu, 2)},
        "images": rows,
        "total": {"wall_s": round(total_wall, 1), "cpu_s": round(total_cpu, 1)},
        "outputs": str(report.out_dir),
    }
    if det.heads:
        doc["head_precision"] = head_precision(det)
    out = Path(__file__).resolve().parent / "results" / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"total wall {total_wall:.1f} s, cpu {total_cpu:.1f} s -> {out}")


if __name__ == "__main__":
    main()
