"""Sensitivity to object characteristics (paper Figure 5; Hoiem et al., ECCV 2012).

For each characteristic the annotations carry, objects of each class are split into
subsets and the *normalized* AP is computed for each subset: detections matched to
objects outside the subset are ignored (neither TP nor FP), recall counts only the
subset's objects, and precision is normalized to a fixed number of positives ``N`` so
that subsets of different sizes compare (Hoiem's ``averagePrecisionNormalized``)::

    tp_n = tp * N / npos;   P_n = tp_n / (tp_n + fp);   AP_n = sum(P_n_interp at each TP) / npos

with ``N = 0.15 × number of images`` by default. The figure shows, per characteristic,
the mean over classes of AP_n for the lowest and the highest performing subset.

Characteristics: bounding-box ``area`` (XS/S/M/L/XL at the 10/30/70/90th percentiles of
each class, as Hoiem), ``aspect`` ratio width/height (XT/T/M/W/XW, same percentiles), and,
where the dataset annotates them, ``truncation``, ``occlusion`` and ``viewpoint`` (VOC pose).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcnn.analysis.fp import LOC, TP, FPAnalysis, analyze_false_positives
from rcnn.data import ImageRecord
from rcnn.evaluate import Detections

NORMALIZED_FRACTION = 0.15  # Hoiem et al.: N = 0.15 × number of images
PERCENTILES = (0.1, 0.3, 0.7, 0.9)  # Hoiem's XS..XL / XT..XW boundaries
SIZE_NAMES = ("XS", "S", "M", "L", "XL")
ASPECT_NAMES = ("XT", "T", "M", "W", "XW")
SHORT = {"occlusion": "occ", "truncation": "trn", "area": "size", "aspect": "asp", "viewpoint": "view"}


def normalized_ap(labels: np.ndarray, npos: int, nnorm: float) -> float:
    """Hoiem's normalized AP of a ranked list. ``labels`` (D,) in decreasing score order:
    1 = true positive, -1 = false positive, 0 = ignored. NaN when ``npos == 0``."""
    labels = np.asarray(labels)
    if npos <= 0:
        return float("nan")
    if len(labels) == 0:
        return 0.0
    tp = np.cumsum(labels == 1)
    fp = np.cumsum(labels == -1)
    tpn = tp * nnorm / npos
    with np.errstate(invalid="ignore", divide="ignore"):
        pn = np.where(tpn + fp > 0, tpn / np.maximum(tpn + fp, 1e-12), 0.0)
    pn = np.maximum.accumulate(pn[::-1])[::-1]  # interpolated (monotone) precision
    return float(pn[labels == 1].sum() / npos)


def _percentile_labels(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """0..4 subset of each value by the 10/30/70/90th percentiles of the valid values
    (Hoiem: thresholds ``sorted[round(p*n)]``, label = number of thresholds exceeded);
    -1 where not valid."""
    out = np.full(len(values), -1, np.int64)
    v = np.sort(values[valid])
    if len(v) == 0:
        return out
    th = [v[min(max(round(p * len(v)) - 1, 0), len(v) - 1)] for p in PERCENTILES]
    out[valid] = (values[valid][:, None] > np.array(th)[None, :]).sum(1)
    return out


@dataclass
class Characteristic:
    """Subset label of every object: ``labels[image_id]`` (G,) int, -1 = not in any subset
    (difficult, or the attribute is not annotated)."""

    name: str
    subsets: list[str]
    labels: dict[str, np.ndarray]

    def count(self, records: Sequence[ImageRecord], c: int) -> np.ndarray:
        """Objects of class ``c`` in each subset."""
        n = np.zeros(len(self.subsets), np.int64)
        for r in records:
            lab = self.labels[r.image_id][r.labels == c]
            n += np.bincount(lab[lab >= 0], minlength=len(self.subsets))
        return n


def object_characteristics(records: Sequence[ImageRecord], num_classes: int) -> list[Characteristic]:
    """The characteristics the annotations allow, with each object's subset."""
    recs = list(records)
    out: list[Characteristic] = []
    if not recs:
        return out
    allb = np.concatenate([r.boxes for r in recs]).reshape(-1, 4).astype(np.float64)
    alll = np.concatenate([r.labels for r in recs]).astype(np.int64)
    alld = np.concatenate([r.difficult for r in recs]).astype(bool)
    splits = np.cumsum([len(r.boxes) for r in recs])[:-1]
    w = allb[:, 2] - allb[:, 0]
    h = allb[:, 3] - allb[:, 1]
    for name, values, names in (("area", w * h, SIZE_NAMES), ("aspect", w / np.maximum(h, 1e-9), ASPECT_NAMES)):
        lab = np.full(len(alll), -1, np.int64)
        for c in range(num_classes):  # percentiles of each class, as Hoiem
            m = alll == c
            lab[m] = _percentile_labels(values[m], ~alld[m])
        out.append(Characteristic(name, list(names), {r.image_id: p for r, p in zip(recs, np.split(lab, splits), strict=True)}))

    def binary(attr: str, name: str, names: tuple[str, str]) -> None:
        if not any(getattr(r, attr) is not None for r in recs):
            return
        labels = {}
        for r in recs:
            v = getattr(r, attr)
            lab = np.full(len(r.boxes), -1, np.int64) if v is None else np.asarray(v).astype(np.int64)
            lab = np.where(r.difficult, -1, lab)
            labels[r.image_id] = lab
        values = np.concatenate(list(labels.values())) if labels else np.zeros(0)
        if len(np.unique(values[values >= 0])) >= 2:  # a characteristic needs two populated subsets
            out.append(Characteristic(name, list(names), labels))

    binary("occluded", "occlusion", ("none", "occluded"))
    binary("truncated", "truncation", ("none", "truncated"))
    poses = sorted({p for r in recs if r.pose for p in r.pose if p and p.lower() != "unspecified"})
    if len(poses) >= 2:
        idx = {p: i for i, p in enumerate(poses)}
        labels = {}
        for r in recs:
            lab = np.full(len(r.boxes), -1, np.int64)
            for k, p in enumerate(r.pose or []):
                if p in idx and not r.difficult[k]:
                    lab[k] = idx[p]
            labels[r.image_id] = lab
        out.append(Characteristic("viewpoint", poses, labels))
    return out


