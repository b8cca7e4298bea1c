"""Tests for rcnn.visualize: boxes drawn where they belong, in per-class colours, with labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rcnn.visualize import class_color, draw_detections, label_text, save_png


def _gray(h: int = 120, w: int = 160) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


def test_box_outline_drawn_in_class_colour_and_input_untouched():
    img = _gray()
    before = img.copy()
    out = draw_detections(img, np.array([[40, 50, 120, 110]], np.float32), [2], [0.9], ["a", "b", "c"])
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(img, before)  # input not modified
    col = np.array(class_color(2))
    # left edge at x=40, a row well below the label
    assert np.array_equal(out[90, 40], col)
    # right edge: pixel-edge x2=120 -> last covered column 119
    assert np.array_equal(out[90, 119], col)
    # interior and outside unchanged
    assert np.array_equal(out[80, 80], before[80, 80])
    assert np.array_equal(out[115, 150], before[115, 150])


def test_label_background_above_box():
    img = _gray(200, 200)
    out = draw_detections(img, np.array([[60, 100, 180, 190]]), [0], [0.5], ["cat"])
    col = np.array(class_color(0))
    band = out[90:100, 60:80]  # the label band just above the top edge (font >= 11 px)
    # the filled background takes most of it and the text (another colour) some of it
    is_bg = np.all(band == col, axis=-1)
    assert is_bg.mean() > 0.3
    assert (~is_bg).any()
    assert np.all(out[60, 150] == 128)  # far above the label: untouched


def test_label_inside_when_box_at_top():
    out = draw_detections(_gray(), np.array([[0, 0, 100, 100]]), [1], [0.7], ["dog", "cup"])
    col = np.array(class_color(1))
    assert np.all(out[2, 2] == col)
    assert np.all(out[90, 50] == 128)


def test_colours_distinct_for_many_classes():
    cols = {class_color(i) for i in range(200)}
    assert len(cols) == 200
    for i in range(50):
        a, b = np.array(class_color(i)), np.array(class_color(i + 1))
        assert np.abs(a - b).sum() > 60  # neighbours differ visibly


def test_many_classes_and_no_names_and_no_scores():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    xy = rng.uniform(0, 300, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 100, (50, 2))], 1)
    out = draw_detections(img, boxes, rng.integers(0, 500, 50), None, None)
    assert out.shape == img.shape and not np.array_equal(out, img)


def test_empty_and_degenerate_inputs():
    img = _gray()
    assert np.array_equal(draw_detections(img, np.zeros((0, 4)), [], [], ["x"]), img)
    # boxes outside the image / zero extent / non-finite are clipped or skipped, never crash
    boxes = np.array([[-50, -50, 500, 500], [10, 10, 10, 10], [np.nan, 0, 5, 5]], np.float32)
    out = draw_detections(img, boxes, [0, 1, 2], [0.1, 0.2, 0.3], ["a", "b", "c"])
    assert out.shape == img.shape
    with pytest.raises(ValueError):
        draw_detections(img, np.zeros((2, 4)), [0], [0.1, 0.2], None)


def test_grayscale_and_float_images():
    g = np.full((64, 64), 0.5, np.float32)
    out = draw_detections(g, np.array([[5, 20, 50, 60]]), [0], [0.3], ["x"])
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[40, 30, 0] == 128 or out[40, 30, 0] == 127


def test_label_text():
    assert label_text(1, 0.876, ["a", "cat"]) == "cat 0.88"
    assert label_text(7, None, ["a"]) == "class 7"
    assert label_text("mug", 0.5, None) == "mug 0.50"


def test_save_png_roundtrip(tmp_path):
    img = draw_detections(_gray(), np.array([[10, 40, 60, 90]]), [0], [0.9], ["cat"])
    p = save_png(tmp_path / "sub" / "out.png", img)
    assert p.exists()
    back = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(back, img)
    assert not list((tmp_path / "sub").glob("*.tmp"))
