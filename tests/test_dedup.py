"""Tests for rcnn.dedup: GIST properties, search correctness, caching, ID matching, CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcnn.dedup import (
    DEFAULT_THRESHOLD,
    GistConfig,
    ImageItem,
    collect_images,
    compute_descriptors,
    find_duplicates,
    gist,
    gist_batch,
    match_ids,
    nearest_neighbors,
)
from rcnn.dedup.gist import _pad_symmetric

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _photo(name: str) -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    im = getattr(skdata, name)()
    return np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im[..., :3]


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _resize(img: np.ndarray, s: float) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))


def _d(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


# ----------------------------------------------------------------------------- descriptor


def test_descriptor_dimensions():
    assert GistConfig().dim == 512  # 4 scales × 8 orientations × 4×4 grid
    assert GistConfig(color=True).dim == 1536
    assert GistConfig(image_size=128).dim == 512
    assert GistConfig(orientations=(8, 8, 4)).dim == 320
    img = _photo("astronaut")
    for cfg in (GistConfig(), GistConfig(color=True), GistConfig(image_size=128)):
        g = gist(img, cfg)
        assert g.shape == (cfg.dim,) and g.dtype == np.float32 and np.isfinite(g).all() and (g >= 0).all()
    with pytest.raises(ValueError, match="expects"):
        gist_batch(np.zeros((2, 31, 31, 3), np.uint8))


def test_flat_image_is_finite():
    g = gist_batch(np.full((2, 32, 32, 3), 128, np.uint8))
    assert np.isfinite(g).all()


def test_symmetric_padding_matches_numpy():
    x = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)
    np.testing.assert_array_equal(
        _pad_symmetric(x, 3, 2), np.pad(x, ((0, 0), (3, 2), (3, 2)), mode="symmetric")
    )


def test_orientation_selectivity():
    # a grating rotated by 90° moves the energy peak by 4 of the 8 orientation channels
    y, x = np.mgrid[0:32, 0:32]
    vertical = 127 + 100 * np.sin(2 * np.pi * x / 4.0)
    horizontal = 127 + 100 * np.sin(2 * np.pi * y / 4.0)
    g = gist_batch(np.stack([vertical, horizontal]).astype(np.float32))
    energy = g.reshape(2, 4, 8, 16).sum(axis=(1, 3))  # (image, orientation)
    a, b = energy.argmax(1)
    assert (a - b) % 8 == 4


def test_invariant_to_jpeg_and_rescaling_but_not_to_content():
    cfg = GistConfig()
    base = _photo("astronaut")
    g0 = gist(base, cfg)
    variants = [_jpeg(base, 30), _jpeg(base, 70), _resize(base, 0.6), _resize(base, 1.7)]
    near = [_d(g0, gist(v, cfg)) for v in variants]
    others = [_d(g0, gist(_photo(n), cfg)) for n in ("coffee", "chelsea", "rocket", "camera")]
    assert max(near) < DEFAULT_THRESHOLD < min(others), (near, others)
    assert max(near) < 0.5 * min(others)


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("k", [1, 3])
def test_exact_search_matches_brute_force(k):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(101, 16)).astype(np.float32)
    q = rng.normal(size=(37, 16)).astype(np.float32)
    r[5] = np.nan  # unreadable reference: never returned
    q[3] = np.nan  # unreadable query: no neighbour
    d, i = nearest_neighbors(q, r, k=k, q_block=7, r_block=13)
    full = np.linalg.norm(q[:, None] - r[None], axis=2)
    full[:, 5] = np.inf
    want_i = np.argsort(full, axis=1, kind="stable")[:, :k]
    ok = np.arange(37) != 3
    np.testing.assert_array_equal(i[ok], want_i[ok])
    np.testing.assert_allclose(d[ok], np.take_along_axis(full, want_i, 1)[ok], rtol=1e-4, atol=1e-4)
    assert (i[3] == -1).all() and np.isinf(d[3]).all()


def test_search_with_fewer_references_than_k():
    d, i = nearest_neighbors(np.zeros((2, 4), np.float32), np.ones((1, 4), np.float32), k=3)
    assert (i[:, 0] == 0).all() and (i[:, 1:] == -1).all() and np.allclose(d[:, 0], 2.0)


def test_faiss_search_matches_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    r = rng.normal(size=(500, 32)).astype(np.float32)
    q = r[:50] + rng.normal(0, 0.01, (50, 32)).astype(np.float32)
    d0, i0 = nearest_neighbors(q, r, k=2)
    d1, i1 = nearest_neighbors(q, r, k=2, method="faiss-flat")
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, rtol=1e-3, atol=1e-3)
    _, i2 = nearest_neighbors(q, r, k=1, method="faiss-ivf", nprobe=64)
    assert (i2[:, 0] == np.arange(50)).mean() > 0.9
    with pytest.raises(ValueError, match="search method"):
        nearest_neighbors(q, r, method="annoy")


# ----------------------------------------------------------------------------- collections


def _write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = ["astronaut", "coffee", "chelsea"]
    paths = []
    for n in names:
        p = folder / f"{n}.jpg"
        Image.fromarray(_photo(n)).save(p, quality=90)
        paths.append(p)
    bad = folder / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    return [*paths, bad]


def test_descriptors_cached_and_resumable(tmp_path, monkeypatch):
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "cache"))
    paths = _write_images(tmp_path / "imgs")
    d1, e1 = compute_descriptors(paths, workers=1, chunk_size=2)
    assert np.isfinite(d1[:3]).all() and np.isnan(d1[3]).all()
    assert e1[:3] == [None] * 3 and "broken.jpg" in e1[3]
    cached = sorted((tmp_path / "cache" / "dedup").rglob("*.npz"))
    assert len(cached) == 2  # one file per chunk
    cached[0].unlink()  # a lost chunk is recomputed, the other reused
    d2, e2 = compute_descriptors(paths, workers=1, chunk_size=2)
    np.testing.assert_array_equal(d1[:3], d2[:3])
    assert e2 == e1
    # parallel workers give the same descriptors
    d3, _ = compute_descriptors(paths, workers=2, chunk_size=1, cache=False)
    np.testing.assert_allclose(d1[:3], d3[:3], rtol=1e-6)


def test_id_matching():
    q = [
        ImageItem("a", Path("a.jpg"), "123"),
        ImageItem("b", Path("b.jpg"), None),
        ImageItem("c", Path("c.jpg"), "9"),
    ]
    r = [
        ImageItem("x", Path("x.jpg"), "9"),
        ImageItem("y", Path("y.jpg"), "123"),
        ImageItem("z", Path("z.jpg"), None),
    ]
    assert match_ids(q, r) == [(0, 1), (2, 0)]


def test_find_duplicates_reports_id_and_gist(tmp_path, monkeypatch):
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "cache"))
    paths = _write_images(tmp_path / "ref")[:3]
    qdir = tmp_path / "q"
    qdir.mkdir()
    Image.fromarray(_jpeg(_resize(_photo("astronaut"), 0.5), 40)).save(qdir / "astro_small.jpg")
    Image.fromarray(_photo("rocket")).save(qdir / "rocket.jpg")
    ref = [ImageItem(p.stem, p, source_id=p.stem) for p in paths]
    qry = [
        ImageItem("astro_small", qdir / "astro_small.jpg"),
        ImageItem("rocket", qdir / "rocket.jpg", "coffee"),
    ]
    res = find_duplicates(qry, ref, workers=1)
    got = {(p.query, p.reference): p.method for p in res.pairs}
    assert got == {("astro_small", "astronaut"): "gist", ("rocket", "coffee"): "source-id"}
    assert res.queries_found == 2 and res.fraction_found == 1.0


# ----------------------------------------------------------------------------- real data + CLI


def test_real_duplicate_found_and_cli(tmp_path, monkeypatch):
    ex, voc = DATA / "examples", DATA / "VOC2007-test-sample"
    if not (ex / "000084.jpg").is_file() or not (voc / "JPEGImages" / "000084.jpg").is_file():
        pytest.skip(f"{DATA}: shared data absent")
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "cache"))
    q, r = collect_images(ex), collect_images(voc)
    assert {it.image_id for it in q} >= {"000084.jpg", "fish-bike.jpg"} and len(r) == 19
    res = find_duplicates(q, r, workers=1)
    pairs = [(p.query, p.reference) for p in res.pairs]
    assert ("000084.jpg", "000084") in pairs
    assert all(p.query != "fish-bike.jpg" for p in res.pairs)

    from typer.testing import CliRunner

    from rcnn.cli import app

    out = tmp_path / "report"
    run = CliRunner().invoke(app, ["dedup", str(ex), str(voc), "-o", str(out), "--workers", "1"])
    assert run.exit_code == 0, run.output
    assert "1 of 2 query images found" in " ".join(run.output.split())
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    assert [(r["query"], r["reference"], r["method"]) for r in rows] == [("000084.jpg", "000084", "gist")]
    assert float(rows[0]["distance"]) < 1e-4
    summary = json.loads((out / "pairs.json").read_text())["summary"]
    assert summary["query_images_found"] == 1 and summary["reference_images"] == 19
    page = (out / "index.html").read_text()
    assert page.count("<img ") == 2 and all(
        (out / "thumbs" / f).is_file() for f in ("000000.jpg", "000001.jpg")
    )

    bad = CliRunner().invoke(app, ["dedup", str(tmp_path / "nope"), str(voc), "-o", str(out)])
    assert bad.exit_code == 2 and "no such file" in bad.output


def test_self_dedup_skips_identity_pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "imgs"
    _write_images(folder)
    (folder / "broken.jpg").unlink()
    Image.fromarray(_jpeg(_photo("coffee"), 50)).save(folder / "coffee_copy.jpg")
    items = collect_images(folder)
    res = find_duplicates(items, items, workers=1)
    assert {(p.query, p.reference) for p in res.pairs} == {
        ("coffee.jpg", "coffee_copy.jpg"),
        ("coffee_copy.jpg", "coffee.jpg"),
    }
