"""Out-of-the-box detection: the zero-training detector scored on the 19 genuine VOC 2007 test images.

Run: ``python bench/out_of_box.py [--data ../shared/data/VOC2007-test-sample]`` →
``bench/results/out_of_box.json`` and ``bench/results/out_of_box_contact.png`` (the 19 images with
the detections at or above ``--display-threshold``, VOC names).

The detector's names become VOC classes through the versioned mapping
``src/rcnn/resources/voc_mapping.json`` (``rcnn.demo.load_class_mapping``); unmapped names are
dropped. AP is VOC07 11-point (``rcnn.evaluate.evaluate_detections``); the mAP is over the classes
with non-difficult positives in the sample. The VOC sample is test-only: nothing here trains or
tunes anything; each row is a detector setting fixed beforehand on other data.

The detector is the shipped one (``rcnn.zoo.load("imagenet")``: the vocabulary, the person head,
the tightness scorer). Rows: the vocabulary alone (the heads' names zeroed: the detector before
the person head), + the person head, + tightness re-scoring at the default exponent (chosen on
Penn-Fudan val by ``bench/out_of_box_val.py``). Each image's regions are scored once
(``ImagenetDetector.score_regions``, cached under ``$RCNN_CACHE_DIR/out_of_box/<key>``, the key
covering the detector's files and settings) and every row decides on the same scores
(``ImagenetDetector.decide``), so a row costs no CNN time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "VOC2007-test-sample"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    from rcnn import zoo
    from rcnn.cache import cache_dir, settings_hash
    from rcnn.data import load_dataset, load_image
    from rcnn.demo import DemoConfig, RegionScores, contact_sheet, load_class_mapping
    from rcnn.evaluate import Detections, evaluate_detections
    from rcnn.visualize import draw_detections, save_png

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threshold", type=float, default=0.05, help="detector threshold for AP (low: the PR curve)")
    ap.add_argument("--max-detections", type=int, default=100)
    ap.add_argument("--display-threshold", type=float, default=0.5, help="contact sheet: boxes at or above this")
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "out_of_box.json")
    args = ap.parse_args()

    ds = load_dataset(args.data, "test")
    config = DemoConfig(threshold=args.threshold, max_detections=args.max_detections)
    w0, c0 = time.perf_counter(), _cpu()
    det = zoo.load("imagenet", config=config)
    load_s = {"wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(_cpu() - c0, 2)}
    mapping = load_class_mapping()
    to_voc = mapping.label_map(det.class_names, ds.classes)
    g = len(det.vocabulary)
    # each row: a decision setting, and whether the shipped heads' names take part
    rows = {
        "classifier": (replace(config, tightness=0.0), False),
        "classifier + person head": (replace(config, tightness=0.0), True),
        "classifier + person head + tightness (default)": (replace(config, tightness=DemoConfig().tightness), True),
    }
    final = "classifier + person head + tightness (default)"

    # region scores are cached (content-keyed): a row added later costs no CNN time
    m = zoo.info("imagenet")
    key = settings_hash("out_of_box", asdict(replace(config, threshold=0.5, max_detections=10)),
                        [zoo.info(h).sha256 for h in m.heads], m.tightness_sha256, det.vocabulary.source)
    cdir = cache_dir() / "out_of_box" / key
    regions, per_image = {}, []
    for r in ds.records:
        image = load_image(r.path)
        path = cdir / f"{r.image_id}.npz"
        if path.is_file():
            z = np.load(path)
            rs = RegionScores(z["boxes"], z["scores"], z["class_boxes"], tuple(z["size"]), int(z["n"]),
                              json.loads(str(z["seconds"])), z["tightness"] if z["tightness"].size else None)
        else:
            rs = det.score_regions(image)
            cdir.mkdir(parents=True, exist_ok=True)
            np.savez(path, boxes=rs.boxes, scores=rs.scores, class_boxes=rs.class_boxes, size=np.array(rs.image_size),
                     n=np.array(rs.num_proposals), seconds=np.array(json.dumps(rs.seconds)),
                     tightness=rs.tightness if rs.tightness is not None else np.zeros(0, np.float32))
        regions[r.image_id] = (image, rs)
        per_image.append({"image": r.image_id, "proposals": rs.num_proposals,
                          "seconds": {k: round(v, 2) for k, v in rs.seconds.items()}})
        print(per_image[-1], flush=True)

    results, sheets = {}, {}
    for name, (cfg, heads) in rows.items():
        parts, drawn = [], []
        for r in ds.records:
            image, rs = regions[r.image_id]
            if not heads:  # the vocabulary alone: the heads' names score 0
                sc = rs.scores.copy()
                sc[:, g:] = 0.0
                rs = replace(rs, scores=sc)
            res = det.decide(rs, cfg)
            lab = to_voc[res.labels]
            keep = lab >= 0
            parts.append(Detections(np.array([r.image_id] * int(keep.sum()), dtype=object), res.boxes[keep],
                                    res.scores[keep], lab[keep]))
            show = keep & (res.scores >= args.display_threshold)
            drawn.append(draw_detections(image, res.boxes[show], lab[show], res.scores[show], ds.classes))
        ev = evaluate_detections(ds, Detections.concat(parts), "voc07")
        d = ev.as_dict()
        with_pos = {k: v for k, v in d["classes"].items() if v["npos"] > 0}
        results[name] = {
            "config": asdict(cfg), "heads": heads,
            "mAP": d["mAP"], "classes_with_positives": len(with_pos),
            "person_ap": d["classes"]["person"]["ap"],
            "ap": {k: v["ap"] for k, v in with_pos.items()},
            "npos": {k: v["npos"] for k, v in with_pos.items()},
            "num_dets": {k: v["num_dets"] for k, v in d["classes"].items()},
        }  # fmt: skip
        sheets[name] = drawn
        print(f"{name}: mAP {d['mAP']:.3f} over {len(with_pos)} classes; person AP {d['classes']['person']['ap']}")

    sheet_path = args.output.with_name(args.output.stem + "_contact.png")
    save_png(sheet_path, contact_sheet(sheets[final], height=200, columns=5), colors=256)
    doc = {
        "what": "zero-training detector on the VOC 2007 test sample (test-only; no training or tuning on it)",
        "command": "python bench/out_of_box.py",
        "data": str(args.data), "images": len(ds.records), "metric": "voc07 11-point AP, IoU 0.5, difficult ignored",
        "mapping": {"source": mapping.source, "version": mapping.version, "pairs": mapping.pairs},
        "detector": {"backbone": config.backbone, "vocabulary": det.vocabulary.source, "names": len(det.class_names),
                     "heads": [h.describe() for h in det.heads], "tightness": m.tightness},
        "rows": results, "final_row": final,
        "contact_sheet": {"path": str(sheet_path.relative_to(HERE.parent)), "row": final,
                          "display_threshold": args.display_threshold},
        "timing": {"model_load": load_s, "per_image_wall_s": per_image,
                   "note": "wall seconds per stage when the regions were scored (cached after); see bench/demo.py for CPU time",
                   "cores": len(os.sched_getaffinity(0)), "load_avg_1min": round(os.getloadavg()[0], 1)},
        "data_notes": ["000084.xml describes another picture (5 chairs, a sofa, a dining table) than 000084.jpg "
                       "(a rider on a bicycle in front of houses; the same file as examples/000084.jpg): its "
                       "objects cannot be found and detections of the rider count as false positives."],
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output} and {sheet_path}")


if __name__ == "__main__":
    main()
