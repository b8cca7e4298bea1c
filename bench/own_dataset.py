"""Own-dataset benchmark: the default recipe, chosen on validation splits of three datasets, scored once on test.

    python bench/own_dataset.py validate   # each candidate: train on 3/4 of trainval, score on the held-out 1/4
    python bench/own_dataset.py test       # the chosen recipe on full trainval → test, BCCD from a cold cache
    python bench/own_dataset.py speed      # extraction: trunk cache vs per-region zlib cache; detection s/image
    python bench/own_dataset.py test-finetune bccd   # the same with ``finetune=1500`` (``rcnn train --finetune``)
    python bench/own_dataset.py ship bccd  # the BCCD model ``test`` trained → the model zoo (rcnn.load("bccd"))

``test`` detects with the variant validation chose (box regression, iterative localisation).

Datasets: BCCD (small cells, 640×480), Penn-Fudan pedestrians (one class, mid-size people), and
``closeup``, a stand-in for unseen photo collections built from Penn-Fudan: each image cropped to
its people (large objects filling the frame) and resized to a random longer side in 240–1600 px
(photos of very different sizes). Validation parts come from ``rcnn.data.holdout_split`` (fixed
seed) of each trainval split; test splits are scored once, with the recipe the validation chose.
Results: ``bench/results/own_dataset.json`` (merged run by run, so any phase can be re-run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import rcnn
from rcnn.cache import cache_dir, save_json
from rcnn.data import holdout_split, load_dataset, load_image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results" / "own_dataset.json"
VAL_FRACTION = 0.25
FINETUNE_ITERATIONS = 1500  # rcnn train --finetune's default
MODELS = Path(tempfile.gettempdir()) / "rcnn-own-dataset"  # the models ``test`` trains (outside any cache)
#: candidates compared on validation: the trained recipe × how it detects. The hypercolumn layer
#: itself was chosen earlier on a BCCD validation split (ablation.json, valcompare rows)
CANDIDATES = {"pool5+fire5": {"layer": "pool5+fire5"}}
DETECT_VARIANTS = {"no box regression": {"bbox_reg": False, "relocalize": 0},
                   "box regression": {"bbox_reg": True, "relocalize": 0},
                   "box regression + relocalize 1": {"bbox_reg": True, "relocalize": 1}}


def closeup_root() -> Path:
    """The ``closeup`` view of Penn-Fudan (VOC layout in the user cache, never in the repository)."""
    return cache_dir() / "datasets" / "pennfudan-closeup"


def make_closeup() -> Path:
    """Build the ``closeup`` view: per Penn-Fudan image, the union of its people + 15 % margin,
    resized to a longer side drawn log-uniformly from 240–1600 px (seeded by image id)."""
    import cv2

    root = closeup_root()
    if (root / "ImageSets" / "Main" / "test.txt").is_file():
        return root
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split in ("trainval", "test"):
        ds = load_dataset(DATA / "PennFudanPed", split)
        for r in ds.records:
            img = load_image(r.path)
            b = np.asarray(r.boxes, np.float64)
            x1, y1 = b[:, :2].min(0)
            x2, y2 = b[:, 2:].max(0)
            mx, my = 0.15 * (x2 - x1), 0.15 * (y2 - y1)
            cx1, cy1 = int(max(0, x1 - mx)), int(max(0, y1 - my))
            cx2, cy2 = int(min(r.width, np.ceil(x2 + mx))), int(min(r.height, np.ceil(y2 + my)))
            crop = img[cy1:cy2, cx1:cx2]
            rng = np.random.default_rng(int(hashlib.sha256(r.image_id.encode()).hexdigest()[:8], 16))
            side = float(np.exp(rng.uniform(np.log(240), np.log(1600))))
            s = side / max(crop.shape[:2])
            size = (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
            cv2.imwrite(str(root / "JPEGImages" / f"{r.image_id}.jpg"), crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
            sx, sy = size[0] / (cx2 - cx1), size[1] / (cy2 - cy1)
            objs = "".join(
                f"<object><name>person</name><difficult>{int(d)}</difficult><bndbox>"
                f"<xmin>{(bx1 - cx1) * sx + 1:.1f}</xmin><ymin>{(by1 - cy1) * sy + 1:.1f}</ymin>"
                f"<xmax>{(bx2 - cx1) * sx:.1f}</xmax><ymax>{(by2 - cy1) * sy:.1f}</ymax></bndbox></object>"
                for (bx1, by1, bx2, by2), d in zip(b, r.difficult, strict=True))
            (root / "Annotations" / f"{r.image_id}.xml").write_text(
                f"<annotation><filename>{r.image_id}.jpg</filename><size><width>{size[0]}</width>"
                f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{r.image_id}\n" for r in ds.records))
    return root


def datasets() -> dict[str, Path]:
    for name in ("BCCD", "PennFudanPed"):
        if not (DATA / name).is_dir():
            sys.exit(f"error: {DATA / name} not found (the benchmark needs ../shared/data)")
    return {"bccd": DATA / "BCCD", "pennfudan": DATA / "PennFudanPed", "closeup": make_closeup()}


def load_results() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def save(update: dict) -> None:
    doc = load_results()
    for k, v in update.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    save_json(OUT, doc)


def machine() -> dict:
    return {"cores": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def scores(ev) -> dict:
    return {"map_voc07": round(ev.map, 4), "coco_map": ev.coco["mAP@[.5:.95]"], "coco_ap50": ev.coco["AP50"],
            "per_class": {k: round(v, 4) for k, v in ev.per_class.items()}, "images": ev.images}


def validate(names: list[str]) -> None:
    """Every candidate on every dataset's validation part; the choice is the best mean over datasets."""
    for name, root in datasets().items():
        if names and name not in names:
            continue
        tr, val = holdout_split(load_dataset(root, "trainval"), VAL_FRACTION)
        for cand, overrides in CANDIDATES.items():
            t0 = time.perf_counter()
            det = rcnn.train(tr, None, "default", workers=2, **overrides)
            train_s = time.perf_counter() - t0
            rows = {}
            for variant, opts in DETECT_VARIANTS.items():
                ev = rcnn.evaluate(det, val, None, **opts)
                rows[variant] = scores(ev)
                print(f"{name} {cand} {variant}: val mAP {ev.map:.4f}", flush=True)
            save({"validation": {f"{name} | {cand}": {"dataset": name, "candidate": cand, "train_images": len(tr),
                                                      "val_images": len(val), "train_seconds": round(train_s, 1),
                                                      "resolved": det.recipe.get("resolved", {}), "variants": rows,
                                                      "machine": machine()}}})
    choose()


