"""False-positive analysis (paper §3.3, Figure 4; Hoiem et al., "Diagnosing error in
object detectors", ECCV 2012) and TIDE-style dAP per error type.

Each detection of class ``c`` is first scored exactly as :func:`rcnn.evaluate.evaluate_class`
does (VOC matching at IoU 0.5, duplicates are false positives, difficult objects ignored).
Every false positive is then given one of four types, in this order of precedence
(Hoiem's ``analyzeFalsePositives``):

* ``Loc`` — IoU >= 0.1 with an object of class ``c``: a poor localisation (IoU in
  [0.1, 0.5)) or a duplicate (IoU >= 0.5 with an object already detected);
* ``Sim`` — IoU >= 0.1 with an object of a class *similar* to ``c`` (same group);
* ``Oth`` — IoU >= 0.1 with an object of any other class;
* ``BG``  — everything else: the detector fired on background.

``dAP`` (Bolya et al., TIDE, ECCV 2020) is the AP gained when one error type is fixed by
an oracle: ``BG``/``Sim``/``Oth`` false positives are removed from class ``c``'s ranked list
(Hoiem's "ignore" curves; TIDE's ``Bkg`` fix, and the part of its ``Cls`` fix that
concerns class ``c``); a ``Loc`` false positive becomes a true positive when its best
same-class object is detected by nothing else (TIDE's ``Loc`` fix), and is removed
otherwise (TIDE's ``Dupe`` fix).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcnn.boxes import box_iou
from rcnn.data import ImageRecord
from rcnn.evaluate import Detections, evaluate_class, voc_ap
from rcnn.progress import ProgressFn, report

FP_TYPES: tuple[str, ...] = ("Loc", "Sim", "Oth", "BG")
#: outcome codes of each detection, in score order
TP, IGNORED, LOC, SIM, OTH, BG = 0, 1, 2, 3, 4, 5
_CODE = {"Loc": LOC, "Sim": SIM, "Oth": OTH, "BG": BG}

#: Hoiem's VOC class groups (the similar-class sets of paper Figure 4).
VOC_GROUPS: dict[str, tuple[str, ...]] = {
    "animals": ("bird", "cat", "cow", "dog", "horse", "sheep"),
    "vehicles": ("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"),
    "furniture": ("chair", "diningtable", "sofa"),
}

LOW_IOU = 0.1  # Hoiem: below this overlap a false positive is background
HIGH_IOU = 0.5  # VOC: a detection is correct at IoU >= 0.5


def coco101_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's 101-point interpolated AP (the AP TIDE reports): mean over recall
    thresholds 0, 0.01, …, 1 of the monotone precision envelope at the first point with
    recall >= t (0 where recall never reaches t)."""
    rec = np.asarray(recall, float)
    if len(rec) == 0:
        return 0.0
    prec = np.maximum.accumulate(np.asarray(precision, float)[::-1])[::-1]
    idx = np.searchsorted(rec, np.linspace(0, 1, 101), side="left")
    vals = np.zeros(101)
    ok = idx < len(prec)
    vals[ok] = prec[idx[ok]]
    return float(np.mean(vals))


def ap_from_flags(tp: np.ndarray, fp: np.ndarray, npos: int, metric: str = "voc07") -> float:
    """AP of a ranked list given per-detection TP/FP flags (score order; a row with
    neither flag is ignored, like a difficult match). ``metric``: ``voc07``, ``voc2010``
    or ``coco101``. NaN when ``npos == 0``."""
    if npos <= 0:
        return float("nan")
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if metric == "coco101":
        return coco101_ap(rec, prec)
    return voc_ap(rec, prec, metric)


def similar_classes(classes: Sequence[str], groups: Mapping[str, Sequence[str]] | None) -> list[set[int]]:
    """For each class index, the indices of the classes in a group with it (not itself)."""
    index = {c: i for i, c in enumerate(classes)}
    out: list[set[int]] = [set() for _ in classes]
    for members in (groups or {}).values():
        idx = [index[m] for m in members if m in index]
        for i in idx:
            out[i].update(j for j in idx if j != i)
    return out


def parse_groups(specs: Sequence[str] | None, voc_groups: bool = True) -> dict[str, tuple[str, ...]] | None:
    """Similar-class groups from ``NAME=a,b,c`` strings; without any, ``None`` (VOC's groups) or, with
    ``voc_groups=False``, no groups. ``ValueError`` (one line) for a string without ``=``."""
    if not specs:
        return None if voc_groups else {}
    out = {}
    for g in specs:
        if "=" not in g:
            raise ValueError(f"--group {g!r}: write NAME=class1,class2")
        name, members = g.split("=", 1)
        out[name.strip()] = tuple(m.strip() for m in members.split(",") if m.strip())
    return out


