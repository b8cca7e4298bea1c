"""One self-contained HTML report of a detector on a dataset split: per-class AP table and
PR curves, detections on the best and worst images, the false-positive analysis (paper
Figure 4), the sensitivity analysis (Figure 5) and pool5 unit grids (Figures 3/6).

``index.html`` references PNGs written beside it (relative paths, no network access).
An image that cannot be read is left out of the pictures with one warning (``logging``)
and listed in ``report.json``; the rest of the report is written.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rcnn.analysis.detections import detections_of, named
from rcnn.analysis.fp import FP_TYPES, LOC, TP, FPAnalysis, analyze_false_positives, dap_figure, fp_figure
from rcnn.analysis.sensitivity import SensitivityResult, sensitivity, sensitivity_figure, subsets_figure
from rcnn.analysis.units import run_units
from rcnn.data import Dataset, ImageReadError, ImageRecord, load_image
from rcnn.detect import DetectStats
from rcnn.evaluate import Detections, EvalResult, evaluate_detections, pr_axes
from rcnn.progress import ProgressFn

log = logging.getLogger(__name__)


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pr_figure(result: EvalResult, path, title: str = "Precision–recall per class"):
    """All classes' PR curves in one figure (AP in the legend)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for c in result.classes:
        if c.num_dets and not math.isnan(c.ap):
            ax.plot(c.recall, c.precision, lw=1.6, label=f"{c.name} (AP {c.ap:.3f})")
    pr_axes(ax, f"{title} — mAP {result.mean_ap:.3f} ({result.metric})")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def best_threshold(fa: FPAnalysis) -> float:
    """The score threshold maximising F1 over all classes' detections (for drawing)."""
    s = np.concatenate([c.scores for c in fa.per_class]) if fa.per_class else np.zeros(0)
    o = np.concatenate([c.outcome for c in fa.per_class]) if fa.per_class else np.zeros(0)
    npos = sum(c.npos for c in fa.per_class)
    if len(s) == 0 or npos == 0:
        return math.inf
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(o[order] == TP)
    fp = np.cumsum(o[order] >= LOC)
    f1 = 2 * tp / np.maximum(tp + fp + npos, 1)
    return float(s[order][int(np.argmax(f1))])


@dataclass
class ImageScore:
    image_id: str
    f1: float
    tp: int
    fp: int
    missed: int


def image_scores(fa: FPAnalysis, records: Sequence[ImageRecord], threshold: float) -> list[ImageScore]:
    """Per-image F1 of the detections scoring >= ``threshold`` (best first)."""
    tp: dict[str, int] = {}
    fp: dict[str, int] = {}
    for c in fa.per_class:
        keep = c.scores >= threshold
        for iid, o in zip(c.image_ids[keep], c.outcome[keep], strict=True):
            if o == TP:
                tp[str(iid)] = tp.get(str(iid), 0) + 1
            elif o >= LOC:
                fp[str(iid)] = fp.get(str(iid), 0) + 1
    out = []
    for r in records:
        n = int((~r.difficult).sum())
        t, f = tp.get(r.image_id, 0), fp.get(r.image_id, 0)
        f1 = 2 * t / max(2 * t + f + (n - t), 1) if (n or f) else 1.0
        out.append(ImageScore(r.image_id, f1, t, f, n - t))
    return sorted(out, key=lambda x: (-x.f1, -x.tp, x.image_id))


def draw_image(record: ImageRecord, dets: Detections, classes: Sequence[str], threshold: float, max_side: int = 480) -> np.ndarray:
    """The image with ground truth (thin white) and detections >= ``threshold``, downsized."""
    from PIL import Image, ImageDraw

    from rcnn.visualize import draw_detections

    img = load_image(record.path)
    sel = (dets.image_ids == record.image_id) & (dets.scores >= threshold)
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for b in record.boxes:
        d.rectangle([float(b[0]), float(b[1]), float(b[2]) - 1, float(b[3]) - 1], outline=(255, 255, 255), width=1)
    out = draw_detections(np.asarray(pil), dets.boxes[sel], dets.labels[sel], dets.scores[sel], list(classes))
    h, w = out.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1:
        out = np.asarray(Image.fromarray(out).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
    return out


@dataclass
class ReportInputs:
    """What :func:`write_report` needs; ``compare`` adds other models to the sensitivity plot."""

    name: str
    dataset: Dataset
    dets: Detections
    metric: str = "voc07"
    groups: dict[str, tuple[str, ...]] | None = None
    compare: list[tuple[str, Detections]] = field(default_factory=list)
    unit_grids: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG already in out_dir)
    notes: list[str] = field(default_factory=list)
    samples: int = 4
    skipped: dict[str, str] = field(default_factory=dict)  # image id -> why the caller left it out (not drawn)