def choose() -> dict:
    """The candidate × variant with the best mean validation mAP over the datasets measured."""
    val = load_results().get("validation", {})
    table: dict[tuple[str, str], dict[str, float]] = {}
    for row in val.values():
        for variant, s in row["variants"].items():
            table.setdefault((row["candidate"], variant), {})[row["dataset"]] = s["map_voc07"]
    full = {k: v for k, v in table.items() if len(v) == max(len(x) for x in table.values())}
    (cand, variant), per = max(full.items(), key=lambda kv: float(np.mean(list(kv[1].values()))))
    chosen = {"candidate": cand, "variant": variant, "mean_val_map": round(float(np.mean(list(per.values()))), 4),
              "val_map": per, "rule": "highest mean VOC07 mAP over the datasets' validation parts"}
    save({"chosen": chosen})
    print("chosen:", chosen)
    return chosen


def test(names: list[str]) -> None:
    """The chosen recipe (the library's default preset) trained on each full trainval and scored once on
    test. BCCD runs in a child process with an empty cache so its timings are cold-cache."""
    for name in datasets():
        if names and name not in names:
            continue
        if name == "bccd":
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "RCNN_CACHE_DIR": tmp}
                subprocess.run([sys.executable, __file__, "test-one", name], env=env, check=True)
        else:
            test_one(name)


