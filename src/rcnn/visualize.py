"""Drawing detections on images: one function every command that draws boxes shares.

``draw_detections(image, boxes, labels, scores, class_names) -> (H,W,3) uint8`` draws
each box in a colour fixed by its class index (so the same class has the same colour in
every picture), with a ``"name 0.87"`` label on a filled background whose text colour is
chosen for contrast. ``save_png(path, image)`` writes atomically.
"""

from __future__ import annotations

import colorsys
import os
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rcnn.cache import atomic_write

# 10 well-separated, colour-blind-friendly colours (matplotlib "tab10" minus grey) first;
# later classes get golden-ratio hue steps so any number of classes stays distinguishable.
_BASE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 187, 120),
)  # fmt: skip
_GOLDEN = 0.618033988749895


def class_color(index: int) -> tuple[int, int, int]:
    """RGB colour of class ``index`` (any non-negative int; deterministic)."""
    index = int(index)
    if 0 <= index < len(_BASE_PALETTE):
        return _BASE_PALETTE[index]
    h = (abs(index) * _GOLDEN) % 1.0
    # alternate saturation/value so neighbouring hues still differ in brightness
    s, v = (0.85, 0.95) if index % 2 else (0.65, 0.75)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    # WCAG relative luminance decides black or white text: readable on every palette colour
    lum = 0.2126 * bg[0] + 0.7152 * bg[1] + 0.0722 * bg[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


@lru_cache(maxsize=16)
def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` px: what box labels are written in."""
    try:  # Pillow >= 10.1 ships a scalable font when FreeType is available
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow / no FreeType: bitmap font
        return ImageFont.load_default()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H,W,3) RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0  # float images in [0,1]
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def label_text(label: int | str, score: float | None, class_names: Sequence[str] | None) -> str:
    """``"name 0.87"``: the class name (or ``class k`` when unnamed) and the score."""
    if isinstance(label, str):
        name = label
    elif class_names is not None and 0 <= int(label) < len(class_names):
        name = str(class_names[int(label)])
    else:
        name = f"class {int(label)}"
    return name if score is None else f"{name} {float(score):.2f}"


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    *,
    line_width: int | None = None,
    font_size: int | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` with the detections drawn on it.

    ``image`` (H,W,3) RGB uint8 (grayscale and float [0,1] images are converted);
    ``boxes`` (N,4) pixel-edge xyxy; ``labels`` (N,) class indices into ``class_names``;
    ``scores`` (N,) or None (then no number is shown). Boxes are drawn lowest score first
    so the most confident label ends on top. Returns (H,W,3) uint8; the input is untouched.
    """
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = list(labels)
    n = len(boxes)
    if len(labels) != n or (scores is not None and len(scores) != n):
        raise ValueError(f"boxes ({n}), labels ({len(labels)}) and scores must have the same length")
    if n == 0:
        return rgb.copy()
    sc = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)

    short = min(h, w)
    lw = line_width or max(2, round(short / 200))
    fs = font_size or max(12, min(32, round(short / 22)))
    font = label_font(fs)
    pil = Image.fromarray(rgb)
    draw = ImageDraw.Draw(pil)

    order = np.argsort(sc, kind="stable") if sc is not None else np.arange(n)
    for i in order:
        lab = labels[i]
        color = class_color(zlib.crc32(lab.encode()) % 10_007 if isinstance(lab, str) else int(lab))
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        if not all(np.isfinite([x1, y1, x2, y2])):
            continue
        # pixel-edge coords: the last covered pixel is x2-1
        x1, y1 = min(max(x1, 0.0), w - 1.0), min(max(y1, 0.0), h - 1.0)
        x2, y2 = min(max(x2 - 1, x1), w - 1.0), min(max(y2 - 1, y1), h - 1.0)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=lw)

        text = label_text(lab, None if sc is None else sc[i], class_names)
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        pad = max(2, fs // 6)
        bw, bh = tw + 2 * pad, th + 2 * pad
        # above the box when it fits, otherwise just inside its top edge
        ty = y1 - bh if y1 - bh >= 0 else y1
        tx = min(x1, max(0.0, w - bw))
        draw.rectangle((tx, ty, tx + bw, ty + bh), fill=color)
        draw.text((tx + pad - tb[0], ty + pad - tb[1]), text, fill=_text_color(color), font=font)
    return np.asarray(pil, dtype=np.uint8).copy()


def save_png(path: str | Path, image: np.ndarray, colors: int | None = None) -> Path:
    """Write ``image`` ((H,W,3) RGB uint8) as a PNG, atomically; creates parent folders.

    ``colors``: quantise to a palette of this many colours (smaller files, e.g. for docs).
    The file gets the usual ``0o666 & ~umask`` permissions (not the temp file's 0o600).
    """
    pil = Image.fromarray(_as_rgb(image))
    if colors is not None:
        pil = pil.quantize(colors=int(colors), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path = atomic_write(path, lambda tmp: pil.save(tmp, format="PNG", optimize=True))
    make_public(path)
    return path


def make_public(path: str | Path) -> None:
    """chmod ``path`` to ``0o666 & ~umask`` (files from ``tempfile.mkstemp`` are 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


__all__ = ["class_color", "draw_detections", "label_text", "make_public", "save_png"]