@dataclass
class SensitivityResult:
    """Mean (over classes) normalized AP per characteristic and subset, for one model."""

    model: str
    normalized_count: float
    overall: float
    characteristics: dict[str, dict[str, float]]  # characteristic -> subset -> mean AP_n
    counts: dict[str, dict[str, int]]  # characteristic -> subset -> objects (all classes)
    per_class: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    per_class_overall: dict[str, float] = field(default_factory=dict)

    def extremes(self, name: str) -> tuple[str, float, str, float]:
        """(lowest subset, its AP_n, highest subset, its AP_n) over populated subsets."""
        vals = {k: v for k, v in self.characteristics[name].items() if not math.isnan(v)}
        lo = min(vals, key=vals.get)
        hi = max(vals, key=vals.get)
        return lo, vals[lo], hi, vals[hi]

    def as_dict(self) -> dict:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {
            "model": self.model,
            "normalized_count": self.normalized_count,
            "overall_normalized_ap": num(self.overall),
            "characteristics": {
                c: {"subsets": {s: {"normalized_ap": num(v), "objects": self.counts[c][s]} for s, v in sub.items()},
                    **({"lowest": self.extremes(c)[0], "highest": self.extremes(c)[2]}
                       if any(not math.isnan(v) for v in sub.values()) else {})}
                for c, sub in self.characteristics.items()
            },
            "per_class_overall": {k: num(v) for k, v in self.per_class_overall.items()},
        }


def sensitivity(
    classes: Sequence[str],
    records: Sequence[ImageRecord],
    dets: Detections | FPAnalysis,
    model: str = "model",
    normalized_count: float | None = None,
) -> SensitivityResult:
    """Normalized AP per subset of each object characteristic (see the module docstring).
    ``dets`` may be an :class:`FPAnalysis` already computed on the same records (its
    VOC matching is reused)."""
    records = list(records)
    fa = dets if isinstance(dets, FPAnalysis) else analyze_false_positives(classes, records, dets, groups={})
    nnorm = NORMALIZED_FRACTION * len(records) if normalized_count is None else float(normalized_count)
    chars = object_characteristics(records, len(classes))
    per_class: dict[str, dict[str, dict[str, float]]] = {}
    per_class_overall: dict[str, float] = {}
    for c, cfp in enumerate(fa.per_class):
        base = np.where(cfp.outcome == TP, 1, np.where(cfp.outcome >= LOC, -1, 0))
        per_class_overall[cfp.name] = normalized_ap(base, cfp.npos, nnorm)
        per_class[cfp.name] = {}
        tp_idx = np.nonzero(cfp.outcome == TP)[0]
        for ch in chars:
            # subset of the object each TP matched
            tp_sub = np.array([ch.labels[str(cfp.image_ids[k])][cfp.gt_index[k]] for k in tp_idx], np.int64)
            counts = ch.count(records, c)
            res = {}
            for s, sname in enumerate(ch.subsets):
                lab = base.copy()
                lab[tp_idx[tp_sub != s]] = 0  # TPs on objects of other subsets are ignored
                res[sname] = normalized_ap(lab, int(counts[s]), nnorm)
            per_class[cfp.name][ch.name] = res

    def mean(vals: list[float]) -> float:
        v = [x for x in vals if not math.isnan(x)]
        return float(np.mean(v)) if v else float("nan")

    characteristics = {
        ch.name: {s: mean([per_class[c.name][ch.name][s] for c in fa.per_class]) for s in ch.subsets} for ch in chars
    }
    counts = {ch.name: {s: int(sum(ch.count(records, c)[k] for c in range(len(classes)))) for k, s in enumerate(ch.subsets)}
              for ch in chars}
    return SensitivityResult(model, nnorm, mean(list(per_class_overall.values())), characteristics, counts, per_class,
                             per_class_overall)