def test_one(name: str, finetune: int = 0) -> None:
    """One dataset: train on trainval (``finetune`` SGD iterations first, as ``rcnn train --finetune``),
    score once on test; the row goes to ``test`` (or ``test_finetune``)."""
    root = datasets()[name]
    tv = load_dataset(root, "trainval")
    cold = not any(cache_dir().glob("trunk/*"))
    t0, r0 = time.perf_counter(), _cpu()
    det = rcnn.train(tv, None, "default", workers=2, finetune=finetune)
    train_wall, train_cpu = time.perf_counter() - t0, _cpu() - r0
    train_rss = _peak_rss_gb()  # training alone (the test scoring below runs in the same process)
    model_path = MODELS / f"{name}{'-finetune' if finetune else ''}.rcnn"  # for ``speed --model``
    model_path.parent.mkdir(parents=True, exist_ok=True)
    det.save(model_path)
    variant = load_results().get("chosen", {}).get("variant", "box regression")
    ev = rcnn.evaluate(det, root, "test", **DETECT_VARIANTS[variant])
    prep = det.model.training["prepare"]
    row = {"dataset": name, "recipe": det.recipe, "train_images": len(tv), "cold_cache": cold,
           "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
           "seconds_by_stage": det.model.training["seconds_by_stage"],
           "feature_cache_mb": round(prep["cache_mb"], 1),
           "feature_cache_mb_per_image": round(prep["cache_mb"] / max(1, prep["features_computed"] + prep["features_cached"]), 3),
           "peak_rss_gb": _peak_rss_gb(), "peak_rss_gb_training": train_rss,
           "model_mb": round(model_path.stat().st_size / 1e6, 2),
           "detection": variant, "test": scores(ev),
           "test_seconds_per_image_from_cache": round(ev.seconds_per_image, 3),
           "machine": machine()}
    save({"test_finetune" if finetune else "test": {name: row}})
    print(json.dumps(row, indent=1, default=str), flush=True)


def rescore(name: str, model_path: str) -> None:
    """Score a model written by ``test`` with the detection variant validation chose, when the test run
    began before the choice existed (the model is the same; only how it detects differs)."""
    variant = load_results()["chosen"]["variant"]
    ev = rcnn.evaluate(rcnn.load(model_path), datasets()[name], "test", **DETECT_VARIANTS[variant])
    row = load_results()["test"][name]
    if row.get("detection", "box regression") != variant:
        row["test_with_" + row.get("detection", "box regression").replace(" ", "_")] = row["test"]
    row.update({"detection": variant, "test": scores(ev)})
    save({"test": {name: row}})
    print(name, variant, ev.map, flush=True)


def ship(name: str) -> None:
    """Copy the model ``test`` trained on ``name`` into the package's model zoo and write its manifest
    entry with the test row's numbers (``rcnn models``, ``rcnn.load(name)``)."""
    import shutil

    from rcnn.cache import file_sha256

    if name != "bccd":
        sys.exit("error: only the BCCD model is shipped (Penn-Fudan's person model comes from bench/train_zoo.py)")
    row = load_results()["test"][name]
    zoo = ROOT / "src" / "rcnn" / "resources" / "zoo"
    shutil.copyfile(MODELS / f"{name}.rcnn", zoo / f"{name}.rcnn")
    manifest = json.loads((zoo / "manifest.json").read_text())
    manifest["models"][name] = {
        "kind": "rcnn", "file": f"{name}.rcnn", "sha256": file_sha256(zoo / f"{name}.rcnn"),
        "description": "R-CNN blood-cell detector (default recipe): linear SVMs on squeezenet1_1 pool5+fire5 "
                       "(hypercolumn) features of selective-search regions, box regression and one round of "
                       "iterative localisation.",
        "classes": ["Platelets", "RBC", "WBC"],
        "trained_on": "BCCD trainval (292 microscope images of blood smears, 640x480)",
        "recipe": f"rcnn train BCCD -s trainval (the default recipe; resolved trunk short side "
                  f"{row['recipe']['resolved']['short_side']} px)",
        "licence": "BCCD: MIT",
        "numbers": {"test": {"label": "BCCD test mAP (VOC07), 72 images; recipe chosen on validation data of other "
                                      "datasets", "value": row["test"]["map_voc07"], "coco_map": row["test"]["coco_map"],
                             "per_class": row["test"]["per_class"],
                             "source": "bench/results/own_dataset.json: test.bccd"}},
    }  # fmt: skip
    save_json(zoo / "manifest.json", manifest)
    print(f"shipped {zoo / (name + '.rcnn')}")


def _peak_rss_gb() -> float:
    """Peak resident memory so far of this process or any of its children (GB)."""
    return round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                     resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1e6, 2)


def _cpu() -> float:
    ru, rc = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + rc.ru_utime + rc.ru_stime


