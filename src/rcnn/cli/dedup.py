"""``rcnn dedup QUERY REFERENCE``: near-duplicate check between two image collections (paper App. C)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from rcnn.cli.app import app, console, exits, fail, print_first
from rcnn.cli.progress import show_progress
from rcnn.dedup import DEFAULT_THRESHOLD, SEARCH_METHODS


@app.command()
def dedup(
    query: Annotated[Path, typer.Argument(help="Query collection: dataset root (VOC, PASCAL v1.00, COCO .json) or "
        "image folder")],
    reference: Annotated[Path, typer.Argument(help="Reference collection: dataset root or image folder")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder (pairs.csv, pairs.json, "
        "index.html)")] = Path("dedup-report"),
    threshold: Annotated[float, typer.Option("--threshold", "-t", help="GIST distance at or below which a pair is a "
        "near-duplicate (chosen for 32×32 grey GIST)")] = DEFAULT_THRESHOLD,
    k: Annotated[int, typer.Option("--k", help="Report up to k references per query (all within the threshold)")] = 1,
    search: Annotated[Literal[SEARCH_METHODS], typer.Option(help="exact (blocked matrix products), faiss-flat, or "
        "faiss-ivf (approximate)")] = "exact",
    nprobe: Annotated[int, typer.Option(help="faiss-ivf: cells visited per query (fewer = faster, less exact)")] = 16,
    size: Annotated[int, typer.Option(help="Warp size for GIST (paper: 32; LMgist's usual: 128)")] = 32,
    color: Annotated[bool, typer.Option("--color/--gray", help="Colour GIST (3× dims) instead of grey")] = False,
    query_split: Annotated[str | None, typer.Option(help="Split of a query dataset", show_default="all images")] = None,
    reference_split: Annotated[str | None, typer.Option(help="Split of a reference dataset", show_default="all images")] = None,
    recursive: Annotated[bool, typer.Option(help="List image folders recursively")] = False,
    ids: Annotated[bool, typer.Option("--ids/--no-ids", help="Also match source IDs (VOC flickrid, COCO flickr_url)")] = True,
    workers: Annotated[int | None, typer.Option("--workers", "-j", help="Descriptor worker processes",
        show_default="CPU cores")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse / store descriptors under $RCNN_CACHE_DIR")] = True,
) -> None:
    """Find query images that are (near-)duplicates of reference images (paper App. C).

    Exact source-ID matches and Euclidean nearest neighbours of 32×32 GIST descriptors. Give the same collection twice to find duplicates inside it (self-pairs are skipped)."""
    from rcnn.dedup import GistConfig, collect_images
    from rcnn.dedup.report import dedup_collections

    if k < 1:
        raise fail(f"--k must be ≥ 1, not {k}", 2)
    if threshold < 0:
        raise fail(f"--threshold must be ≥ 0, not {threshold}", 2)
    if (size != 32 or color) and threshold == DEFAULT_THRESHOLD:
        console.print(f"[yellow]note:[/] the default threshold {threshold} was chosen for 32×32 grey GIST; pass --threshold")
    with exits(FileNotFoundError, ValueError):  # rcnn.data.AnnotationError is a ValueError
        config = GistConfig(image_size=size, color=color)
        q_items = collect_images(query, query_split, recursive)
        r_items = collect_images(reference, reference_split, recursive)
    if search != "exact":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise fail("faiss is not installed: pip install 'rcnn[faiss]' (or faiss-cpu), or use --search exact", 2) from None
    console.print(f"query: {len(q_items)} images from {query}; reference: {len(r_items)} images from {reference}")
    with show_progress() as progress:
        res, paths = dedup_collections(q_items, r_items, output, threshold, config, k=k, method=search, use_ids=ids,
                                       workers=workers, cache=cache, nprobe=nprobe, progress=progress)
    print_first(res.unreadable, "[yellow]skipped:[/] {}", "[yellow]… and {} more unreadable files", highlight=False,
                soft_wrap=True)
    s = res.summary()
    if ids:
        console.print(f"source-ID matches: {s['source_id_pairs']} pairs "
                      f"({s['query_images_with_source_id']} of {s['query_images']} query images carry a source ID)")
    console.print(f"GIST matches (distance ≤ {threshold}): {s['gist_pairs']} pairs")
    console.print(f"[bold]{s['query_images_found']} of {s['query_images']} query images found in the reference "
                  f"({100 * s['fraction_of_query_found']:.2f}%)[/]; {s['pairs']} pairs")
    console.print(f"wrote {paths['csv']}, {paths['json']}, {paths['html']}")
