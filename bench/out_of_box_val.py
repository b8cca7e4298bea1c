"""Choose the zero-training detector's box-tightness setting on validation data that is not VOC.

Run: ``python bench/out_of_box_val.py`` (after ``bench/train_zoo.py``) → ``bench/results/out_of_box_val.json``.

Data: Penn-Fudan ``val`` (32 images, never used to train anything evaluated here). Two detectors
are scored there, both through :class:`rcnn.demo.ImagenetDetector` on the same proposals:

* ``classifier``: the ImageNet classifier with a *validation vocabulary* holding one extra name,
  "person (ImageNet)" = ImageNet's three person classes (ballplayer, groom, scuba diver) and every
  garment class covering the torso or legs (jean, suit, jersey, gown, ...; fixed from the class
  names before any run). It behaves like the vocabulary on VOC: it fires on parts (a jean box
  on the legs) and on loose boxes — the failure this setting is chosen to fix;
* ``head``: the person SVM trained on Penn-Fudan ``train`` (``bench/train_zoo.py``'s val model).

Rows: the tightness exponent α (vocabulary scores × predicted IoU^α, :mod:`rcnn.tightness`, the
scorer trained on Penn-Fudan ``train`` + a BCCD ``train`` subset), part suppression on/off and box
voting (:func:`rcnn.demo.vote_boxes`) on/off.
AP is VOC07 11-point at IoU 0.5 (``rcnn.evaluate``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: ImageNet-1k indices of "person (ImageNet)": the person classes + garments covering torso or legs
PERSON_IMAGENET = [981, 982, 983, 399, 400, 411, 445, 459, 465, 474, 501, 568, 578, 601, 608, 610, 614, 617, 638, 639,
                   652, 655, 689, 697, 735, 775, 824, 834, 841, 842, 869, 887]  # fmt: skip


def main() -> None:
    from rcnn.data import load_dataset, load_image
    from rcnn.demo import DemoConfig, ImagenetDetector, ModelHead, Vocabulary, load_vocabulary
    from rcnn.detect import RCNNModel
    from rcnn.evaluate import Detections, evaluate_detections
    from rcnn.tightness import TightnessScorer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "PennFudanPed")
    ap.add_argument("--split", default="val")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "out_of_box_val.json")
    args = ap.parse_args()

    zoo_doc = json.loads((HERE / "results" / "train_zoo.json").read_text())
    p = zoo_doc["person"]
    val_model = Path(p["val"]["by_C"][f"{p['val']['chosen_C']:g}"]["model"])
    base = load_vocabulary()
    names = [n for n in base.names if n != "uniform"] + ["person (ImageNet)"]
    members = [m for n, m in zip(base.names, base.members, strict=True) if n != "uniform"] + [tuple(PERSON_IMAGENET)]
    vocab = Vocabulary(tuple(names), tuple(members), source="validation vocabulary (bench/out_of_box_val.py)")
    head = ModelHead(RCNNModel.load(val_model), tuple(p["calibration"]["platt"]))
    tight = TightnessScorer.load(ROOT / "src" / "rcnn" / "resources" / "zoo" / "tightness.safetensors")
    base_cfg = DemoConfig(threshold=0.05, max_detections=100)
    det = ImagenetDetector(vocab, base_cfg, heads=[head], tightness=tight)
    proxy, head_col = names.index("person (ImageNet)"), len(names)

    ds = load_dataset(args.data, args.split)
    regions, t0 = {}, time.perf_counter()
    for r in ds.records:
        regions[r.image_id] = det.score_regions(load_image(r.path))
        print(r.image_id, {k: round(v, 1) for k, v in regions[r.image_id].seconds.items()}, flush=True)

    def only(rs, col: int, head_power: float = 0.0):
        """The regions with every name but ``col`` zeroed (each detector evaluated on its own);
        ``head_power``: the head's column × predicted IoU ** head_power (the library re-scores
        vocabulary names only; this row asks whether the head would gain too)."""
        s = np.zeros_like(rs.scores)
        s[:, col] = rs.scores[:, col] * (np.clip(rs.tightness, 1e-6, 1) ** head_power if head_power else 1.0)
        return replace(rs, scores=s)

    rows = {}
    for which, col in (("classifier", proxy), ("head", head_col)):
        for contain, vote, a in itertools.product((0.7, 0.0, 0.5, 0.9), (0.0, 0.5), args.alphas):
            cfg = replace(base_cfg, tightness=a if which == "classifier" else 0.0, contain=contain, vote_iou=vote)
            parts = []
            for r in ds.records:
                res = det.decide(only(regions[r.image_id], col, a if which == "head" else 0.0), cfg)
                keep = res.labels == col
                parts.append(Detections(np.array([r.image_id] * int(keep.sum()), dtype=object), res.boxes[keep],
                                        res.scores[keep], np.zeros(int(keep.sum()), np.int64)))
            ev = evaluate_detections(ds, Detections.concat(parts), "voc07")
            key = f"{which} contain={contain:g} vote={vote:g} tightness={a:g}"
            rows[key] = {"ap": round(ev.classes[0].ap, 4), "config": asdict(cfg)}
            print(key, rows[key]["ap"], flush=True)
    doc = {
        "what": "tightness / part-suppression settings of the zero-training detector, chosen on Penn-Fudan val",
        "command": "python bench/out_of_box_val.py", "data": f"{args.data} ({args.split}, {len(ds.records)} images)",
        "person_imagenet_classes": PERSON_IMAGENET, "head_model": str(val_model),
        "tightness_scorer": tight.training, "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1), "load_avg_1min": round(os.getloadavg()[0], 1),
    }  # fmt: skip
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
