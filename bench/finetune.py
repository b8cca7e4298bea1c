"""Fine-tuning and bounding-box regression on BCCD (paper §2.3, released ``bbox_regression/``).

    python bench/finetune.py train            # fine-tune SqueezeNet 1.1 in shared mode (resumable)
    python bench/finetune.py warp-cost        # time a few warp-mode iterations
    python bench/finetune.py features         # fill the fine-tuned feature caches (pool5/fc6/fc7/softmax, one pass)
    python bench/finetune.py run              # SVM rows (FT pool5/fc6/fc7), FT softmax, each ± box regression
    python bench/finetune.py table            # markdown table
    python bench/finetune.py mainreg [--grid 6]  # box regression on the detector's main model (all trainval)

Writes ``bench/results/finetune.json`` and the curve ``bench/results/finetune_curve.{json,png}``.
The fine-tuned network itself stays in the user cache (``<cache>/finetune/``), never in the repo.

Compute: 2 cores shared with several other jobs (load average ~20 while this ran), so the main
run is shared mode (Fast R-CNN style) for a fixed ``ITERATIONS`` that fits ~25 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import DATA, PROPOSALS
from rcnn.bbox_regression import attach, train_box_regressor
from rcnn.cache import cache_dir, save_json
from rcnn.data import load_dataset
from rcnn.detect import CNNFeatures, DetectStats, detect_dataset, evaluate_model, fill_layers, fit
from rcnn.features import FeatureConfig, feature_path
from rcnn.finetune import FT_TAP, FinetuneConfig, finetune, softmax_model
from rcnn.svm import SVMConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "finetune.json"
#: ~16 s per shared-mode iteration (2 images at ×1.5, 128 RoIs, forward + backward) on the loaded
#: 2-core machine → 60 iterations ≈ 25 minutes (measured ~24 s/iteration at load ~20).
ITERATIONS = 60
CONFIG = FinetuneConfig(backbone="squeezenet1_1", mode="shared", iterations=ITERATIONS, val_images=8, val_every=20,
                        checkpoint_every=5)
#: SVM / box-regressor training images: every 4th trainval image (73 of 292) — extracting fine-tuned
#: features (pool5 ~11 MB/image) for all 292 would not fit the time left; all 72 test images are
#: evaluated. The frozen-feature reference rows below use the same 73 images.
TRAIN_STRIDE = 4
#: box-regression samples per class (reservoir): the dual ridge system is N×N with N×18432 pool5
#: features; 3000 keeps it to ~0.3 TFLOP on the shared cores (RBC has far more candidates).
REG_SAMPLES = 3000


def net_path() -> Path:
    return cache_dir() / "finetune" / CONFIG.key() / "squeezenet1_1-bccd.safetensors"


def load_results() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}


def train() -> None:
    tv = load_dataset(DATA, "trainval")
    out = net_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = finetune(tv.records, tv.classes, out, CONFIG, PROPOSALS, DATA, progress=True)
    hist = res.history
    base = out.with_suffix("")
    for ext in ("json", "png"):
        src = base.with_name(base.name + f".curve.{ext}")
        if src.exists():
            shutil.copyfile(src, RESULTS / f"finetune_curve.{ext}")
    results = load_results()
    results["finetune"] = {
        "config": asdict(CONFIG), "lr": CONFIG.base_lr, "iterations": res.iterations,
        "seconds_total": hist.get("seconds_total"), "seconds_per_iteration": round(hist.get("seconds_total", 0) / max(res.iterations, 1), 2),
        "data": hist.get("data"), "val": hist.get("val"), "net": str(out), "wall_this_process_s": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    save_json(OUT, results)
    print(json.dumps(results["finetune"], indent=1)[:2000])


def warp_cost(n: int = 3) -> None:
    """Seconds per warp-mode iteration (128 warped 227² regions, forward + backward)."""
    tv = load_dataset(DATA, "trainval")
    cfg = FinetuneConfig(backbone="squeezenet1_1", mode="warp", iterations=n, val_images=0, checkpoint_every=10**6)
    tmp = cache_dir() / "finetune" / "warp-cost" / "net.safetensors"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    for f in tmp.parent.glob("*"):
        f.unlink()
    import resource

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    c0 = cpu()
    res = finetune(tv.records[:8], tv.classes, tmp, cfg, PROPOSALS, DATA, val_records=[], progress=True)
    results = load_results()
    # CPU seconds include the one-off region labelling of 8 images (~0.5 s each): an upper bound
    results["warp_cost"] = {"iterations": n, "seconds_per_iteration": round(res.seconds_per_iteration, 2),
                            "cpu_seconds_per_iteration_upper_bound": round((cpu() - c0) / n, 2),
                            "regions_per_iteration": 128, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    save_json(OUT, results)
    print(results["warp_cost"])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["train", "warp-cost", "features", "run", "table", "mainreg"])
    ap.add_argument("--grid", type=int, default=3, help="mainreg: RoI grid of the regression features (3 = the model's)")
    ap.add_argument("--samples", type=int, default=MAIN_REG_SAMPLES, help="mainreg: regression samples per class")
    ap.add_argument("--lam", type=float, default=1000.0, help="mainreg: ridge penalty (released code: 1000)")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--frozen", action="store_true", help="features: ImageNet pool5 for the reference rows")
    ap.add_argument("--rows", nargs="*", help="substrings of row names (default: all)")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        train()
    elif a.cmd == "warp-cost":
        warp_cost()
    elif a.cmd == "features":
        features(a.worker, a.workers, a.frozen)
    elif a.cmd == "run":
        run(a.rows)
    elif a.cmd == "mainreg":
        main_regression(a.grid, a.samples, a.lam)
    else:
        print(table())


def train_test_records():
    tv, te = load_dataset(DATA, "trainval"), load_dataset(DATA, "test")
    return tv, te, tv.records[::TRAIN_STRIDE], te.records


def ft_config(layer: str) -> FeatureConfig:
    return FeatureConfig(backbone="squeezenet1_1", weights=str(net_path()), layer=layer, mode="shared")


def frozen_config(layer: str) -> FeatureConfig:
    return FeatureConfig(backbone="squeezenet1_1", layer=layer, mode="shared")


def features(worker: int = 0, workers: int = 1, frozen: bool = False) -> None:
    """Fine-tuned pool5/fc6/fc7/softmax (``frozen``: ImageNet pool5) of the test images and the
    training subset, one pass per image."""
    from rcnn.backbones import set_threads

    set_threads(1 if workers > 1 else None)
    _, _, tr, te = train_test_records()
    recs = (te + tr)[worker::workers]
    t0 = time.time()
    for i, r in enumerate(recs):
        if frozen:
            n = fill_layers(r, PROPOSALS, frozen_config("pool5"), ["pool5"], DATA)
        else:
            n = fill_layers(r, PROPOSALS, ft_config("fc7"), ["pool5", "fc6", "fc7", FT_TAP], DATA)
        print(f"{i + 1}/{len(recs)} {r.image_id} computed {n} {time.time() - t0:.0f}s", flush=True)


def _evaluate(model, te, src, bbox_reg: bool) -> tuple[dict, float]:
    stats = DetectStats()
    dets = detect_dataset(model, te, src, stats=stats, bbox_reg=bbox_reg)
    res, _ = evaluate_model(model, te, dets, "voc07")
    ap = {c.name: (None if math.isnan(c.ap) else round(c.ap, 4)) for c in res.classes}
    return {"ap": ap, "mAP": round(res.mean_ap, 4)}, stats.seconds_per_image


def run(names: list[str] | None = None) -> None:
    """Every row: SVMs on fine-tuned pool5/fc6/fc7, the fine-tuned softmax, frozen fc6/fc7 on the same
    images for reference; each evaluated without and with box regression (pool5 regressors)."""
    tv, te, tr, te_recs = train_test_records()
    results = load_results()
    svm = SVMConfig()
    regs: dict[str, tuple] = {}
    if "layer" in results.get("bbox_regression", {}):  # older single-regressor layout
        results["bbox_regression"] = {"fine-tuned": results["bbox_regression"]}

    def regressor(net: str):
        """Box regressors on the pool5 of the same network (fine-tuned or frozen), trained once."""
        if net not in regs:
            fc = ft_config("pool5") if net == "fine-tuned" else frozen_config("pool5")
            t0 = time.time()
            reg = train_box_regressor(tr, tv.classes, CNNFeatures(PROPOSALS, fc, DATA), max_per_class=REG_SAMPLES)
            regs[net] = (reg, time.time() - t0)
            results.setdefault("bbox_regression", {})[net] = {
                "layer": f"pool5 ({net})", "lambda": reg.lam, "min_iou": reg.min_iou, "train_images": len(tr),
                "seconds": round(regs[net][1], 1), "samples": reg.training["samples"]}
        return regs[net]
    rows = [("FT fc7 SVM", "svm", ft_config("fc7")), ("FT fc6 SVM", "svm", ft_config("fc6")),
            ("FT softmax", "softmax", ft_config(FT_TAP)), ("FT pool5 SVM", "svm", ft_config("pool5")),
            ("frozen pool5 SVM", "svm", frozen_config("pool5")), ("frozen fc7 SVM", "svm", frozen_config("fc7")),
            ("frozen fc6 SVM", "svm", frozen_config("fc6"))]
    for name, kind, fc in rows:
        if names and not any(n in name for n in names):
            continue
        src = CNNFeatures(PROPOSALS, fc, DATA)
        if not all(feature_path(r, PROPOSALS, src.feature_config, DATA).exists() for r in tr + te_recs):
            print(f"skip (feature cache not filled): {name}", flush=True)  # never hours of extraction here
            continue
        t0 = time.time()
        if kind == "svm":
            model, _ = fit(tv, src, svm, records=tr)
        else:
            model = softmax_model(net_path(), PROPOSALS, FeatureConfig(mode="shared"))
        train_s = time.time() - t0
        plain, spi = _evaluate(model, te, src, False)
        out = {"name": name, "train_images": len(tr), "test_images": len(te_recs), **plain,
               "train_seconds_from_cache": round(train_s, 1), "test_seconds_per_image_from_cache": round(spi, 3)}
        print(f"{name}: mAP {plain['mAP']:.4f} {plain['ap']} ({train_s:.0f} s)", flush=True)
        results["rows"][name] = out
        save_json(OUT, results)
        net = "fine-tuned" if name.startswith("FT") else "frozen"
        reg_fc = ft_config("pool5") if net == "fine-tuned" else frozen_config("pool5")
        if all(feature_path(r, PROPOSALS, replace(reg_fc, with_gt=True), DATA).exists() for r in tr + te_recs):
            reg, reg_s = regressor(net)
            attach(model, reg)
            withreg, spi = _evaluate(model, te, src, True)
            r2 = {**out, **withreg, "name": name + " + bbox reg", "train_seconds_from_cache": round(train_s + reg_s, 1),
                  "test_seconds_per_image_from_cache": round(spi, 3)}
            results["rows"][r2["name"]] = r2
            print(f"{r2['name']}: mAP {withreg['mAP']:.4f} {withreg['ap']}", flush=True)
            save_json(OUT, results)


MAIN_MODEL = RESULTS / "bccd_squeezenet_pool5_shared.rcnn"  # bench/ablation.py's main row (git-ignored)
#: samples per class for the main model's regressors: 4608-d pool5 (3×3 grid) → the primal
#: D×D system; 20000 keeps every platelet/WBC sample and ~all RBC ones of the 292 images.
MAIN_REG_SAMPLES = 20000


def main_regression(grid: int = 3, samples: int = MAIN_REG_SAMPLES, lam: float = 1000.0) -> None:
    """Box regression on the detector's main model (SqueezeNet pool5 shared, 3×3 grid, all 292
    trainval images; bench/ablation.py): regressors trained on every trainval image, on pool5
    features with RoI grid ``grid`` (3: the model's own cached features), evaluated on all of test
    with and without. Writes ``rows["main pool5 (all)[ + bbox reg ...]"]`` and the model with its
    regressor to ``bench/results/bccd_squeezenet_pool5_shared_bboxreg[_g6].rcnn`` (git-ignored)."""
    from rcnn.detect import RCNNModel

    if not MAIN_MODEL.exists():
        raise SystemExit(f"{MAIN_MODEL}: missing; python bench/ablation.py run --rows 'pool5 shared (all)' --force")
    tv, te = load_dataset(DATA, "trainval"), load_dataset(DATA, "test")
    model = RCNNModel.load(MAIN_MODEL)
    src = model.feature_source(DATA)
    reg_fc = replace(src.feature_config, grid=grid)
    missing = [r for r in tv.records + te.records if not feature_path(r, PROPOSALS, reg_fc, DATA).exists()]
    if missing:
        raise SystemExit(f"{len(missing)} images lack pool5 grid-{grid} features: python bench/finetune.py "
                         f"regfeatures --grid {grid}")
    results = load_results()
    name = "main pool5 (all)"
    if name not in results["rows"]:
        plain, spi = _evaluate(model, te, src, False)
        results["rows"][name] = {"name": name, "train_images": len(tv.records), "test_images": len(te.records), **plain,
                                 "train_seconds_from_cache": round(float(model.training.get("seconds", 0.0)), 1),
                                 "test_seconds_per_image_from_cache": round(spi, 3),
                                 "model": MAIN_MODEL.name}
        print(f"{name}: mAP {plain['mAP']:.4f} {plain['ap']}", flush=True)
        save_json(OUT, results)
    t0 = time.time()
    reg = train_box_regressor(tv.records, tv.classes, CNNFeatures(PROPOSALS, reg_fc, DATA), lam=lam, max_per_class=samples)
    reg_s = time.time() - t0
    attach(model, reg)
    withreg, spi = _evaluate(model, te, src, True)
    suffix = "" if (grid, lam) == (3, 1000.0) else f" (grid {grid}, λ {lam:g})"
    rname = f"{name} + bbox reg{suffix}"
    results = load_results()
    results["rows"][rname] = {"name": rname, "train_images": len(tv.records), "test_images": len(te.records), **withreg,
                              "train_seconds_from_cache": round(reg_s, 1), "test_seconds_per_image_from_cache": round(spi, 3),
                              "regressor": {"grid": grid, "lambda": lam, "min_iou": reg.min_iou, "samples": reg.training["samples"],
                                            "seconds": round(reg_s, 1)}}
    save_json(OUT, results)
    tag = "" if grid == 3 else f"_g{grid}"
    model.save(RESULTS / f"bccd_squeezenet_pool5_shared_bboxreg{tag}.rcnn")
    print(f"{rname}: mAP {withreg['mAP']:.4f} {withreg['ap']} (regressor {reg_s:.0f} s)", flush=True)


def table() -> str:
    res = load_results()
    classes = ["RBC", "WBC", "Platelets"]
    lines = ["| row | train/test images | " + " | ".join(classes) + " | mAP (VOC07) | train s (from cache) |",
             "|---|---|" + "---|" * len(classes) + "---|---|"]
    for r in res.get("rows", {}).values():
        aps = " | ".join("–" if r["ap"].get(c) is None else f"{r['ap'][c]:.3f}" for c in classes)
        lines.append(f"| {r['name']} | {r['train_images']}/{r['test_images']} | {aps} | **{r['mAP']:.3f}** | "
                     f"{r['train_seconds_from_cache']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
