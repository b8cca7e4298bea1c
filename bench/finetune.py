"""Fine-tuning and bounding-box regression on BCCD (paper §2.3, released ``bbox_regression/``).

    python bench/finetune.py mainreg [--lam 1000] # box regression on the detector's main model (all trainval)
    python bench/finetune.py mainreg --cv          # ... λ per class by 3-fold CV on trainval (grouped by image)
    python bench/finetune.py mainreg --hyper       # ... on the frozen best row (pool5+fire5 hypercolumn model)
    python bench/finetune.py speed [--threads 1]  # s/iteration of the main run's settings, fp32 vs bf16
    python bench/finetune.py train            # fine-tune SqueezeNet 1.1 in shared mode (resumable)
    python bench/finetune.py warp-cost        # the same for warp mode
    python bench/finetune.py features         # fine-tuned pool5/fc6/fc7/softmax caches of all BCCD (one pass)
    python bench/finetune.py run              # FT pool5/fc6/fc7 SVM, FT softmax, each ± box regression
    python bench/finetune.py table            # markdown table
    python bench/finetune.py rbc-fps          # contact sheet of the top RBC "background" false positives

Writes ``bench/results/finetune.json`` and the curve ``bench/results/finetune_curve.{json,png}``.
The fine-tuned network itself stays in the user cache (``<cache>/finetune/``), never in the repo.
Every row trains on all 292 trainval images and tests on all 72 test images (VOC07 AP), with the
detector's main-model geometry (bench/ablation.py: its proposals, shared mode ×1.5, 3×3 RoI grid).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from rcnn.backbones import FT_TAP
from rcnn.bbox_regression import attach, train_box_regressor
from rcnn.cache import cache_dir, save_json
from rcnn.cli.progress import show_progress
from rcnn.data import load_dataset
from rcnn.detect import DetectStats, detect_dataset, fit, softmax_model
from rcnn.evaluate import evaluate_model
from rcnn.features import FeatureConfig, feature_path, get_features, is_cached, tap_configs
from rcnn.finetune import FinetuneConfig, finetune
from rcnn.proposals import ProposalConfig
from rcnn.sources import CNNFeatures
from rcnn.svm import SVMConfig

ROOT = Path(__file__).resolve().parents[1]
# bench/ablation.py's data and proposal settings (its PROPOSALS explains them)
DATA = ROOT.parent / "shared" / "data" / "BCCD"
PROPOSALS = ProposalConfig(ks=(50, 100), resize_width=320, min_size=10)
RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "finetune.json"
#: Session 2: 1.3–1.5 s per shared-mode iteration with one thread (2 images at ×1.5, 128 RoIs,
#: forward + backward; `speed` below); session 1's 17 s/iteration was the load average of ~20.
#: 3600 iterations = 7200 image visits ≈ 25 epochs of the 284 training images: what fits ~75 min
#: (1 thread while other jobs ran, 2 after).
ITERATIONS = 3600
#: Session 2 settings (see README): the classifier reads the 3×3 pool5 grid the detector uses,
#: its input scaled to mean norm 20, bf16 autocast.
CONFIG = FinetuneConfig(backbone="squeezenet1_1", mode="shared", iterations=ITERATIONS, val_images=8, val_every=100,
                        checkpoint_every=50, tap="pool5", grid=3, input_norm=20.0, precision="bf16")
#: SVM / box-regressor training images: every trainval image (session 1 could afford every 4th).
TRAIN_STRIDE = 1
#: box-regression samples per class (reservoir): 4608-d pool5 (3×3 grid) → the primal D×D
#: system; 20000 keeps every platelet/WBC sample and ~all RBC ones of the 292 images.
REG_SAMPLES = 20000
#: λ candidates of the cross-validated regressor rows (the released 1000 in the middle)
CV_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
GRID = 3  # the main model's RoI grid (bench/ablation.py GRID)
#: iterative localisation rounds evaluated after box regression (``rcnn.detect.relocalize``; not in the paper)
RELOCALIZE_ROUNDS = (1, 2)
#: rows that get them (each round re-extracts features of ~600 boxes per test image)
RELOCALIZE_ROWS = ("FT pool5 SVM", "FT softmax", "FT-g6 softmax", "FT-g6 pool5 6x6 SVM")


#: Fine-tuned nets: ``main`` (the session-2 run above) and ``g6``, the same recipe with the
#: classifier reading the 6×6 RoI grid (18432-d, the frozen detector's best grid); ``--net`` picks one.
NETS = {"main": CONFIG, "g6": replace(CONFIG, grid=6)}
NET = "main"
#: ``--flip-test``: test-time flip averaging (``FeatureConfig(flip=True)``, not in the paper) on the test
#: images only; the SVMs / regressors are trained on the plain trainval features as before
FLIP_TEST = False


def net_config() -> FinetuneConfig:
    return NETS[NET]


def net_path() -> Path:
    return cache_dir() / "finetune" / net_config().key() / "squeezenet1_1-bccd.safetensors"


def result_key(base: str) -> str:
    """Where the selected net's results go in the JSON: ``base`` for ``main``, ``base_g6`` else."""
    return base if NET == "main" else f"{base}_{NET}"


