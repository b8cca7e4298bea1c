"""Near-duplicate detection between image collections (paper Appendix C).

``gist``: the Oliva–Torralba GIST descriptor on 32×32 warps; ``index``: descriptor
collections (parallel, cached) and exact / faiss nearest-neighbour search; ``match``:
source-ID and GIST matching; ``report``: CSV / JSON / HTML reports.
"""

from rcnn.dedup.gist import GistConfig, gist, gist_batch, gist_of_files, load_warped, warp_image
from rcnn.dedup.index import (
    SEARCH_METHODS,
    ImageItem,
    NNIndex,
    collect_images,
    compute_descriptors,
    nearest_neighbors,
)
from rcnn.dedup.match import (
    DEFAULT_THRESHOLD,
    DedupResult,
    Pair,
    find_duplicates,
    match_descriptors,
    match_ids,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "SEARCH_METHODS",
    "DedupResult",
    "GistConfig",
    "ImageItem",
    "NNIndex",
    "Pair",
    "collect_images",
    "compute_descriptors",
    "find_duplicates",
    "gist",
    "gist_batch",
    "gist_of_files",
    "load_warped",
    "match_descriptors",
    "match_ids",
    "nearest_neighbors",
    "warp_image",
]