def _img(src: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{w}>'


def _draw_best_and_worst(inp: ReportInputs, scores: list[ImageScore], thr: float, out: Path,
                         skipped: dict[str, str]) -> list[tuple[str, str, ImageScore]]:
    """Draw the ``inp.samples`` best and worst images (by F1, best first) as PNGs in ``out``;
    returns ``(tag, file name, score)`` per picture. An image that cannot be read is added to
    ``skipped`` with one warning and the next one in the ranking stands in for it."""
    from rcnn.visualize import save_png

    ds = inp.dataset
    scores = [s for s in scores if s.image_id not in skipped]
    k = min(inp.samples, max(len(scores) // 2, 1)) if scores else 0
    by_id = {r.image_id: r for r in ds.records}
    shots: list[tuple[str, str, ImageScore]] = []
    drawn: set[str] = set()
    for tag, ranked in (("best", scores), ("worst", scores[::-1])):
        n = 0
        for s in ranked:
            if n == k:
                break
            if s.image_id in skipped or (tag == "worst" and s.image_id in drawn and len(scores) > 1):
                continue
            try:
                picture = draw_image(by_id[s.image_id], inp.dets, ds.classes, thr)
            except ImageReadError as e:
                skipped[s.image_id] = str(e)
                log.warning("%s; left out of the report's pictures", e)
                continue
            fn = f"det_{tag}_{len(shots)}.png"
            save_png(out / fn, picture)
            shots.append((tag, fn, s))
            drawn.add(s.image_id)
            n += 1
    return shots


def write_report(inp: ReportInputs, out_dir: str | Path) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns the HTML path. Also writes
    ``report.json`` with every number shown. Images that cannot be read (and those in
    ``inp.skipped``) are not drawn; they are named in the page and in ``skipped_images``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = inp.dataset
    ev = evaluate_detections(ds, inp.dets, inp.metric)
    fa = analyze_false_positives(ds.classes, ds.records, inp.dets, groups=inp.groups, metric=inp.metric)
    sens = [sensitivity(ds.classes, ds.records, fa, model=inp.name)]
    for name, d in inp.compare:
        sens.append(sensitivity(ds.classes, ds.records, d, model=name))
    pr_figure(ev, out / "pr.png")
    fp_figure(fa, out / "fp_types.png")
    dap_figure(fa, out / "dap.png")
    sensitivity_figure(sens, out / "sensitivity.png")
    if sens[0].characteristics:
        subsets_figure(sens[0], out / "sensitivity_subsets.png")
    thr = best_threshold(fa)
    skipped = dict(inp.skipped)
    shots = _draw_best_and_worst(inp, image_scores(fa, ds.records, thr), thr, out, skipped)
    if skipped:
        inp = replace(inp, notes=[*inp.notes, f"{len(skipped)} unreadable image(s) left out of the pictures: "
                                  + "; ".join(skipped.values())])
    doc = _html(inp, ev, fa, sens, thr, shots, out)
    path = out / "index.html"
    path.write_text(doc, encoding="utf-8")
    (out / "report.json").write_text(json.dumps({
        "model": inp.name, "dataset": str(ds.root), "split": ds.split, "images": len(ds.records),
        "evaluation": ev.as_dict(), "false_positives": fa.as_dict(), "sensitivity": [s.as_dict() for s in sens],
        "draw_threshold": None if math.isinf(thr) else thr,
        "skipped_images": skipped,
    }, indent=1))
    return path


def _html(inp: ReportInputs, ev: EvalResult, fa: FPAnalysis, sens: list[SensitivityResult], thr: float, shots, out: Path) -> str:
    ds = inp.dataset
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(c.name)}</td><td>{'—' if math.isnan(c.ap) else f'{c.ap:.3f}'}</td><td>{c.npos}</td><td>{c.num_dets}</td>"
        + "".join(f"<td>{fa.per_class[i].counts()[t]}</td>" for t in FP_TYPES)
        + "".join(f"<td>{100 * fa.per_class[i].dap[t]:+.1f}</td>" for t in FP_TYPES) + "</tr>"
        for i, c in enumerate(ev.classes)
    )
    md = fa.mean_dap()
    mean_row = (f"<tr class='tot'><td>mean</td><td>{ev.mean_ap:.3f}</td><td>{sum(c.npos for c in ev.classes)}</td>"
                f"<td>{sum(c.num_dets for c in ev.classes)}</td>"
                + "".join(f"<td>{sum(p.counts()[t] for p in fa.per_class)}</td>" for t in FP_TYPES)
                + "".join(f"<td>{100 * md[t]:+.1f}</td>" for t in FP_TYPES) + "</tr>")
    head = "".join(f"<th>{t}</th>" for t in FP_TYPES) + "".join(f"<th>dAP {t}</th>" for t in FP_TYPES)
    s0 = sens[0]
    srows = ""
    for ch, sub in s0.characteristics.items():
        vals = ", ".join(f"{e(k)} {v:.3f} (n={s0.counts[ch][k]})" for k, v in sub.items() if not math.isnan(v))
        srows += f"<tr><td>{e(ch)}</td><td>{vals}</td></tr>"
    det_html = ""
    for tag in ("best", "worst"):
        items = [
            f"<figure>{_img(fn, f'{tag} image {s.image_id}')}<figcaption>{e(s.image_id)}: F1 {s.f1:.2f} "
            f"({s.tp} TP, {s.fp} FP, {s.missed} missed)</figcaption></figure>"
            for t, fn, s in shots if t == tag
        ]
        det_html += f"<h3>{tag.capitalize()} images</h3><div class='row'>{''.join(items)}</div>"
    units = "".join(f"<figure>{_img(p.name, cap)}<figcaption>{e(cap)}</figcaption></figure>" for cap, p in inp.unit_grids)
    if not units:
        units = "<p>No unit grids in this report (pass a model or backbone and <code>--units</code>).</p>"
    notes = "".join(f"<li>{e(n)}</li>" for n in inp.notes)
    subsets = _img("sensitivity_subsets.png", "normalized AP per subset") if (out / "sensitivity_subsets.png").exists() else ""
    thr_txt = "none" if math.isinf(thr) else f"{thr:.3f}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>R-CNN report: {e(inp.name)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}}
table{{border-collapse:collapse;font-size:14px}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}} tr.tot{{font-weight:bold;background:#f4f4f4}}
.row{{display:flex;flex-wrap:wrap;gap:10px}} figure{{margin:0}} figcaption{{font-size:13px;color:#555}}
img{{max-width:100%}} h2{{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:1.6em}}
</style></head><body>
<h1>R-CNN report: {e(inp.name)}</h1>
<p>Dataset <code>{e(str(ds.root))}</code>, split <b>{e(str(ds.split or 'all'))}</b>: {len(ds.records)} images,
{ds.num_objects} objects, classes {e(', '.join(ds.classes))}. Metric: {e(ev.metric)} AP at IoU {ev.iou_threshold}.</p>
<ul>{notes}</ul>
<h2>Average precision</h2>
<p>Per class: AP, positives, detections, false positives by type (Hoiem et al.; paper §3.3) and dAP — the AP (points)
gained when an oracle fixes every error of that type (TIDE-style).</p>
<table><tr><th>class</th><th>AP</th><th>positives</th><th>detections</th>{head}</tr>{rows}{mean_row}</table>
<p>{_img("pr.png", "precision-recall curves")}</p>
<h2>Detections: best and worst images</h2>
<p>Detections scoring &ge; {thr_txt} (the threshold maximising F1 over the split) in class colours; ground truth in thin white.</p>
{det_html}
<h2>False-positive analysis</h2>
<p>Distribution of the top-ranked false positives (paper Figure 4): Loc = IoU in [0.1, 0.5) with an object of the class
or a duplicate; Sim = confusion with a similar class (groups: {e(json.dumps({g: list(m) for g, m in fa.groups.items()}) or 'none')});
Oth = confusion with another class; BG = background.</p>
<p>{_img("fp_types.png", "false positive types")}</p>
<p>{_img("dap.png", "dAP per error type")}</p>
<h2>Sensitivity to object characteristics</h2>
<p>Mean over classes of the normalized AP (N = {s0.normalized_count:g}, i.e. 0.15 &times; images) of the lowest and highest
performing subset of each characteristic (paper Figure 5); dashed: overall normalized AP {s0.overall:.3f}.</p>
<p>{_img("sensitivity.png", "sensitivity plot")}</p>
<p>{subsets}</p>
<table><tr><th>characteristic</th><th>normalized AP per subset ({e(s0.model)})</th></tr>{srows}</table>
<h2>pool5 units</h2>
<div class="row">{units}</div>
</body></html>
"""


def _report_detections(model: Path, ds: Dataset, progress: ProgressFn | None,
                       ) -> tuple[Dataset, Detections, object | None, dict[str, str]]:
    """The report's detections; images a model cannot read are left out of the dataset (as
    ``rcnn evaluate`` does: not counted as misses), each with one warning, and returned as
    ``{image id: reason}``."""
    stats = DetectStats()
    dets, m = detections_of(model, ds, stats, progress)
    skipped: dict[str, str] = {}
    for r in ds.records:
        msg = next((f for f in stats.failed if f.startswith(f"{r.path}:")), None)
        if msg is not None:
            skipped[r.image_id] = msg
            log.warning("%s; left out of the report", msg)
    if skipped:
        ds = replace(ds, records=[r for r in ds.records if r.image_id not in skipped])
    return ds, dets, m, skipped


def _readable(records: list[ImageRecord], skipped: dict[str, str]) -> list[ImageRecord]:
    """The records whose image can be read; the others are added to ``skipped`` with one warning."""
    out = []
    for r in records:
        try:
            load_image(r.path)
            out.append(r)
        except ImageReadError as e:
            skipped[r.image_id] = str(e)
            log.warning("%s; left out of the unit grids and pictures", e)
    return out


def report_for(model: Path, ds: Dataset, out_dir: str | Path, compare: Sequence[str] = (), units: str = "auto",
               unit_images: int = 20, backbone: str | None = None, groups: dict[str, tuple[str, ...]] | None = None,
               metric: str = "voc07", samples: int = 4, progress: ProgressFn | None = None) -> Path:
    """``rcnn report``: :func:`write_report` for a model file or detections file ``model`` on
    ``ds``, with the ``compare`` models/detections (``NAME=PATH`` or ``PATH``) in the sensitivity
    plot and, unless ``units`` is ``"none"``, pool5 unit grids over the first ``unit_images``
    readable images (of the model, or of ``backbone`` when ``model`` is a detections file).
    Images that cannot be read are left out with one warning each. Returns the HTML path."""
    out = Path(out_dir)
    ds, dets, m, skipped = _report_detections(model, ds, progress)
    others = []
    for spec in compare:
        name, path = named(spec)
        stats = DetectStats()
        others.append((name, detections_of(path, ds, stats, progress)[0]))
        for msg in stats.failed:
            log.warning("%s", msg)
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"Detections: {model} ({len(dets)} boxes)."]
    unit_grids = []
    source = str(model) if m is not None else backbone
    if units != "none" and source:
        recs = _readable(ds.records[:unit_images] if unit_images else ds.records, skipped)
        path, us, _ = run_units(source, replace(ds, records=recs), units, out / "units.png", 16, None,
                                progress=progress)
        unit_grids.append((f"Top 16 activations of {len(us)} pool5 units over {len(recs)} images", path))
    elif units != "none":
        notes.append("No unit grids: MODEL is a detections file; pass --backbone to add them.")
    return write_report(ReportInputs(model.stem, ds, dets, metric, groups, others, unit_grids, notes, samples, skipped),
                        out)