def default_groups(classes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The built-in VOC groups restricted to ``classes`` (empty for non-VOC class lists)."""
    have = set(classes)
    return {g: tuple(m for m in ms if m in have) for g, ms in VOC_GROUPS.items() if sum(m in have for m in ms) >= 1}


@dataclass
class ClassFP:
    """Every detection of one class in decreasing score order with its outcome.

    ``outcome`` (D,) int8: TP, IGNORED (matched a difficult object), LOC, SIM, OTH, BG;
    ``confused_with`` (D,) int64: class index of the object a Sim/Oth FP overlaps most (else -1);
    ``gt_index`` (D,) int64: index into its record's boxes of the best same-class object
    (the match of a TP, the target of a Loc FP; -1 if none); ``iou`` (D,) best same-class IoU.
    """

    name: str
    npos: int
    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    outcome: np.ndarray
    confused_with: np.ndarray
    gt_index: np.ndarray
    iou: np.ndarray
    ap: float = float("nan")
    dap: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Number of false positives of each type (over all detections)."""
        return {t: int((self.outcome == _CODE[t]).sum()) for t in FP_TYPES}


@dataclass
class FPAnalysis:
    """Per-class false-positive analysis of one set of detections."""

    classes: list[str]
    per_class: list[ClassFP]
    groups: dict[str, tuple[str, ...]]
    metric: str

    @property
    def mean_ap(self) -> float:
        aps = [c.ap for c in self.per_class if not math.isnan(c.ap)]
        return float(np.mean(aps)) if aps else float("nan")

    def mean_dap(self) -> dict[str, float]:
        """dAP per error type: mean over classes (with defined AP) of AP(fixed) - AP."""
        out = {}
        for t in FP_TYPES:
            v = [c.dap[t] for c in self.per_class if not math.isnan(c.ap)]
            out[t] = float(np.mean(v)) if v else float("nan")
        return out

    def class_indices(self, group: str | None) -> list[int]:
        """Classes of ``group`` (all classes for ``None``)."""
        if group is None:
            return list(range(len(self.classes)))
        members = set(self.groups[group])
        return [i for i, c in enumerate(self.classes) if c in members]

    def trend(self, class_indices: Sequence[int] | None = None, ticks: Sequence[int] | None = None):
        """Distribution of FP types over the top-ranked false positives of a class set.

        As Hoiem's ``displayFPTrend``: the classes' FP-type indicators are summed rank by
        rank (the k-th detection of every class together) and accumulated, so ``x`` is the
        *total* number of false positives over the classes. Returns ``(ticks (T,),
        percentages (4,T))`` in ``FP_TYPES`` order; ticks beyond the available FPs are dropped.
        """
        idx = list(range(len(self.classes))) if class_indices is None else list(class_indices)
        n = max((len(self.per_class[i].outcome) for i in idx), default=0)
        counts = np.zeros((4, n), np.int64)
        for i in idx:
            o = self.per_class[i].outcome
            for k, t in enumerate(FP_TYPES):
                counts[k, : len(o)] += o == _CODE[t]
        cum = np.cumsum(counts, axis=1)
        total = cum.sum(axis=0)
        nfp = int(total[-1]) if n else 0
        if ticks is None:
            ticks = default_ticks(nfp)
        ticks = np.array([t for t in ticks if t <= nfp], np.int64)
        pct = np.zeros((4, len(ticks)))
        for j, t in enumerate(ticks):
            k = int(np.searchsorted(total, t, side="left"))  # first rank where t FPs are reached
            pct[:, j] = cum[:, k] / max(total[k], 1) * 100
        return ticks, pct

    def as_dict(self) -> dict:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {
            "metric": self.metric,
            "mAP": num(self.mean_ap),
            "dAP": {t: num(v) for t, v in self.mean_dap().items()},
            "groups": {g: list(m) for g, m in self.groups.items()},
            "classes": {
                c.name: {"ap": num(c.ap), "npos": c.npos, "num_dets": len(c.outcome), "fp_counts": c.counts(),
                         "dAP": {t: num(v) for t, v in c.dap.items()}}
                for c in self.per_class
            },
        }


def default_ticks(nfp: int) -> list[int]:
    """Log-spaced tick values 25, 50, 100, … up to ``nfp`` (paper Figure 4's x axis);
    smaller steps when there are fewer than 25 false positives."""
    if nfp <= 0:
        return []
    start = 25 if nfp >= 100 else max(1, nfp // 8)
    ticks = [start]
    while ticks[-1] * 2 <= nfp:
        ticks.append(ticks[-1] * 2)
    if nfp >= 1.3 * ticks[-1]:
        ticks.append(nfp)
    elif ticks[-1] != nfp and len(ticks) > 1:
        ticks[-1] = nfp  # the last tick is always the total, not crowded next to a round one
    return ticks


def _gt_by_image(records: Sequence[ImageRecord]) -> dict[str, ImageRecord]:
    return {r.image_id: r for r in records}


def classify_class(
    c: int,
    classes: Sequence[str],
    records_by_id: Mapping[str, ImageRecord],
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    similar: set[int],
    iou_threshold: float = HIGH_IOU,
    low_iou: float = LOW_IOU,
    metric: str = "voc07",
) -> ClassFP:
    """Outcome of every detection of class ``c`` (see the module docstring)."""
    gt = {r.image_id: (r.boxes[r.labels == c], r.difficult[r.labels == c]) for r in records_by_id.values()}
    res = evaluate_class(gt, image_ids, boxes, scores, "voc07", iou_threshold, classes[c])
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")  # same order as evaluate_class
    ids, bx, sc = np.asarray(image_ids, object)[order], np.asarray(boxes, np.float32)[order], np.asarray(scores, np.float32)[order]
    d = len(order)
    outcome = np.full(d, IGNORED, np.int8)
    outcome[res.tp] = TP
    confused = np.full(d, -1, np.int64)
    gt_index = np.full(d, -1, np.int64)
    best_iou = np.zeros(d, np.float32)
    for k in range(d):
        r = records_by_id.get(str(ids[k]))
        if r is None or len(r.boxes) == 0:
            if res.fp[k]:
                outcome[k] = BG
            continue
        ov = box_iou(bx[k : k + 1], r.boxes.astype(np.float32))[0]
        same = np.nonzero(r.labels == c)[0]
        if len(same):
            j = same[int(np.argmax(ov[same]))]
            gt_index[k], best_iou[k] = j, ov[j]
        if not res.fp[k]:
            continue
        if len(same) and best_iou[k] >= low_iou:
            outcome[k] = LOC  # poor localisation, or duplicate of a detected object
            continue
        other = np.nonzero((r.labels != c) & (ov >= low_iou))[0]
        if len(other) == 0:
            outcome[k] = BG
            continue
        sim = [j for j in other if int(r.labels[j]) in similar]
        pick = sim if sim else list(other)
        j = pick[int(np.argmax(ov[pick]))]
        confused[k] = int(r.labels[j])
        outcome[k] = SIM if sim else OTH
    out = ClassFP(classes[c], res.npos, ids, bx, sc, outcome, confused, gt_index, best_iou)
    out.ap = ap_from_flags(outcome == TP, outcome >= LOC, res.npos, metric)
    out.dap = {t: fixed_ap(out, t, records_by_id, metric) - out.ap for t in FP_TYPES}
    return out


def fixed_ap(cfp: ClassFP, error_type: str, records_by_id: Mapping[str, ImageRecord], metric: str = "voc07") -> float:
    """AP of class ``cfp`` after an oracle fixes every false positive of ``error_type``."""
    o = cfp.outcome
    if error_type != "Loc":
        keep = o != _CODE[error_type]
        return ap_from_flags((o == TP)[keep], (o >= LOC)[keep], cfp.npos, metric)
    # Loc: the box is corrected to its best same-class object; it counts as a TP if that
    # object is detected by no TP and no higher-scoring corrected box, else it is removed
    # (a duplicate), as TIDE's Loc and Dupe fixes.
    used = {(str(cfp.image_ids[k]), int(cfp.gt_index[k])) for k in np.nonzero(o == TP)[0]}
    tp, fp, keep = o == TP, o >= LOC, np.ones(len(o), bool)
    tp, fp = tp.copy(), fp.copy()
    for k in np.nonzero(o == LOC)[0]:
        key = (str(cfp.image_ids[k]), int(cfp.gt_index[k]))
        r = records_by_id[key[0]]
        fp[k] = False
        if key in used or r.difficult[key[1]]:
            keep[k] = False
        else:
            tp[k] = True
            used.add(key)
    return ap_from_flags(tp[keep], fp[keep], cfp.npos, metric)


def analyze_false_positives(
    classes: Sequence[str],
    records: Sequence[ImageRecord],
    dets: Detections,
    groups: Mapping[str, Sequence[str]] | None = None,
    metric: str = "voc07",
    iou_threshold: float = HIGH_IOU,
    low_iou: float = LOW_IOU,
    progress: ProgressFn | None = None,
) -> FPAnalysis:
    """Classify every false positive of ``dets`` per class (Loc/Sim/Oth/BG) and compute
    AP and dAP per error type. ``groups`` maps a group name to its class names (default:
    the built-in VOC groups that apply to ``classes``); detections on images absent from
    ``records`` are ignored, as in :class:`rcnn.evaluate.VOCEvaluator`."""
    classes = list(classes)
    groups = default_groups(classes) if groups is None else {g: tuple(m) for g, m in groups.items()}
    unknown = sorted({m for ms in groups.values() for m in ms} - set(classes))
    if unknown:
        raise ValueError(f"class groups name unknown classes {unknown}; the dataset's classes are {classes}")
    sim = similar_classes(classes, groups)
    by_id = _gt_by_image(records)
    known = np.array([str(i) in by_id for i in dets.image_ids], bool)
    per_class = []
    for c in range(len(classes)):
        sel = known & (dets.labels == c)
        per_class.append(classify_class(c, classes, by_id, dets.image_ids[sel], dets.boxes[sel], dets.scores[sel],
                                        sim[c], iou_threshold, low_iou, metric))
        report(progress, "false positives", c + 1, len(classes))
    return FPAnalysis(classes, per_class, groups, metric)


# ---------------------------------------------------------------------------- plots

FP_COLORS = ("#4f81bd", "#c0504d", "#60d066", "#8064a2")  # Hoiem's Loc/Sim/Oth/BG colours


def plot_fp_trend(ax, analysis: FPAnalysis, class_indices: Sequence[int] | None = None, title: str = "", ticks=None) -> bool:
    """Stacked-area plot of the FP-type distribution (paper Figure 4) on a matplotlib
    axis; x = total false positives (log scale). Returns False (and writes a note on the
    axis) when the classes have no false positives."""
    t, pct = analysis.trend(class_indices, ticks)
    ax.set_title(title or "false positive types")
    ax.set_xlabel("total false positives")
    ax.set_ylabel("percentage of each type")
    if len(t) == 0:
        ax.text(0.5, 0.5, "no false positives", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylim(0, 100)
        return False
    if len(t) == 1:  # a single tick cannot span an area: widen it to a visible band
        t = np.array([t[0], t[0] * 1.001 + 1])
        pct = np.repeat(pct, 2, axis=1)
    ax.stackplot(t, pct, labels=FP_TYPES, colors=FP_COLORS, alpha=0.95)
    ax.set_xscale("log")
    ax.set_xlim(t[0], t[-1])
    ax.set_ylim(0, 100)
    ax.set_xticks(t)
    ax.set_xticklabels([str(int(v)) for v in t], rotation=45)
    ax.minorticks_off()
    ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
    return True


def fp_figure(analysis: FPAnalysis, path, groups: Sequence[str] | None = None, per_class: bool | None = None):
    """One panel per class group (plus one over all classes, and one per class when there
    are few classes), saved as a PNG at ``path``. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[int]]] = []
    for g in groups if groups is not None else list(analysis.groups):
        idx = analysis.class_indices(g)
        if idx:
            panels.append((g, idx))
    if per_class is None:
        per_class = len(analysis.classes) <= 6
    if per_class:
        panels += [(c, [i]) for i, c in enumerate(analysis.classes)]
    panels.append(("all classes", list(range(len(analysis.classes)))))
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, idx) in zip(axes.flat, panels, strict=False):
        plot_fp_trend(ax, analysis, idx, title=name)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Distribution of top-ranked false positive types")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def dap_figure(analysis: FPAnalysis, path, title: str = "AP gained by fixing each error type (dAP)"):
    """Bar chart of the dAP per error type, mean over classes and per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["mean", *[c.name for c in analysis.per_class if not math.isnan(c.ap)]]
    vals = [analysis.mean_dap()] + [c.dap for c in analysis.per_class if not math.isnan(c.ap)]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.4))
    w = 0.8 / len(FP_TYPES)
    x = np.arange(len(names))
    for k, t in enumerate(FP_TYPES):
        ax.bar(x + (k - 1.5) * w, [100 * v[t] for v in vals], w, label=t, color=FP_COLORS[k])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(f"dAP ({analysis.metric}, points)")
    ax.set_xlabel("class")
    ax.set_title(title)
    ax.legend(title="error type fixed", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_fp_analysis(analysis: FPAnalysis, out_dir: str | Path) -> tuple[Path, Path, Path]:
    """``fp_types.png`` (:func:`fp_figure`), ``dap.png`` (:func:`dap_figure`) and
    ``fp_analysis.json`` (every number) in ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "fp_types.png", out / "dap.png", out / "fp_analysis.json"
    fp_figure(analysis, paths[0])
    dap_figure(analysis, paths[1])
    paths[2].write_text(json.dumps(analysis.as_dict(), indent=1))
    return paths
