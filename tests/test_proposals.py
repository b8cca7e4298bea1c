"""Region proposals: geometry and format, bad input, the cache, recall, and the authors' boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import data_path
from rcnn.data import Dataset, ImageReadError, ImageRecord, load_dataset, load_image, write_voc_xml
from rcnn.proposals import (
    ProposalConfig,
    best_overlaps,
    get_proposals,
    plot_recall_curve,
    proposal_path,
    proposal_recall,
    propose_dataset,
    selective_search,
)

OBJECTS = np.array([[30, 20, 90, 70], [100, 60, 150, 110]], np.float32)  # pixel-edge xyxy


def scene(w: int = 160, h: int = 120, seed: int = 0) -> np.ndarray:
    """A textured grey background with a red and a blue rectangle at ``OBJECTS`` (scaled)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
    sx, sy = w / 160, h / 120
    for (x1, y1, x2, y2), c in zip(OBJECTS, [(220, 40, 40), (30, 60, 200)], strict=True):
        img[round(y1 * sy) : round(y2 * sy), round(x1 * sx) : round(x2 * sx)] = c
    return img


def check_format(boxes: np.ndarray, w: int, h: int) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) >= 1
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes), "duplicates"


def test_geometry_and_format_on_synthetic_image():
    img = scene()
    boxes = selective_search(img)
    check_format(boxes, 160, 120)
    # Both objects found exactly (pixel-edge conversion of OpenCV's x,y,w,h), and the whole image.
    best, _ = best_overlaps(OBJECTS, boxes)
    np.testing.assert_allclose(best, 1.0)
    assert ((boxes == [0, 0, 160, 120]).all(1)).sum() == 1
    # Original fast mode drops boxes narrower than 20 px (image is < 500 px: not resized).
    assert (boxes[:, 2] - boxes[:, 0] >= 20).all()
    assert ((selective_search(img, min_size=0)[:, 2] - selective_search(img, min_size=0)[:, 0]) < 20).any()
    # Ranking order is reproducible (seeded), and max_boxes keeps the best-ranked prefix.
    np.testing.assert_array_equal(boxes, selective_search(img))
    np.testing.assert_array_equal(selective_search(img, max_boxes=5), boxes[:5])


def test_large_image_is_resized_and_boxes_scaled_back():
    img = scene(800, 600)  # segmented at 500 x 375, boxes scaled x1.6 back
    boxes = selective_search(img)
    check_format(boxes, 800, 600)
    assert ((boxes == [0, 0, 800, 600]).all(1)).sum() == 1
    best, _ = best_overlaps(OBJECTS * 800 / 160, boxes)
    assert (best > 0.97).all(), best
    # min_size applies in the segmented (500-px) image: 20 px there = 32 px here
    assert (boxes[:, 2] - boxes[:, 0] >= 32 - 1e-3).all()


def test_other_modes_and_small_object_ks():
    img = scene()
    for mode in ("fast", "quality"):
        b = selective_search(img, mode=mode)
        check_format(b, 160, 120)
        assert (best_overlaps(OBJECTS, b)[0] > 0.9).all()
    b = selective_search(img, ks=(25, 50))
    check_format(b, 160, 120)