def sensitivity_figure(results: Sequence[SensitivityResult], path, title: str = "Sensitivity to object characteristics"):
    """Paper Figure 5: one panel per model; per characteristic, the highest and lowest
    subsets' mean normalized AP joined by a line, the overall normalized AP dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(1.3 + 0.9 * max(len(r.characteristics) for r in results) * n + 1.5 * n, 3.6),
                             sharey=True, squeeze=False)
    top = 0.0
    for ax, r in zip(axes[0], results, strict=True):
        names = [c for c in r.characteristics if any(not math.isnan(v) for v in r.characteristics[c].values())]
        x = np.arange(len(names))
        for i, c in enumerate(names):
            lo_n, lo, hi_n, hi = r.extremes(c)
            top = max(top, hi)
            ax.plot([i, i], [lo, hi], color="#d62728", lw=2, label="highest / lowest subset" if i == 0 else None)
            ax.plot([i], [hi], "o", color="#d62728")
            ax.plot([i], [lo], "o", color="#d62728", mfc="white")
            ax.annotate(f"{hi:.3f} ({hi_n})", (i, hi), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.annotate(f"{lo:.3f} ({lo_n})", (i, lo), textcoords="offset points", xytext=(4, -9), fontsize=7)
        if not math.isnan(r.overall):
            ax.axhline(r.overall, ls="--", color="k", lw=1, label=f"overall {r.overall:.3f}")
            top = max(top, r.overall)
        ax.set_xticks(x)
        ax.set_xticklabels([SHORT.get(c, c) for c in names])
        ax.set_xlim(-0.6, len(names) - 0.1)
        ax.set_title(r.model)
        ax.set_xlabel("object characteristic")
        ax.legend(loc="lower left", fontsize=7)
    axes[0][0].set_ylabel("normalized AP (mean over classes)")
    axes[0][0].set_ylim(0, min(1.0, top * 1.15 + 0.05))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def subsets_figure(result: SensitivityResult, path):
    """Every subset of every characteristic (bars of mean normalized AP) for one model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chars = list(result.characteristics)
    fig, axes = plt.subplots(1, len(chars), figsize=(2.6 * len(chars) + 0.6, 3.2), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], chars, strict=True):
        subs = list(result.characteristics[c])
        vals = [result.characteristics[c][s] for s in subs]
        ax.bar(range(len(subs)), [0 if math.isnan(v) else v for v in vals], color="#4f81bd", label="mean normalized AP")
        for i, s in enumerate(subs):
            ax.text(i, 0.01, f"n={result.counts[c][s]}", rotation=90, fontsize=7, ha="center", va="bottom", color="white")
        ax.axhline(result.overall, ls="--", color="k", lw=1, label="overall")
        ax.set_xticks(range(len(subs)))
        ax.set_xticklabels(subs, rotation=30)
        ax.set_title(c)
        ax.set_xlabel("subset")
    axes[0][0].set_ylabel("normalized AP")
    fig.suptitle(f"Normalized AP per subset — {result.model}")
    fig.tight_layout()
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="upper right", fontsize=7)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_sensitivity(results: Sequence[SensitivityResult], out_dir: str | Path) -> Path:
    """``sensitivity.png`` (all results, :func:`sensitivity_figure`), one
    ``sensitivity_subsets_<model>.png`` per result with characteristics and ``sensitivity.json``
    in ``out_dir`` (created); returns the first PNG's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sensitivity_figure(results, out / "sensitivity.png")
    for r in results:
        if r.characteristics:
            subsets_figure(r, out / f"sensitivity_subsets_{r.model}.png")
    (out / "sensitivity.json").write_text(json.dumps([r.as_dict() for r in results], indent=1))
    return out / "sensitivity.png"
