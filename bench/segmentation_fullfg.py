"""How the two halves of ``full+fg`` are weighted (paper §4, Table 3), on Penn-Fudan.

Reads the region features ``bench/segmentation.py`` cached (same mask proposals, same
split, same training rows) and, per tap, trains ``full+fg`` with the ``full`` half scaled by
``w`` relative to the ``fg`` half (``train_segmenter(full_weight=w)``; w = 1 is the default,
both halves at mean norm 20), for every LinearSVR C of a grid. The single-half rows
(``full``, ``fg``) are trained on the same grid for reference. Everything is selected on
the val split — per row the pasting threshold and C; for the ``full+fg (w on val)`` row
also w — and each selected row is evaluated on test once; a paired bootstrap over the test
images (``rcnn.segmentation.paired_bootstrap``) says how far ``full+fg``'s difference to
``full`` and to ``fg`` is from noise. ``--select pooled`` chooses on val plus the training
images' 4-fold out-of-fold scores (128 images instead of 32; key suffix ``-pooled``). Writes
``bench/results/segmentation_fullfg.json`` under the key ``<mode>[-<precision>]``.

    python bench/segmentation_fullfg.py [--mode shared|warp] [--taps fc6 fc7] [--weights 0.25 0.5 1 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rcnn.cache import save_json
from rcnn.data import load_splits
from rcnn.segmentation import (
    MaskProposalConfig,
    RegionFeatureConfig,
    choose_threshold,
    evaluate_segmenter,
    image_confusions,
    paired_bootstrap,
    prepare_dataset,
    train_segmenter,
)
from rcnn.segmentation.model import choose_threshold_pooled, out_of_fold_items

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "PennFudanPed"
OUT = ROOT / "bench" / "results" / "segmentation_fullfg.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="shared", choices=["shared", "warp"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--train-regions", type=int, default=50)
    ap.add_argument("--taps", nargs="+", default=["pool5", "fc6", "fc7"])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    ap.add_argument("--C", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    ap.add_argument("--pool5-C", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
                    help="C grid at pool5 (18-37 k dims: ~1 min per fit)")
    ap.add_argument("--select", default="val", choices=["val", "pooled"],
                    help="choose threshold, C and w on val (32 images) or on val + 4-fold out-of-fold train (128)")
    ap.add_argument("--limit", type=int, default=0, help="images per split (0 = all), for quick checks")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: Penn-Fudan not found")
    splits = load_splits(DATA, ("train", "val", "test"), args.limit)
    mc, fc = MaskProposalConfig(), RegionFeatureConfig(mode=args.mode, precision=args.precision)
    t0 = time.perf_counter()
    train = prepare_dataset(splits["train"], mc, fc, max_regions=args.train_regions, with_gt=True)
    val = prepare_dataset(splits["val"], mc, fc)
    test = prepare_dataset(splits["test"], mc, fc)
    print(f"loaded features in {time.perf_counter() - t0:.0f}s")
    classes = splits["train"].classes

    def fit(strategy: str, tap: str, c: float, w: float = 1.0) -> dict:
        m = train_segmenter(train, classes, strategy, tap, C=c, mask_config=mc, feature_config=fc, full_weight=w)
        if args.select == "pooled":  # threshold (and C, w) on val + the training images' out-of-fold scores
            oof = out_of_fold_items(train, classes, strategy, tap, c, folds=4, full_weight=w)
            th, table = choose_threshold_pooled(m, val, oof)
        else:
            th, table = choose_threshold(m, val)
        m.threshold = th
        return {"model": m, "C": c, "w": w, "threshold": th, "val_mean_iou": table[th]}

    confs: dict[tuple[str, str], np.ndarray] = {}

    def report(label: str, tap: str, best: dict, grid: list[dict]) -> dict:
        ev = evaluate_segmenter(best["model"], test)
        m = best["model"]
        confs[(label, tap)] = image_confusions([it.label_map for it in test],
                                               [m.predict(it.regions, it.feats) for it in test], len(classes) + 1)
        row = {"row": label, "tap": tap, "C": best["C"], "full_weight": best["w"], "threshold": best["threshold"],
               "val_mean_iou": best["val_mean_iou"], "background_iou": ev["iou"]["background"],
               "person_iou": ev["iou"]["person"], "mean_iou": ev["mean_iou"],
               "C_at_grid_edge": best["C"] in (min(g["C"] for g in grid), max(g["C"] for g in grid)),
               "val_grid": [{k: g[k] for k in ("C", "w", "threshold", "val_mean_iou")} for g in grid]}
        print(f"{tap:6s} {label:22s} C={best['C']:g} w={best['w']:g} th={best['threshold']:.3f} "
              f"val {best['val_mean_iou']:.4f} | test mean {row['mean_iou']:.4f} person {row['person_iou']:.4f}")
        return row

    rows = []
    for tap in args.taps:
        cs = args.pool5_C if tap == "pool5" else args.C
        for strategy in ("full", "fg"):
            grid = [fit(strategy, tap, c) for c in cs]
            rows.append(report(strategy, tap, max(grid, key=lambda g: g["val_mean_iou"]), grid))
        by_w: dict[float, list[dict]] = {}
        for w in args.weights:
            by_w[w] = [fit("full+fg", tap, c, w) for c in cs]
            if w == 1.0:  # the default weighting, C chosen on val
                rows.append(report("full+fg (w=1)", tap, max(by_w[w], key=lambda g: g["val_mean_iou"]), by_w[w]))
        grid = [g for v in by_w.values() for g in v]
        rows.append(report("full+fg (w on val)", tap, max(grid, key=lambda g: g["val_mean_iou"]), grid))
        # paired bootstrap over the test images: is full+fg's lead (or deficit) more than noise?
        for r in rows[-2:]:
            r["test_bootstrap"] = {f"vs_{b}": paired_bootstrap(confs[(r["row"], tap)], confs[(b, tap)])
                                   for b in ("full", "fg")}
            print("   ", r["row"], {k: (round(v["difference"], 4), [round(x, 4) for x in v["ci95"]], v["p_a_better"])
                                     for k, v in r["test_bootstrap"].items()})
    key = args.mode + ("" if args.precision == "fp32" else f"-{args.precision}")
    key += "" if args.train_regions == 50 else f"-train{args.train_regions}"
    key += "" if args.select == "val" else f"-{args.select}"
    prev = json.loads(args.out.read_text()) if args.out.is_file() else {}
    prev[key] = {"feature_config": {"mode": args.mode, "precision": args.precision, "backbone": fc.backbone},
                 "mask_method": mc.method, "train_regions_per_image": args.train_regions,
                 "images": {s: len(d) for s, d in splits.items()}, "weights": args.weights, "C": args.C,
                 "pool5_C": args.pool5_C, "select": args.select, "rows": rows}
    save_json(args.out, prev)
    print(json.dumps([{k: v for k, v in r.items() if k != "val_grid"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
