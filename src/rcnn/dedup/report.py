"""Write a :class:`~rcnn.dedup.match.DedupResult` as ``pairs.csv``, ``pairs.json`` and ``index.html``.

The HTML page shows each pair side by side with small JPEG thumbnails written next to it
(``thumbs/``), so the report folder is self-contained and can be copied or served.
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

from PIL import Image

from rcnn.cache import atomic_write, save_json
from rcnn.data import ImageReadError, load_image
from rcnn.dedup.gist import GistConfig
from rcnn.dedup.index import ImageItem
from rcnn.dedup.match import DEFAULT_THRESHOLD, DedupResult, find_duplicates
from rcnn.progress import ProgressFn

__all__ = ["dedup_collections", "write_report"]

FIELDS = ("query", "reference", "distance", "method", "query_path", "reference_path")


def _thumb(src: str, dst: Path, size: int) -> str | None:
    """Write a ≤ size-pixel JPEG thumbnail of ``src`` at ``dst``; None if unreadable."""
    if dst.exists():
        return dst.name
    try:
        im = Image.fromarray(load_image(src))
    except ImageReadError:
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    atomic_write(dst, lambda tmp: tmp.write_bytes(buf.getvalue()))
    return dst.name


def write_report(
    result: DedupResult, out_dir: str | Path, max_html_pairs: int = 1000, thumb: int = 200
) -> dict:
    """Write ``pairs.csv``, ``pairs.json`` (summary + pairs) and ``index.html`` into ``out_dir``.

    The HTML page shows the first ``max_html_pairs`` pairs (all are in CSV/JSON).
    Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "query": p.query,
            "reference": p.reference,
            "distance": None if math.isnan(p.distance) else round(p.distance, 6),
            "method": p.method,
            "query_path": p.query_path,
            "reference_path": p.reference_path,
        }
        for p in result.pairs
    ]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)

    csv_path = atomic_write(out / "pairs.csv", write_csv)
    json_path = save_json(
        out / "pairs.json", {"summary": result.summary(), "unreadable": result.unreadable, "pairs": rows}
    )

    thumbs = out / "thumbs"
    names: dict[str, str] = {}
    cells = []
    for k, r in enumerate(rows[:max_html_pairs]):
        for key in ("query_path", "reference_path"):
            src = r[key]
            if src not in names:
                names[src] = _thumb(src, thumbs / f"{len(names):06d}.jpg", thumb) or ""

        def img(src: str, label: str) -> str:
            name = names.get(src, "")
            pic = f'<img src="thumbs/{name}" alt="{html.escape(label)}">' if name else "<i>unreadable</i>"
            return f'<figure>{pic}<figcaption title="{html.escape(src)}">{html.escape(label)}</figcaption></figure>'

        dist = "–" if r["distance"] is None else f"{r['distance']:.4f}"
        cells.append(
            f"<tr><td>{k + 1}</td><td>{img(r['query_path'], r['query'])}</td>"
            f"<td>{img(r['reference_path'], r['reference'])}</td><td>{dist}</td><td>{html.escape(r['method'])}</td></tr>"
        )
    s = result.summary()
    more = (
        f"<p>Showing the first {max_html_pairs} of {len(rows)} pairs; all are in pairs.csv.</p>"
        if len(rows) > max_html_pairs
        else ""
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rcnn dedup report</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:middle;text-align:center}}
figure{{margin:0}} img{{max-width:{thumb}px;max-height:{thumb}px}} figcaption{{font-size:80%}}</style></head>
<body><h1>Near-duplicates: query vs reference</h1>
<p>{s["query_images"]} query images, {s["reference_images"]} reference images;
{s["query_images_found"]} query images found ({100 * s["fraction_of_query_found"]:.2f}%):
{s["source_id_pairs"]} pairs by source ID, {s["gist_pairs"]} by GIST
(32×32 GIST distance ≤ {s["threshold"]}).</p>{more}
<table><tr><th>#</th><th>query</th><th>reference</th><th>GIST distance</th><th>method</th></tr>
{"".join(cells)}
</table></body></html>
"""
    html_path = atomic_write(out / "index.html", lambda tmp: tmp.write_text(page))
    return {"csv": csv_path, "json": json_path, "html": html_path}


def dedup_collections(query: list[ImageItem], reference: list[ImageItem], out_dir: str | Path,
                      threshold: float = DEFAULT_THRESHOLD, config: GistConfig = GistConfig(), *, k: int = 1,
                      method: str = "exact", use_ids: bool = True, workers: int | None = None, cache: bool = True,
                      nprobe: int = 16, progress: ProgressFn | None = None) -> tuple[DedupResult, dict]:
    """``rcnn dedup``: :func:`~rcnn.dedup.match.find_duplicates` of ``query`` in ``reference``
    (GIST distance ``threshold``, see there for the other settings), written to ``out_dir`` by
    :func:`write_report`. Returns the result and the paths written."""
    res = find_duplicates(query, reference, threshold, config, k=k, method=method, use_ids=use_ids, workers=workers,
                          cache=cache, nprobe=nprobe, progress=progress)
    return res, write_report(res, out_dir)