def load_results() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}


def train() -> None:
    tv = load_dataset(DATA, "trainval")
    out = net_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = net_config()
    with show_progress() as progress:
        res = finetune(tv.records, tv.classes, out, cfg, PROPOSALS, DATA, progress=progress)
    hist = res.history
    base = out.with_suffix("")
    for ext in ("json", "png"):
        src = base.with_name(base.name + f".curve.{ext}")
        if src.exists():
            shutil.copyfile(src, RESULTS / f"{result_key('finetune_curve')}.{ext}")
    results = load_results()
    results[result_key("finetune")] = {
        "config": asdict(cfg), "lr": cfg.base_lr, "iterations": res.iterations,
        "seconds_total": hist.get("seconds_total"), "seconds_per_iteration": round(hist.get("seconds_total", 0) / max(res.iterations, 1), 2),
        "data": hist.get("data"), "val": hist.get("val"), "net": str(out), "wall_this_process_s": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    save_json(OUT, results)
    print(json.dumps(results[result_key("finetune")], indent=1)[:2000])


def speed(n: int = 4, threads: int = 1, modes: tuple[str, ...] = ("shared",)) -> None:
    """Seconds per iteration of the main run's settings in each of ``modes`` (shared: 2 images at
    ×1.5, 128 RoIs; warp: 128 warped 227² crops), fp32 vs bf16 autocast: wall and CPU (process)
    time over ``n`` iterations after a one-iteration warm-up, on 8 trainval images, ``threads``
    torch threads. Writes ``speed["<mode> <precision>"]``."""
    import os

    tv = load_dataset(DATA, "trainval")
    results = load_results()
    out = results.setdefault("speed", {})
    for mode in modes:
        for precision in ("fp32", "bf16"):
            cfg = replace(CONFIG, mode=mode, iterations=n + 1, precision=precision, val_images=0, checkpoint_every=10**6)
            tmp = cache_dir() / "finetune" / "speed" / "net.safetensors"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            for f in tmp.parent.glob("*"):
                f.unlink()
            finetune(tv.records[:8], tv.classes, tmp, replace(cfg, iterations=1), PROPOSALS, DATA, val_records=[],
                     threads=threads)  # warm-up (allocator, oneDNN kernels)
            for f in tmp.parent.glob("*"):
                f.unlink()
            c0 = time.process_time()
            res = finetune(tv.records[:8], tv.classes, tmp, cfg, PROPOSALS, DATA, val_records=[],
                           threads=threads)
            cpu = time.process_time() - c0  # includes labelling 8 images' regions once (~0.1 s each)
            out[f"{mode} {precision}"] = {
                "iterations": n + 1, "threads": threads, "seconds_per_iteration": round(res.seconds_per_iteration, 2),
                "cpu_seconds_per_iteration": round(cpu / (n + 1), 2), "load_avg_1min": round(os.getloadavg()[0], 1),
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            print(mode, precision, out[f"{mode} {precision}"], flush=True)
            results = load_results()
            results["speed"] = out
            save_json(OUT, results)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["train", "warp-cost", "features", "run", "table", "mainreg", "speed", "rbc-fps"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--net", choices=sorted(NETS), default="main", help="which fine-tuned net (train, features, run)")
    ap.add_argument("--iterations", type=int, default=9, help="speed: timed iterations (after 1 warm-up)")
    ap.add_argument("--grid", type=int, default=3, help="mainreg: RoI grid of the regression features (3 = the model's); "
                    "features: fine-tuned pool5 on this grid (6: the 'FT pool5 6x6 SVM' row)")
    ap.add_argument("--samples", type=int, default=MAIN_REG_SAMPLES, help="mainreg: regression samples per class")
    ap.add_argument("--lam", type=float, default=1000.0, help="mainreg: ridge penalty (released code: 1000)")
    ap.add_argument("--cv", action="store_true", help="mainreg: λ per class by 3-fold CV over CV_LAMBDAS on trainval")
    ap.add_argument("--hyper", action="store_true", help="mainreg: on the pool5+fire5 (hypercolumn) model instead")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--frozen", action="store_true", help="features: ImageNet pool5 for the reference rows")
    ap.add_argument("--rows", nargs="*", help="substrings of row names (default: all)")
    ap.add_argument("--flip-test", action="store_true", help="features/run: test-time flip averaging (test images only)")
    a = ap.parse_args(argv)
    global NET, FLIP_TEST
    NET, FLIP_TEST = a.net, a.flip_test
    if a.cmd == "train":
        train()
    elif a.cmd == "warp-cost":
        speed(n=2, threads=a.threads, modes=("warp",))
    elif a.cmd == "features":
        features(a.worker, a.workers, a.frozen, a.grid)
    elif a.cmd == "run":
        run(a.rows)
    elif a.cmd == "speed":
        speed(n=a.iterations, threads=a.threads)
    elif a.cmd == "rbc-fps":
        rbc_background()
    elif a.cmd == "mainreg":
        main_regression(a.grid, a.samples, CV_LAMBDAS if a.cv else a.lam, a.hyper)
    else:
        print(table())


def train_test_records():
    tv, te = load_dataset(DATA, "trainval"), load_dataset(DATA, "test")
    return tv, te, tv.records[::TRAIN_STRIDE], te.records


def ft_config(layer: str, grid: int = GRID) -> FeatureConfig:
    """Fine-tuned features; ``grid=6`` (the SVM on a finer RoI grid of the same fine-tuned trunk, the
    frozen detector's best grid) in bf16, as the frozen 6×6 row (18432-d: ~15 GB for all of BCCD)."""
    return FeatureConfig(backbone="squeezenet1_1", weights=str(net_path()), layer=layer, mode="shared", grid=grid,
                         precision="fp32" if grid == GRID else "bf16")


def frozen_config(layer: str) -> FeatureConfig:
    return FeatureConfig(backbone="squeezenet1_1", layer=layer, mode="shared", grid=GRID)


def fill(record, fc: FeatureConfig, layers: list[str]) -> int:
    """The taps ``layers`` of ``fc`` in one forward pass into the feature cache, as plain .npz (zlib on
    a 1000-box pool5 block costs seconds per image); returns how many were missing."""
    joined = replace(fc, layer="+".join(layers), with_gt=True)
    missing = [c for c in tap_configs(joined) if not is_cached(record, PROPOSALS, c, DATA)]
    if missing:
        get_features(record, PROPOSALS, joined, DATA, compress=False)
    return len(missing)


def features(worker: int = 0, workers: int = 1, frozen: bool = False, grid: int = GRID) -> None:
    """Fine-tuned pool5/fc6/fc7/softmax (``frozen``: ImageNet pool5; ``grid`` ≠ 3: fine-tuned pool5
    on that RoI grid only) of the test images and the training subset, one pass per image."""
    from rcnn.backbones import set_threads

    set_threads(1 if workers > 1 else None)
    _, _, tr, te = train_test_records()
    recs = (te if FLIP_TEST else te + tr)[worker::workers]
    t0 = time.time()
    for i, r in enumerate(recs):
        if FLIP_TEST:  # what run() reads at test time: the regressor's 3x3 pool5 and the rows' taps
            g = net_config().grid
            n = fill(r, replace(ft_config("pool5"), flip=True), ["pool5"])
            if g != GRID:
                n += fill(r, replace(ft_config("pool5", g), flip=True), ["pool5", FT_TAP])
            else:
                n += fill(r, replace(ft_config("fc7"), flip=True), ["pool5", FT_TAP])
        elif frozen:
            n = fill(r, frozen_config("pool5"), ["pool5"])
        elif NET != "main":  # 3x3 pool5 for the box regressor, the classifier's own grid for SVM + softmax
            g = net_config().grid
            n = fill(r, ft_config("pool5"), ["pool5"])
            n += fill(r, ft_config("pool5", g), ["pool5", FT_TAP])
        elif grid != GRID:
            n = fill(r, ft_config("pool5", grid), ["pool5"])
        else:  # plain .npz: zlib on a 1000-box pool5 block costs seconds per image
            n = fill(r, ft_config("fc7"), ["pool5", FT_TAP, "fc6", "fc7"])
        print(f"{i + 1}/{len(recs)} {r.image_id} computed {n} {time.time() - t0:.0f}s", flush=True)


def _evaluate(model, te, src, bbox_reg: bool, relocalize_rounds: int = 0) -> tuple[dict, float]:
    stats = DetectStats()
    dets = detect_dataset(model, te, src, stats=stats, bbox_reg=bbox_reg, relocalize_rounds=relocalize_rounds)
    res, _ = evaluate_model(model, te, dets, "voc07")
    ap = {c.name: (None if math.isnan(c.ap) else round(c.ap, 4)) for c in res.classes}
    return {"ap": ap, "mAP": round(res.mean_ap, 4)}, stats.seconds_per_image


def run(names: list[str] | None = None) -> None:
    """Every row on all 292 trainval → 72 test images: SVMs on fine-tuned pool5 (and fc6/fc7 when
    cached), the fine-tuned softmax; each without and with box regression on fine-tuned pool5
    (released λ = 1000, and λ per class by 3-fold CV on trainval). The frozen reference is the
    detector's main model (``mainreg``: rows "main pool5 (all)…")."""
    tv, te, tr, te_recs = train_test_records()
    results = load_results()
    svm = SVMConfig()
    regs: dict[str, tuple] = {}

    def regressor(lam):
        """Box regressors on fine-tuned pool5, trained once per λ setting."""
        key = "cv" if isinstance(lam, tuple) else f"{lam:g}"
        if key not in regs:
            t0 = time.time()
            reg = train_box_regressor(tr, tv.classes, CNNFeatures(PROPOSALS, ft_config("pool5"), DATA), lam=lam,
                                      max_per_class=REG_SAMPLES)
            regs[key] = (reg, time.time() - t0)
            tag = "" if NET == "main" else f" (net {NET})"
            results.setdefault("bbox_regression", {})[f"fine-tuned pool5{tag}, λ {key}"] = {
                "lambda": reg.lam, "min_iou": reg.min_iou, "train_images": len(tr), "seconds": round(regs[key][1], 1),
                "samples": reg.training["samples"], **({"cv_error": reg.training["cv_error"]} if key == "cv" else {})}
        return regs[key]

    if NET == "main":
        rows = [("FT pool5 SVM", "svm", ft_config("pool5")), ("FT pool5 6x6 SVM", "svm", ft_config("pool5", 6)),
                ("FT softmax", "softmax", ft_config(FT_TAP)),
                ("FT fc6 SVM", "svm", ft_config("fc6")), ("FT fc7 SVM", "svm", ft_config("fc7"))]
    else:  # a net whose classifier reads another grid: SVM and softmax on that grid (bf16, as extracted)
        g = net_config().grid
        rows = [(f"FT-{NET} pool5 {g}x{g} SVM", "svm", ft_config("pool5", g)),
                (f"FT-{NET} softmax", "softmax", ft_config(FT_TAP, g))]
    reg_ready = all(feature_path(r, PROPOSALS, replace(ft_config("pool5"), with_gt=True), DATA).exists() for r in tr + te_recs)
    for name, kind, fc in rows:
        if names and not any(n in name for n in names):
            continue
        src = CNNFeatures(PROPOSALS, fc, DATA)
        test_src = CNNFeatures(PROPOSALS, replace(fc, flip=True), DATA) if FLIP_TEST else src
        if not all(feature_path(r, PROPOSALS, src.feature_config, DATA).exists() for r in tr) or \
                not all(feature_path(r, PROPOSALS, test_src.feature_config, DATA).exists() for r in te_recs):
            print(f"skip (feature cache not filled): {name}", flush=True)  # never hours of extraction here
            continue
        name = f"{name} + test flip" if FLIP_TEST else name
        t0 = time.time()
        if kind == "svm":
            model, _ = fit(tv, src, svm, records=tr)
        else:
            model = softmax_model(net_path(), PROPOSALS, FeatureConfig(mode="shared", grid=fc.grid, precision=fc.precision))
        train_s = time.time() - t0
        plain, spi = _evaluate(model, te, test_src, False)
        out = {"name": name, "train_images": len(tr), "test_images": len(te_recs), **plain,
               "train_seconds_from_cache": round(train_s, 1), "test_seconds_per_image_from_cache": round(spi, 3)}
        print(f"{name}: mAP {plain['mAP']:.4f} {plain['ap']} ({train_s:.0f} s)", flush=True)
        results["rows"][name] = out
        save_json(OUT, results)
        if not reg_ready:
            continue
        for lam, suffix in ((1000.0, ""), (CV_LAMBDAS, " (λ CV on trainval)")):
            reg, reg_s = regressor(lam)
            attach(model, reg)
            withreg, spi = _evaluate(model, te, test_src, True)
            r2 = {**out, **withreg, "name": f"{name} + bbox reg{suffix}", "train_seconds_from_cache": round(train_s + reg_s, 1),
                  "test_seconds_per_image_from_cache": round(spi, 3), "lambda": reg.lam}
            results["rows"][r2["name"]] = r2
            print(f"{r2['name']}: mAP {withreg['mAP']:.4f} {withreg['ap']} λ {reg.lam}", flush=True)
            save_json(OUT, results)
            for rounds in RELOCALIZE_ROUNDS if name in RELOCALIZE_ROWS else ():
                rel, spi = _evaluate(model, te, test_src, True, rounds)
                r3 = {**r2, **rel, "name": f"{r2['name']} + relocalize {rounds}", "relocalize_rounds": rounds,
                      "test_seconds_per_image_from_cache": round(spi, 3)}
                results["rows"][r3["name"]] = r3
                print(f"{r3['name']}: mAP {rel['mAP']:.4f} {rel['ap']} ({spi:.2f} s/image)", flush=True)
                save_json(OUT, results)
            if name == "FT pool5 SVM" and not suffix and not FLIP_TEST:
                model.save(RESULTS / "bccd_squeezenet_ft_pool5_shared_bboxreg.rcnn")  # git-ignored


MAIN_MODEL = RESULTS / "bccd_squeezenet_pool5_shared.rcnn"  # bench/ablation.py's main row (git-ignored)
MAIN_REG_SAMPLES = REG_SAMPLES


#: the frozen detector's best row (bench/ablation.py "squeezenet1_1 pool5+fire5 6x6 shared bf16 (all)", git-ignored)
HYPER_MODEL = RESULTS / "bccd_squeezenet_pool5_fire5_shared.rcnn"


def main_regression(grid: int = 3, samples: int = MAIN_REG_SAMPLES, lam: float | tuple = 1000.0,
                    hyper: bool = False) -> None:
    """Box regression on the detector's main model (SqueezeNet pool5 shared, 3×3 grid, all 292
    trainval images; bench/ablation.py): regressors trained on every trainval image, on pool5
    features with RoI grid ``grid`` (3: the model's own cached features), evaluated on all of test
    with and without. Writes ``rows["main pool5 (all)[ + bbox reg ...]"]`` and the model with its
    regressor to ``bench/results/bccd_squeezenet_pool5_shared_bboxreg[_g6].rcnn`` (git-ignored).
    ``hyper``: the same regressors (on the main model's pool5 grid) added to the frozen best row, the
    ``pool5+fire5`` hypercolumn model (rows "hypercolumn pool5+fire5 (all)…")."""
    from rcnn.detect import RCNNModel

    tv, te = load_dataset(DATA, "trainval"), load_dataset(DATA, "test")
    path = HYPER_MODEL if hyper else MAIN_MODEL
    model = RCNNModel.load(path) if path.exists() else None
    if hyper and model is None:
        raise SystemExit(f"{path} is missing: python bench/ablation.py run --rows 'pool5+fire5'")
    if not hyper and (model is None or model.feature_source(DATA).feature_config != replace(frozen_config("pool5"),
                                                                                          with_gt=True)):
        raise SystemExit(f"{MAIN_MODEL} is missing or has other settings: python bench/ablation.py run "
                         f"--rows 'pool5 shared (all)' --force")
    src = model.feature_source(DATA)
    reg_fc = replace(frozen_config("pool5"), grid=grid, with_gt=True)
    missing = [r for r in tv.records + te.records if not feature_path(r, PROPOSALS, reg_fc, DATA).exists()]
    if missing:
        raise SystemExit(f"{len(missing)} images lack pool5 grid-{grid} features: python bench/finetune.py "
                         f"regfeatures --grid {grid}")
    results = load_results()
    name = "hypercolumn pool5+fire5 (all)" if hyper else "main pool5 (all)"
    if name not in results["rows"]:
        plain, spi = _evaluate(model, te, src, False)
        results["rows"][name] = {"name": name, "train_images": len(tv.records), "test_images": len(te.records), **plain,
                                 "train_seconds_from_cache": round(float(model.training.get("seconds", 0.0)), 1),
                                 "test_seconds_per_image_from_cache": round(spi, 3),
                                 "model": path.name}
        print(f"{name}: mAP {plain['mAP']:.4f} {plain['ap']}", flush=True)
        save_json(OUT, results)
    t0 = time.time()
    reg = train_box_regressor(tv.records, tv.classes, CNNFeatures(PROPOSALS, reg_fc, DATA), lam=lam, max_per_class=samples)
    reg_s = time.time() - t0
    attach(model, reg)
    withreg, spi = _evaluate(model, te, src, True)
    lam_txt = "CV on trainval" if isinstance(lam, tuple) else f"{lam:g}"
    suffix = "" if (grid, lam) == (3, 1000.0) else f" (grid {grid}, λ {lam_txt})"
    rname = f"{name} + bbox reg{suffix}"
    results = load_results()
    results["rows"][rname] = {"name": rname, "train_images": len(tv.records), "test_images": len(te.records), **withreg,
                              "train_seconds_from_cache": round(float(model.training.get("seconds", 0.0)) + reg_s, 1), "test_seconds_per_image_from_cache": round(spi, 3),
                              "regressor": {"grid": grid, "lambda": reg.lam, "min_iou": reg.min_iou, "samples": reg.training["samples"],
                                            "seconds": round(reg_s, 1), **({"cv_error": reg.training["cv_error"],
                                            "lambda_candidates": list(lam)} if isinstance(lam, tuple) else {})}}
    save_json(OUT, results)
    for rounds in RELOCALIZE_ROUNDS if grid == 3 else ():
        rel, spi = _evaluate(model, te, src, True, rounds)
        r3 = {**results["rows"][rname], **rel, "name": f"{rname} + relocalize {rounds}", "relocalize_rounds": rounds,
              "test_seconds_per_image_from_cache": round(spi, 3)}
        results["rows"][r3["name"]] = r3
        print(f"{r3['name']}: mAP {rel['mAP']:.4f} {rel['ap']} ({spi:.2f} s/image)", flush=True)
        save_json(OUT, results)
    tag = ("" if grid == 3 else f"_g{grid}") + ("_cv" if isinstance(lam, tuple) else "")
    model.save(RESULTS / f"bccd_squeezenet_pool5{'_fire5' if hyper else ''}_shared_bboxreg{tag}.rcnn")
    print(f"{rname}: mAP {withreg['mAP']:.4f} {withreg['ap']} (regressor {reg_s:.0f} s)", flush=True)


def rbc_background(every: int = 3, n: int = 24) -> None:
    """The ``n`` highest-scoring RBC detections of the fine-tuned model (+ box regression) that overlap
    no annotated box of any class (IoU < 0.1: the analysis' "BG" false positives) on every ``every``-th
    test image, as one contact sheet (``docs/analysis/bccd_rbc_background_fps.png``): are they background,
    or cells BCCD left unannotated?"""
    import cv2
    import numpy as np

    from rcnn.boxes import box_iou
    from rcnn.data import load_image
    from rcnn.detect import RCNNModel

    model = RCNNModel.load(RESULTS / "bccd_squeezenet_ft_pool5_shared_bboxreg.rcnn")
    te = load_dataset(DATA, "test")
    te.records = te.records[::every]
    dets = detect_dataset(model, te)
    rbc = te.classes.index("RBC")
    items = []
    for r in te.records:
        sel = (np.asarray(dets.image_ids) == r.image_id) & (np.asarray(dets.labels) == rbc)
        boxes, scores = np.asarray(dets.boxes)[sel], np.asarray(dets.scores)[sel]
        iou = np.asarray(box_iou(boxes.astype(np.float32), r.boxes.astype(np.float32))).max(1) if len(r.boxes) else \
            np.zeros(len(boxes))
        items += [(float(s), r, b) for s, b in zip(scores[iou < 0.1], boxes[iou < 0.1], strict=True)]
    items = sorted(items, key=lambda t: -t[0])[:n]
    tiles = []
    for score, r, b in items:
        img = load_image(r.path)
        x1, y1, x2, y2 = (int(v) for v in b)
        X1, Y1, X2, Y2 = max(0, x1 - 30), max(0, y1 - 30), min(img.shape[1], x2 + 30), min(img.shape[0], y2 + 30)
        crop = img[Y1:Y2, X1:X2].copy()
        cv2.rectangle(crop, (x1 - X1, y1 - Y1), (x2 - X1, y2 - Y1), (255, 128, 0), 2)
        crop = cv2.resize(crop, (160, 160))
        cv2.putText(crop, f"{score:.2f}", (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        tiles.append(crop)
    while len(tiles) % 6:
        tiles.append(np.full((160, 160, 3), 255, np.uint8))
    sheet = np.concatenate([np.concatenate(tiles[i:i + 6], 1) for i in range(0, len(tiles), 6)], 0)
    out = ROOT / "docs" / "analysis" / "bccd_rbc_background_fps.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    results = load_results()
    results["rbc_background_fps"] = {"test_images": len(te.records), "shown": len(items),
                                     "scores": [round(t[0], 3) for t in items], "figure": str(out.relative_to(ROOT))}
    save_json(OUT, results)
    print(f"wrote {out} ({len(items)} detections, scores {items[0][0]:.2f}..{items[-1][0]:.2f})")


def table() -> str:
    res = load_results()
    classes = ["RBC", "WBC", "Platelets"]
    lines = ["| row | train/test images | " + " | ".join(classes) + " | mAP (VOC07) | train s (from cache) | test s/image |",
             "|---|---|" + "---|" * len(classes) + "---|---|---|"]
    order = ["main pool5", "FT pool5", "FT softmax", "FT fc6", "FT fc7"]

    def rank(name: str) -> tuple:
        return (next((i for i, o in enumerate(order) if name.startswith(o)), len(order)), name)

    for key in sorted(res.get("rows", {}), key=rank):
        r = res["rows"][key]
        aps = " | ".join("–" if r["ap"].get(c) is None else f"{r['ap'][c]:.3f}" for c in classes)
        lines.append(f"| {r['name']} | {r['train_images']}/{r['test_images']} | {aps} | **{r['mAP']:.3f}** | "
                     f"{r['train_seconds_from_cache']:.0f} | {r.get('test_seconds_per_image_from_cache', float('nan')):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