def speed(n: int = 8, model: str | None = None) -> None:
    """Feature extraction per image, the same images in the same run: the per-region cache (pool5+fire5
    features of every proposal, float16, ``np.savez_compressed``) vs the trunk cache (float16 maps,
    zstd); and detection from the image file (proposals + trunk + pooling + SVMs + box regression +
    the recipe's iterative localisation) with ``model`` (the BCCD model ``test`` wrote), else a
    model trained on 2 images for timing only."""
    import io

    from rcnn.features import extract_features, feature_path, get_trunk_maps
    from rcnn.proposals import get_proposals

    ds = load_dataset(datasets()["bccd"], "trainval")
    recs = ds.records[:: max(1, len(ds.records) // n)][:n]
    det = rcnn.train(ds.__class__(ds.root, ds.split, ds.classes, recs[:2], format=ds.format), None, "default",
                     bbox_reg=False, workers=2)  # resolves the default sizes and fills the proposal cache
    fc = det.source(ds.root).feature_config
    pc = det.model.proposal_config()
    old = new = old_mb = new_mb = 0.0
    for r in recs:
        boxes = np.concatenate([r.boxes, get_proposals(r, pc, ds.root)]).astype(np.float32)
        t0 = time.perf_counter()
        feats = extract_features(load_image(r.path), boxes, fc.backbone_obj(), fc.layer, "shared", grid=fc.grid,
                                 short_side=fc.short_side, scales=fc.scales)
        buf = io.BytesIO()
        np.savez_compressed(buf, boxes=boxes, feats=feats.astype(np.float16))
        old += time.perf_counter() - t0
        old_mb += buf.tell() / 1e6
        path = feature_path(r, None, fc, ds.root)
        path.unlink(missing_ok=True)  # time a cold entry
        t0 = time.perf_counter()
        get_trunk_maps(r, fc, ds.root)
        new += time.perf_counter() - t0
        new_mb += path.stat().st_size / 1e6
    test = load_dataset(datasets()["bccd"], "test").records[:n]
    timed = rcnn.load(model) if model else det
    timed.detect(load_image(test[0].path))  # warm-up: the network's first call allocates
    t0, c0 = time.perf_counter(), _cpu()
    for r in test:
        timed.detect(load_image(r.path))
    det_wall, det_cpu = (time.perf_counter() - t0) / len(test), (_cpu() - c0) / len(test)
    row = {"images": len(recs), "image_size": [recs[0].width, recs[0].height], "short_side": fc.short_side,
           "region_cache_s_per_image": round(old / len(recs), 3), "trunk_cache_s_per_image": round(new / len(recs), 3),
           "speedup": round(old / max(new, 1e-9), 2), "region_cache_mb_per_image": round(old_mb / len(recs), 2),
           "trunk_cache_mb_per_image": round(new_mb / max(1, len(recs)), 2),
           "detect_images": len(test), "detect_model": "BCCD test model" if model else "2-image model",
           "detect_recipe": {k: timed.recipe.get(k) for k in ("bbox_reg", "relocalize")},
           "detect_wall_s_per_image": round(det_wall, 3),
           "detect_cpu_s_per_image": round(det_cpu, 3), "threads": 2, "machine": machine()}
    save({"speed": row})
    print(json.dumps(row, indent=1), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["validate", "choose", "test", "test-one", "test-finetune", "rescore", "speed",
                                          "ship"])
    ap.add_argument("--iterations", type=int, default=FINETUNE_ITERATIONS, help="test-finetune: SGD iterations")
    ap.add_argument("--model", help="speed: time detection with this model (e.g. the BCCD model test wrote)")
    ap.add_argument("datasets", nargs="*", help="subset of bccd, pennfudan, closeup (default: all)")
    a = ap.parse_args()
    if a.phase == "validate":
        validate(a.datasets)
    elif a.phase == "choose":
        choose()
    elif a.phase == "test":
        test(a.datasets)
    elif a.phase == "test-one":
        test_one(a.datasets[0])
    elif a.phase == "test-finetune":
        for name in a.datasets or ["bccd"]:
            test_one(name, finetune=a.iterations)
    elif a.phase == "ship":
        ship(a.datasets[0] if a.datasets else "bccd")
    elif a.phase == "rescore":
        rescore(a.datasets[0], a.datasets[1])
    else:
        speed(model=a.model)


if __name__ == "__main__":
    main()
