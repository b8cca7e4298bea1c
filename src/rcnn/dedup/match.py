"""Near-duplicate matching between a query and a reference collection (paper App. C).

Two tests, as in the paper: exact source-ID matches (VOC 2007 ``<source><flickrid>``,
COCO ``flickr_url``) and Euclidean nearest neighbours of 32×32 GIST descriptors within a
distance threshold. Each (query, reference) pair is reported once with the tests that
found it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcnn.dedup.gist import GistConfig
from rcnn.dedup.index import ImageItem, compute_descriptors, nearest_neighbors
from rcnn.progress import ProgressFn

__all__ = ["DEFAULT_THRESHOLD", "DedupResult", "Pair", "find_duplicates", "match_descriptors", "match_ids"]

#: Default GIST distance threshold (Euclidean, 512-d grey GIST of 32×32 warps as computed
#: by :func:`rcnn.dedup.gist.gist_batch`), chosen on ``bench/dedup.py``'s calibration draw
#: (JPEG q30–90, 0.5–2× resizes, ≤ 10 % crops, colour shifts, 570 real images): precision
#: is 1.0 up to 0.40 and recall 0.990 there; above 0.45 distinct real images start to match
#: (nearest non-duplicate in the test draw: 0.456). An independent test draw gives precision 1.0,
#: recall 0.992 at 0.40 (README, "Near-duplicate detection").
DEFAULT_THRESHOLD = 0.40


@dataclass(frozen=True)
class Pair:
    """A query image found in the reference collection. ``distance`` is the GIST distance
    (NaN when a descriptor is missing); ``method`` is ``"gist"``, ``"source-id"`` or
    ``"source-id+gist"``."""

    query: str
    reference: str
    distance: float
    method: str
    query_path: str = ""
    reference_path: str = ""


@dataclass
class DedupResult:
    """Pairs found plus the counts a report needs."""

    pairs: list[Pair]
    n_query: int
    n_reference: int
    threshold: float
    config: GistConfig
    id_matches: int = 0  # pairs found by source ID
    gist_matches: int = 0  # pairs found by GIST
    queries_with_ids: int = 0  # query images that carry a source ID
    unreadable: list[str] = field(default_factory=list)  # one error line per unreadable file

    @property
    def queries_found(self) -> int:
        """Distinct query images with at least one duplicate."""
        return len({p.query for p in self.pairs})

    @property
    def fraction_found(self) -> float:
        return self.queries_found / self.n_query if self.n_query else 0.0

    def summary(self) -> dict:
        return {
            "query_images": self.n_query,
            "reference_images": self.n_reference,
            "threshold": self.threshold,
            "gist": {
                "image_size": self.config.image_size,
                "dim": self.config.dim,
                "color": self.config.color,
            },
            "pairs": len(self.pairs),
            "source_id_pairs": self.id_matches,
            "gist_pairs": self.gist_matches,
            "query_images_with_source_id": self.queries_with_ids,
            "query_images_found": self.queries_found,
            "fraction_of_query_found": self.fraction_found,
            "unreadable_files": len(self.unreadable),
        }


def match_ids(query: Sequence[ImageItem], reference: Sequence[ImageItem]) -> list[tuple[int, int]]:
    """Index pairs ``(q, r)`` with the same non-empty source ID (the paper's Flickr-ID test)."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for j, it in enumerate(reference):
        if it.source_id:
            by_id[str(it.source_id)].append(j)
    return [(i, j) for i, it in enumerate(query) if it.source_id for j in by_id.get(str(it.source_id), ())]


def match_descriptors(
    q_desc: np.ndarray,
    r_desc: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    k: int = 1,
    method: str = "exact",
    nprobe: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GIST matches: for each query, its ``k`` nearest references within ``threshold``.

    Returns ``(q_idx, r_idx, dist)`` 1-D arrays, one entry per pair.
    """
    dist, idx = nearest_neighbors(q_desc, r_desc, k=k, method=method, nprobe=nprobe)
    keep = (idx >= 0) & (dist <= threshold)
    qi = np.nonzero(keep)[0]
    return qi, idx[keep], dist[keep]


def find_duplicates(
    query: Sequence[ImageItem],
    reference: Sequence[ImageItem],
    threshold: float = DEFAULT_THRESHOLD,
    config: GistConfig = GistConfig(),
    k: int = 1,
    method: str = "exact",
    use_ids: bool = True,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    cache: bool = True,
    nprobe: int = 16,
) -> DedupResult:
    """Find the query images that are (near-)duplicates of reference images.

    Descriptors of both collections are computed in parallel and cached (see
    :func:`~rcnn.dedup.index.compute_descriptors`); ``k`` > 1 reports up to ``k``
    references per query (all within ``threshold``). A file on both sides is never paired
    with itself, so ``find_duplicates(items, items)`` finds duplicates within a collection.
    """
    q_desc, q_err = compute_descriptors(
        [it.path for it in query], config, workers, progress, cache, description="GIST query"
    )
    r_desc, r_err = compute_descriptors(
        [it.path for it in reference], config, workers, progress, cache, description="GIST reference"
    )
    # a file present on both sides (e.g. QUERY == REFERENCE to dedup one collection) is not
    # its own duplicate: search one neighbour more and drop the self-pairs
    q_files = [str(Path(it.path).resolve()) for it in query]
    r_files = [str(Path(it.path).resolve()) for it in reference]
    shared = bool(set(q_files) & set(r_files))
    qi, ri, d = match_descriptors(q_desc, r_desc, threshold, k + int(shared), method, nprobe)
    found: dict[tuple[int, int], set[str]] = defaultdict(set)
    dist: dict[tuple[int, int], float] = {}
    n_gist = 0
    for a, b, dd in zip(qi.tolist(), ri.tolist(), d.tolist(), strict=True):
        if shared and q_files[a] == r_files[b]:
            continue
        n_gist += 1
        found[(a, b)].add("gist")
        dist[(a, b)] = dd
    id_pairs = match_ids(query, reference) if use_ids else []
    id_pairs = [(a, b) for a, b in id_pairs if q_files[a] != r_files[b]]
    for a, b in id_pairs:
        found[(a, b)].add("source-id")
        if (a, b) not in dist:
            qa, rb = q_desc[a], r_desc[b]
            dist[(a, b)] = (
                float(np.linalg.norm(qa - rb))
                if np.isfinite(qa).all() and np.isfinite(rb).all()
                else float("nan")
            )
    pairs = []
    for (a, b), how in sorted(found.items(), key=lambda kv: (kv[0][0], dist[kv[0]])):
        method_name = "+".join(m for m in ("source-id", "gist") if m in how)
        pairs.append(
            Pair(query[a].image_id, reference[b].image_id, dist[(a, b)], method_name,
                 str(query[a].path), str(reference[b].path))
        )  # fmt: skip
    return DedupResult(
        pairs=pairs,
        n_query=len(query),
        n_reference=len(reference),
        threshold=threshold,
        config=config,
        id_matches=len(id_pairs),
        gist_matches=n_gist,
        queries_with_ids=sum(1 for it in query if it.source_id),
        unreadable=[e for e in q_err + r_err if e],
    )
