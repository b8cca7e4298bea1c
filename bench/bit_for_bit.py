"""Do two source trees of rcnn train and detect bit for bit alike? (a check for refactorings)

    python bench/bit_for_bit.py run SRC OUT          # the CLI of SRC/src on a 6+4-image BCCD subset, fresh cache
    python bench/bit_for_bit.py compare BEFORE AFTER # -> bench/results/bit_for_bit.json

``run`` copies nothing: it runs ``rcnn`` with ``PYTHONPATH=SRC/src`` and ``RCNN_CACHE_DIR=OUT/cache``
(empty, so proposals and features are computed by that tree) on a subset of BCCD (every 48th of
the first trainval images, 6, and every 12th test image, 4; ``OUT/BCCD6``, links to the data):
``train`` (SqueezeNet 1.1 pool5, shared mode, 3×3 grid) → ``bbox-reg`` → ``evaluate`` with and without
box regression (and one round of ``--relocalize``), and the HOG baseline's ``train`` → ``evaluate``.
``compare`` checks the model files' tensors byte for byte, their metadata (timings and dates aside),
the results JSON and the COCO detections files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

from rcnn.cache import save_json

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "BCCD"
OUT = ROOT / "bench" / "results" / "bit_for_bit.json"
PROPOSALS = ["--ks", "50,100", "--resize-width", "320", "--min-size", "10", "--workers", "1"]
MODELS = ("shared.rcnn", "shared_reg.rcnn", "hog.rcnn")
EVALS = ("eval", "eval_reg", "eval_hog")
VOLATILE = {"date", "seconds", "seconds_total", "dataset", "model", "seconds_per_image_cached"}


def subset(out: Path) -> Path:
    root = out / "BCCD6"
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for sub in ("JPEGImages", "Annotations"):
        if not (root / sub).exists():
            (root / sub).symlink_to(DATA / sub)
    for split, step, n in (("trainval", 48, 6), ("test", 12, 4)):
        ids = (DATA / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids[::step][:n]) + "\n")
    return root


def run(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = subset(out)
    env = {**os.environ, "PYTHONPATH": str(src.resolve() / "src"), "RCNN_CACHE_DIR": str(out / "cache")}

    def rcnn(*args: str) -> None:
        subprocess.run([sys.executable, "-c", "from rcnn.cli import main; main()", *args], env=env, check=True)

    rcnn("train", str(data), "-o", str(out / "shared.rcnn"), "-b", "squeezenet1_1", "-l", "pool5", "-m", "shared",
         "--grid", "3", *PROPOSALS)
    rcnn("bbox-reg", str(out / "shared.rcnn"), str(data), "-o", str(out / "shared_reg.rcnn"))
    rcnn("evaluate", str(out / "shared_reg.rcnn"), str(data), "-s", "test", "-o", str(out / "eval_reg"), "--relocalize", "1")
    rcnn("evaluate", str(out / "shared.rcnn"), str(data), "-s", "test", "-o", str(out / "eval"))
    rcnn("train", str(data), "-o", str(out / "hog.rcnn"), "-b", "hog", *PROPOSALS)
    rcnn("evaluate", str(out / "hog.rcnn"), str(data), "-s", "test", "-o", str(out / "eval_hog"))


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in VOLATILE}
    return [_strip(x) for x in d] if isinstance(d, list) else d


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def compare(before: Path, after: Path) -> dict:
    doc: dict = {"before": str(before), "after": str(after), "models": {}, "evaluations": {}}
    for name in MODELS:
        (tb, mb), (ta, ma) = _read(before / name), _read(after / name)
        doc["models"][name] = {
            "tensors": {k: list(v.shape) for k, v in tb.items()},
            "tensors_identical": tb.keys() == ta.keys() and all(
                tb[k].dtype == ta[k].dtype and tb[k].shape == ta[k].shape and tb[k].tobytes() == ta[k].tobytes() for k in tb),
            "metadata_identical": _strip(mb) == _strip(ma),
            "svm_objectives": mb["rcnn"]["training"]["objective"],
        }
    for ev in EVALS:
        rb, ra = (json.loads((d / ev / "results.json").read_text()) for d in (before, after))
        db, da = ((d / ev / "detections_coco.json").read_bytes() for d in (before, after))
        doc["evaluations"][ev] = {"mAP": rb["mAP"], "ap": {c: v["ap"] for c, v in rb["classes"].items()},
                                  "results_identical": _strip(rb) == _strip(ra), "detections": len(json.loads(db)),
                                  "detections_file_identical": db == da}
    doc["all_identical"] = all(m["tensors_identical"] and m["metadata_identical"] for m in doc["models"].values()) and all(
        e["results_identical"] and e["detections_file_identical"] for e in doc["evaluations"].values())
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("src", type=Path, help="a checkout of the repository (its src/ is run)")
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.src, a.out)
    else:
        doc = compare(a.before, a.after)
        save_json(a.out, doc)
        print(json.dumps({"all_identical": doc["all_identical"],
                          "mAP": {k: v["mAP"] for k, v in doc["evaluations"].items()}}))


if __name__ == "__main__":
    main()
