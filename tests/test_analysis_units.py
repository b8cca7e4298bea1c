"""pool5 unit visualisation and warped samples on small hand-built inputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torch import nn

from rcnn.analysis.units import (
    Hit,
    Unit,
    auto_units,
    parse_units,
    receptive_fields,
    top_activations,
    unit_grid,
    units_figure,
)
from rcnn.data import Dataset, ImageRecord


def test_unit_index_round_trip_and_parse():
    u = Unit(channel=7, y=2, x=5, grid=6)
    assert u.index == 7 * 36 + 2 * 6 + 5
    assert Unit.from_index(u.index, 6) == u
    assert parse_units("2,5,7; 40") == [u, Unit.from_index(40)]
    with pytest.raises(ValueError, match="y and x"):
        parse_units("6,0,1")


def test_receptive_field_from_layers():
    # conv 3x3 pad 1 then max-pool 2x2: pooled cell i sees input pixels 2i-1 .. 2i+2 (clipped)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
    bb = SimpleNamespace(name="toy", trunk=trunk, input_size=12, pool5_grid=6, fixed_grid=False, weights_hash="x",
                         modules=None)
    rf = receptive_fields(bb)
    assert rf.shape == (6, 6, 4)
    assert list(rf[0, 0]) == [0, 0, 3, 3]
    assert list(rf[2, 3]) == [5, 3, 9, 7]
    assert list(rf[5, 5]) == [9, 9, 12, 12]
    # the network itself was not modified
    assert isinstance(trunk[2], nn.MaxPool2d) and isinstance(trunk[1], nn.ReLU)


def test_top_activations_nms_within_image_and_global_order():
    units = [Unit(0, 0, 0, 1), Unit(1, 0, 0, 1)]
    recs = [ImageRecord(i, Path(f"{i}.png"), 100, 100, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
            for i in ("a", "b")]
    boxes = {
        "a": np.array([[0, 0, 50, 50], [1, 1, 50, 50], [60, 60, 90, 90]], np.float32),
        "b": np.array([[0, 0, 40, 40], [50, 50, 90, 90]], np.float32),
    }
    feats = {
        "a": np.array([[9.0, 0.0], [8.0, 5.0], [1.0, 0.5]], np.float16),
        "b": np.array([[3.0, 7.0], [2.0, 6.0]], np.float16),
    }
    top = top_activations(recs, lambda r: (boxes[r.image_id], feats[r.image_id]), units, k=3)
    # unit 0: 9 (a), then 8 is suppressed by NMS (IoU 0.96 with 9), then 3 (b), 2 (b)
    assert [(h.score, h.image_id) for h in top[units[0]]] == [(9.0, "a"), (3.0, "b"), (2.0, "b")]
    assert [h.score for h in top[units[1]]] == [7.0, 6.0, 5.0]


def test_auto_units_pick_extreme_weights():
    W = np.zeros((2 * 36, 2), np.float32)
    W[40, 0], W[3, 0] = 2.0, -3.0
    W[71, 1], W[0, 1] = 1.0, -1.0
    model = SimpleNamespace(W=W, classes=["a", "b"], trained=np.array([True, True]), layer="pool5")
    bb = SimpleNamespace(pool5_grid=6, dim=lambda layer, g=None: 72)
    units = auto_units(model, bb)
    assert [u.index for u in units] == [40, 3, 71, 0]
    assert units[0].note == "a +"


def test_unit_grid_draws(tmp_path):
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, 40:] = 200
    Image.fromarray(img).save(tmp_path / "i.png")
    rec = ImageRecord("i", tmp_path / "i.png", 80, 60, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
    hits = [Hit(3.5, "i", (40.0, 0.0, 80.0, 60.0)), Hit(1.0, "i", (0.0, 0.0, 40.0, 60.0))]

    def warp(image, boxes):
        b = boxes[0].astype(int)
        crop = image[b[1]:b[3], b[0]:b[2]]
        return np.asarray(Image.fromarray(crop).resize((32, 32)))[None]

    g = unit_grid(hits, {"i": rec}, np.array([0, 0, 16, 16]), 32, warp, tile=32, cols=4, title="u")
    assert g.shape == (18 + 32, 128, 3)
    # first tile is the bright half, second the dark half; the RF outline is white
    assert g[18 + 20, 20].mean() > 150 and g[18 + 20, 32 + 20].mean() < 50
    assert (g[18 + 10, 0:2] == 255).all()
    assert units_figure([("unit", g)], tmp_path / "u.png").stat().st_size > 1000


def test_warped_samples(tmp_path):
    pytest.importorskip("rcnn.features")
    from rcnn.analysis.warps import sample_regions, warp_samples, warps_figure

    img = np.zeros((50, 50, 3), np.uint8)
    img[10:30, 10:40] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "a.png")
    rec = ImageRecord("a", tmp_path / "a.png", 50, 50, np.array([[10, 10, 40, 30], [0, 0, 5, 5]], np.float32),
                      np.array([0, 1]), np.array([False, False]))
    ds = Dataset(tmp_path, None, ["red", "other"], [rec])
    s = sample_regions(ds, "red", n=5)
    assert len(s) == 1 and list(s[0][1]) == [10, 10, 40, 30]
    crops = warp_samples(s, 16)
    assert crops.shape == (1, 16, 16, 3) and (crops[0, 2:14, 2:14] == (255, 0, 0)).all()  # the box fills the crop
    with pytest.raises(ValueError, match="not in the dataset"):
        sample_regions(ds, "blue")
    assert warps_figure(crops, tmp_path / "w.png", "t", "c").stat().st_size > 500
