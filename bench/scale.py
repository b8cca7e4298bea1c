"""Many-class scoring at scale (paper §2.2: "even if there were 100k classes ...").

For every (classes C, feature size D) it scores N = 2000 regions with random weights and
measures, each case in a fresh subprocess so peak memory is per case:

* ``topk_s``: :func:`rcnn.scoring.score_topk` (blocked product, per-class top-k on the fly),
  fp32 weight storage; ``topk_fp16_s`` the same with fp16 weight storage (separate process);
* ``matmul_s``: a bare ``torch.matmul(feats, W.T)`` of the same shapes (the machine's limit), timed
  interleaved with ``topk_s`` in the same process (best of the repeats), and their ``ratio``;
* ``peak_rss_mb`` / ``extra_rss_mb``: the process's peak resident memory after scoring, and its
  growth over the inputs (features + weights) — bounded by the block, whatever C is;
  ``matmul_extra_rss_mb`` the same for the bare product (it materialises N × C scores);
* ``weights_mb_fp32`` / ``weights_mb_fp16``: bytes of weights + biases.

Usage: ``python bench/scale.py [--quick] [--classes 20,1000] [--dims 512] [-o bench/results/scale.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

N_REGIONS = 2000
K = 100

CHILD = r"""
import json, resource, sys, time
import torch
from rcnn.scoring import prepare_weights, score_topk

mode, C, D, N, K, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: kB)
g = torch.Generator().manual_seed(0)
f = torch.randn(N, D, generator=g)
dt = torch.float16 if mode == "fp16" else torch.float32
W = torch.empty(C, D, dtype=dt)
for c0 in range(0, C, 4096):  # generate in chunks: an fp16 run never holds an fp32 copy
    W[c0:c0 + 4096] = torch.randn(min(4096, C - c0), D, generator=g)
b = torch.randn(C, generator=g)
cw = prepare_weights(W, b, layout="CD")
score_topk(f[:8], cw.Wt[:8], cw.b[:8], k=2)  # warm-up: BLAS and topk kernels
torch.matmul(f[:8], cw.Wt[:8].float().T)
base = rss()
out = {"mode": mode, "C": C, "D": D, "N": N, "k": K, "base_rss_mb": base, "weights_mb": cw.nbytes / 1e6}
t_topk, t_mm = [], []
for r in range(reps):
    t = time.perf_counter(); score_topk(f, cw, k=K); t_topk.append(time.perf_counter() - t)
    if r == 0:
        out["peak_rss_mb"] = rss()  # read before the bare product (which holds N x C scores) runs
    if mode == "fp32":
        t = time.perf_counter(); s = torch.matmul(f, cw.Wt.T); t_mm.append(time.perf_counter() - t)
        del s
out["topk_s"] = min(t_topk)
out["topk_all_s"] = t_topk
if t_mm:
    out["matmul_s"] = min(t_mm)
    out["matmul_all_s"] = t_mm
    out["matmul_peak_rss_mb"] = rss()
print("RESULT " + json.dumps(out))
"""


def run_case(mode: str, C: int, D: int, reps: int) -> dict:
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(C), str(D), str(N_REGIONS), str(K), str(reps)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"case {mode} C={C} D={D} failed: {res.stderr.strip().splitlines()[-1:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:])


def available_mb() -> float:
    try:
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemAvailable:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", default="20,1000,10000,100000")
    ap.add_argument("--dims", default="512,1280,4096")
    ap.add_argument("--quick", action="store_true", help="one repeat per case (development)")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="skip a case whose estimated bare-matmul time exceeds this (at 40 GFLOP/s)")
    ap.add_argument("-o", "--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = ap.parse_args()
    import torch

    from rcnn.scoring import weights_nbytes

    rows, skipped = [], []
    t0 = time.perf_counter()
    for D in [int(x) for x in args.dims.split(",")]:
        for C in [int(x) for x in args.classes.split(",")]:
            # memory: features + fp32 weights + the bare product's N x C output, twice for safety
            need_mb = 2 * (N_REGIONS * D * 4 + weights_nbytes(C, D) + N_REGIONS * C * 4) / 1e6
            est_s = 2 * N_REGIONS * D * C / 40e9
            if need_mb > available_mb():
                skipped.append({"C": C, "D": D, "why": f"needs ~{need_mb:.0f} MB, {available_mb():.0f} MB available"})
                continue
            if est_s > args.max_seconds:
                skipped.append({"C": C, "D": D, "why": f"estimated {est_s:.0f} s per product > --max-seconds"})
                continue
            # repeats: best-of keeps other processes' noise out; big cases are repeated less
            reps = 1 if args.quick else (2 if est_s > 5 else 3)
            r32 = run_case("fp32", C, D, reps)
            r16 = run_case("fp16", C, D, 1 if est_s > 5 else reps)
            row = {
                "classes": C, "dim": D, "regions": N_REGIONS, "k": K,
                "topk_s": round(r32["topk_s"], 4), "matmul_s": round(r32["matmul_s"], 4),
                "ratio": round(r32["topk_s"] / r32["matmul_s"], 3),
                "topk_fp16_s": round(r16["topk_s"], 4),
                "gflops": round(2 * N_REGIONS * D * C / r32["topk_s"] / 1e9, 1),
                "peak_rss_mb": round(r32["peak_rss_mb"]), "extra_rss_mb": round(r32["peak_rss_mb"] - r32["base_rss_mb"]),
                "matmul_extra_rss_mb": round(r32["matmul_peak_rss_mb"] - r32["peak_rss_mb"]),
                "fp16_peak_rss_mb": round(r16["peak_rss_mb"]),
                "weights_mb_fp32": round(weights_nbytes(C, D, "fp32") / 1e6, 2),
                "weights_mb_fp16": round(weights_nbytes(C, D, "fp16") / 1e6, 2),
                "topk_all_s": [round(x, 4) for x in r32["topk_all_s"]],
                "matmul_all_s": [round(x, 4) for x in r32["matmul_all_s"]],
            }
            rows.append(row)
            print(f"C={C:>6} D={D:>4}: topk {row['topk_s']:.3f}s  matmul {row['matmul_s']:.3f}s  ratio {row['ratio']:.2f}  "
                  f"fp16 {row['topk_fp16_s']:.3f}s  extra RSS {row['extra_rss_mb']} MB (bare matmul +{row['matmul_extra_rss_mb']} MB)  "
                  f"W {row['weights_mb_fp32']:.0f}/{row['weights_mb_fp16']:.0f} MB", flush=True)
    result = {
        "benchmark": "many-class scoring: blocked score_topk vs bare torch.matmul",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_avg_at_end": os.getloadavg()},
        "settings": {"regions": N_REGIONS, "k": K, "block_classes": __import__("rcnn.scoring").scoring.DEFAULT_BLOCK,
                     "quick": args.quick},
        "rows": rows,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
