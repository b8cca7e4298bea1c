"""Run the analysis tools on BCCD test with the detector of bench/ablation.py.

    python bench/analysis_bccd.py [--train-every 4] [--unit-images 16]

Trains (or reuses) SqueezeNet 1.1 shared-mode fc7 and fc6 models with ablation.py's proposal
settings on every ``--train-every``-th trainval image (all of them with 1; the full row of the
ablation when its caches exist), runs them over all 72 test images, and writes the report
(``report/bccd`` by default, not committed), the figures under ``docs/analysis/`` and the
numbers to ``bench/results/analysis.json``. Models are kept in ``<cache>/models/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image

from rcnn.analysis.report import ReportInputs, write_report
from rcnn.analysis.units import run_units
from rcnn.cache import cache_dir, save_json
from rcnn.data import load_dataset
from rcnn.detect import RCNNModel, detect_dataset, fit
from rcnn.features import FeatureConfig, get_features
from rcnn.proposals import ProposalConfig
from rcnn.sources import CNNFeatures
from rcnn.svm import SVMConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "analysis"
OUT = ROOT / "bench" / "results" / "analysis.json"
# bench/ablation.py's data and proposal settings (its PROPOSALS explains them)
DATA = ROOT.parent / "shared" / "data" / "BCCD"
PROPOSALS = ProposalConfig(ks=(50, 100), resize_width=320, min_size=10)
#: the features of the models: SqueezeNet 1.1 shared mode on the ablation's 3×3 RoI grid
FEATURES = FeatureConfig(backbone="squeezenet1_1", mode="shared", grid=3)


def shrink_png(path: Path, colors: int = 192) -> None:
    """Palette-quantise a figure so the committed PNG stays small."""
    im = Image.open(path).convert("RGB")
    im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-every", type=int, default=4)
    ap.add_argument("--unit-images", type=int, default=16)
    ap.add_argument("--report", type=Path, default=ROOT / "report" / "bccd")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=True, help="write docs/analysis and the results JSON")
    ap.add_argument("--C", type=float, default=None, help="SVM C (default: 1e-3 x trainval / training images)")
    ap.add_argument("--layers", default="fc7", help="comma-separated; the first is the report's model, the others "
                    "are compared in the sensitivity plot")
    args = ap.parse_args(argv)
    tv, te = load_dataset(DATA, "trainval"), load_dataset(DATA, "test")
    train = tv.records[:: args.train_every]
    t0 = time.time()
    layers = args.layers.split(",")
    for i, r in enumerate(train + te.records):  # every layer's features in one pass per image
        get_features(r, PROPOSALS, replace(FEATURES, layer="+".join(layers), with_gt=True), DATA)
        print(f"features {i + 1}/{len(train) + len(te.records)} {r.image_id} {time.time() - t0:.0f}s", flush=True)
    # as ablation.py: C scaled by trainval / training images, because the hinge-loss sum shrinks
    # with the data (C = 1e-3 on a quarter of trainval gave w ~ 0: every score ~ -1, measured)
    svm = replace(SVMConfig(), C=args.C or SVMConfig().C * len(tv.records) / len(train))
    models, dets = {}, {}
    for layer in layers:
        path = cache_dir() / "models" / f"bccd-squeezenet1_1-{layer}-shared-every{args.train_every}-C{svm.C:.4g}.rcnn"
        src = CNNFeatures(PROPOSALS, replace(FEATURES, layer=layer), DATA)
        if path.is_file():
            model = RCNNModel.load(path)
        else:
            t1 = time.time()
            model, _ = fit(tv, src, svm, records=train)
            model.save(path)
            print(f"trained {layer} on {len(train)} images in {time.time() - t1:.0f}s -> {path}", flush=True)
        models[layer] = (model, path)
        dets[layer] = detect_dataset(model, te, src)
    out = args.report
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # unit grids of the fc7 model (its channels, paper Figure 3 rows 1-2) on the first test images
    main_layer = layers[0]
    units_png, units, hits = run_units(str(models[main_layer][1]), te, "auto", (out / "units.png"), 16, args.unit_images)
    page = write_report(ReportInputs(
        f"SqueezeNet {main_layer} (shared)", te, dets[main_layer], compare=[(f"SqueezeNet {x} (shared)", dets[x]) for x in layers[1:]],
        unit_grids=[(f"Top 16 activations of {len(units)} units over the first {args.unit_images} test images", units_png)],
        notes=[f"Trained on {len(train)} of {len(tv.records)} BCCD trainval images (every {args.train_every}th), "
               f"proposals {PROPOSALS}."], samples=3), out)
    rep = json.loads((out / "report.json").read_text())
    print(json.dumps({"C": svm.C, "mAP": rep["evaluation"]["mAP"], "dAP": rep["false_positives"]["dAP"]}), flush=True)
    if not args.docs:
        return
    DOCS.mkdir(parents=True, exist_ok=True)
    for name in ("pr.png", "fp_types.png", "dap.png", "sensitivity.png", "sensitivity_subsets.png", "units.png",
                 "det_best_0.png", "det_worst_3.png"):
        if (out / name).exists():
            shutil.copy(out / name, DOCS / name)
            shrink_png(DOCS / name, 64 if name == "units.png" else 192)
    for warps in DOCS.glob("warps_*.png"):
        shrink_png(warps)
    fa = rep["false_positives"]
    save_json(OUT, {
        "train_images": len(train), "svm_C": svm.C, "layer": main_layer, "test_images": len(te.records), "report": str(page),
        "mAP": rep["evaluation"]["mAP"], "ap": {k: v["ap"] for k, v in rep["evaluation"]["classes"].items()},
        "dAP": fa["dAP"], "fp_counts": {k: v["fp_counts"] for k, v in fa["classes"].items()},
        "sensitivity": rep["sensitivity"],
        "units": [{"unit": u.label(), "top": [round(h.score, 2) for h in hits[u][:4]]} for u in units],
        "draw_threshold": rep["draw_threshold"], "minutes": round((time.time() - t0) / 60, 1),
    })
    print(json.dumps({"mAP": rep["evaluation"]["mAP"], "dAP": fa["dAP"]}, indent=1))
    assert not math.isnan(rep["evaluation"]["mAP"] or math.nan)


if __name__ == "__main__":
    main()