def test_bad_and_odd_images():
    gray = scene()[:, :, 0]
    check_format(selective_search(gray), 160, 120)
    check_format(selective_search(gray[:, :, None]), 160, 120)
    rgba = np.dstack([scene(), np.full((120, 160), 255, np.uint8)])
    np.testing.assert_array_equal(selective_search(rgba), selective_search(scene()))
    tiny = np.full((5, 7, 3), 128, np.uint8)  # smaller than the 20-px minimum box
    b = selective_search(tiny)
    check_format(b, 7, 5)
    np.testing.assert_array_equal(b[0], [0, 0, 7, 5])
    tall = scene(40, 3000)  # elongated: max_side caps the segmented copy
    check_format(selective_search(tall), 40, 3000)
    check_format(selective_search(scene().astype(np.float32) / 255), 160, 120)
    with pytest.raises(ValueError, match="image"):
        selective_search(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        selective_search(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        ProposalConfig(mode="slow")


def test_config_key_changes_with_every_setting():
    base = ProposalConfig()
    keys = {
        base.key(),
        ProposalConfig(ks=(25, 50)).key(),
        ProposalConfig(mode="fast").key(),
        ProposalConfig(max_boxes=100).key(),
        ProposalConfig(min_size=10).key(),
        ProposalConfig(resize_width=0).key(),
        ProposalConfig(seed=1).key(),
    }
    assert len(keys) == 7
    assert ProposalConfig().key() == base.key()


def _dataset(tmp_path, n: int = 3, bad: bool = True) -> Dataset:
    """A VOC-layout dataset of synthetic images, the last one a corrupt JPEG if ``bad``."""
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n + bad):
        iid = f"im{i}"
        path = tmp_path / "JPEGImages" / f"{iid}.png"
        if bad and i == n:
            path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        else:
            Image.fromarray(scene(seed=i)).save(path)
        rec = ImageRecord(iid, path, 160, 120, OBJECTS.copy(), np.array([0, 1]), np.array([False, False]))
        write_voc_xml(rec, ["red", "blue"], tmp_path / "Annotations" / f"{iid}.xml")
        ids.append(iid)
    (tmp_path / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")
    return load_dataset(tmp_path, "test", classes=["red", "blue"])


def test_cache_resume_reuse_invalidate_and_bad_image(tmp_path):
    ds = _dataset(tmp_path)
    cfg = ProposalConfig(max_boxes=300)
    s = propose_dataset(ds, cfg, workers=2)
    assert (s.computed, s.cached, len(s.failed)) == (3, 0, 1)
    assert "im3.png" in s.failed[0][1] and s.failed[0][0] == "im3"
    assert s.cache_mb > 0
    good = ds.records[:3]
    paths = [proposal_path(r, cfg, ds.root) for r in good]
    assert all(p.is_file() for p in paths)
    first = [get_proposals(r, cfg, ds.root) for r in good]
    for r, b in zip(good, first, strict=True):
        np.testing.assert_array_equal(b, selective_search(load_image(r.path), cfg))
    # second run: nothing computed
    s2 = propose_dataset(ds, cfg, workers=2, records=good)
    assert (s2.computed, s2.cached, s2.failed) == (0, 3, [])
    # a killed run leaves some entries missing (or half-written: corrupt): only those are redone
    paths[0].unlink()
    paths[1].write_bytes(b"garbage")
    s3 = propose_dataset(ds, cfg, workers=1, records=good)
    assert (s3.computed, s3.cached) == (2, 1)
    # a changed setting never reuses stale boxes
    s4 = propose_dataset(ds, ProposalConfig(max_boxes=50), workers=1, records=good)
    assert (s4.computed, s4.cached) == (3, 0)
    assert all(len(get_proposals(r, ProposalConfig(max_boxes=50), ds.root)) <= 50 for r in good)
    # a changed image file is recomputed
    Image.fromarray(scene(seed=99)).save(good[2].path)
    s5 = propose_dataset(ds, cfg, workers=1, records=good)
    assert (s5.computed, s5.cached) == (1, 2)
    with pytest.raises(ImageReadError, match=r"im3\.png"):
        get_proposals(ds.records[3], cfg, ds.root)


def test_cli_reports_bad_image_and_exits_nonzero(tmp_path):
    from rcnn.cli import app

    _dataset(tmp_path, n=1)
    r = CliRunner().invoke(
        app, ["propose", str(tmp_path), "--split", "test", "--max-boxes", "100", "-j", "1"]
    )
    assert r.exit_code == 1, r.output
    assert "im1.png" in r.output and "MB" in r.output
    out = tmp_path / "recall.json"
    r = CliRunner().invoke(
        app, ["proposals-recall", str(tmp_path), "--split", "test", "--max-boxes", "100", "-o", str(out)]
    )
    assert r.exit_code == 1 and out.is_file() and out.with_suffix(".png").is_file()


def test_recall_math():
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    props = np.array([[0, 0, 10, 20], [20, 20, 40, 40], [0, 0, 10, 10]], np.float32)
    best, at = best_overlaps(gt, props, counts=(1, 2, 3, 10))
    np.testing.assert_allclose(best, [1.0, 1.0])
    np.testing.assert_allclose(at, [[0.5, 0.5, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    rec = ImageRecord("a", None, 50, 50, np.vstack([gt, [[30, 0, 50, 10]]]), np.array([0, 1, 1]),
                      np.array([False, False, True]))  # fmt: skip
    res = proposal_recall([rec], [props[:1]], ["c0", "c1"])
    assert res.objects == 2  # the difficult one is ignored
    assert res.recall == {"0.5": 0.5, "0.7": 0.0}
    assert res.per_class["c0"]["abo"] == pytest.approx(0.5) and res.per_class["c1"]["abo"] == 0.0
    assert res.mabo == pytest.approx(0.25)
    res = proposal_recall([rec], [props], ["c0", "c1"], counts=(1, 3))
    assert res.recall["0.7"] == 1.0 and res.mabo == 1.0 and res.curve["0.5"] == {1: 0.5, 3: 1.0}


def _authors_boxes(image_id: str) -> np.ndarray:
    """The authors' boxes as library xyxy: 0-based inclusive [x1 y1 x2 y2] -> x2 + 1, y2 + 1."""
    from scipy.io import loadmat

    b = loadmat(data_path("VOC2007-test-sample", "selective_search", f"{image_id}_boxes.mat"))["boxes"]
    assert b.dtype == np.uint16 and b.shape[1] == 4
    out = b.astype(np.float32)
    out[:, 2:] += 1
    return out


def test_reference_against_the_authors_boxes(tmp_path):
    root = data_path("VOC2007-test-sample")
    ds = load_dataset(root, "test")
    recs = [r for r in ds.records if r.image_id in ("000004", "001551")]
    assert len(recs) == 2
    theirs = [_authors_boxes(r.image_id) for r in recs]
    for r, b in zip(recs, theirs, strict=True):
        # the convention: the largest box is the whole image, edges at exactly W and H
        assert b[:, 2].max() == r.width and b[:, 3].max() == r.height
        assert ((b == [0, 0, r.width, r.height]).all(1)).sum() == 1
    ours = [get_proposals(r, ProposalConfig(), root) for r in recs]
    for r, b in zip(recs, ours, strict=True):
        check_format(b, r.width, r.height)
    res_t = proposal_recall(recs, theirs, ds.classes)
    res_o = proposal_recall(recs, ours, ds.classes)
    assert res_t.recall["0.5"] >= 0.9  # sanity of the conversion: their boxes cover the objects
    assert res_o.recall["0.5"] >= res_t.recall["0.5"] - 0.1
    assert res_o.mabo >= res_t.mabo - 0.08
    assert 0.3 < res_o.mean_boxes / res_t.mean_boxes < 3
    plot_recall_curve({"authors": res_t, "ours": res_o}, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
