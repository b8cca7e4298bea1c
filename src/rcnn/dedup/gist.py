"""Oliva–Torralba GIST descriptor, vectorised over a batch with FFTs (scipy.fft).

This follows the reference MATLAB implementation (``LMgist.m`` of Oliva & Torralba, the
one used by Douze et al., "Evaluation of GIST descriptors for web-scale image search",
the paper's ref. [13]) step by step:

1. warp the image to ``image_size`` × ``image_size`` (paper App. C: "GIST descriptors on
   warped 32 × 32 pixel versions"), grey = mean of R, G, B unless ``color``;
2. rescale each image to [0, 255], then *prefilter*: ``log(1 + I)``, remove the low
   frequencies with a Gaussian of cut-off ``fc_prefilt`` = 4 cycles/image (whitening),
   and divide by the local contrast (``0.2 + local std``);
3. filter with a bank of Gabor-like filters defined in the frequency domain
   (``orientations`` per scale, default 4 scales × 8 orientations, parameters of
   ``createGabor.m``: ``0.35``, ``0.3 / 1.85**s``, ``16 * o**2 / 32**2``, angle ``π j / o``)
   on the image padded symmetrically by ``boundary`` pixels;
4. average the magnitude of each filter output over a ``grid`` × ``grid`` grid
   (block edges ``fix(linspace(0, N, grid + 1))`` as ``downN.m``).

The descriptor of a grey image has ``sum(orientations) * grid**2`` = 512 dimensions by
default (×3 for ``color``), laid out as (channel, scale, orientation, block-x, block-y).
Distances between descriptors are plain Euclidean, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import scipy.fft as sfft
from PIL import Image, ImageOps

from rcnn.cache import settings_hash
from rcnn.data import MAX_IMAGE_PIXELS, ImageReadError, image_errors, to_rgb8

__all__ = ["GistConfig", "gist", "gist_batch", "gist_of_files", "load_warped", "warp_image"]


@dataclass(frozen=True)
class GistConfig:
    """Parameters of the GIST descriptor (defaults: the paper's 32×32 grey GIST)."""

    image_size: int = 32  # paper App. C: "warped 32 × 32 pixel versions" (Douze et al. [13])
    orientations: tuple[int, ...] = (8, 8, 8, 8)  # 4 scales × 8 orientations (LMgist default)
    grid: int = 4  # 4×4 spatial averaging grid (LMgist numberBlocks)
    fc_prefilt: float = 4.0  # prefilter cut-off, cycles/image (LMgist fc_prefilt)
    boundary: int | None = None  # symmetric padding before Gabor filtering (pixels); None = size // 4
    color: bool = False  # True: one GIST per R, G, B channel, concatenated (3× dims)

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"GistConfig.image_size must be ≥ 8, not {self.image_size}")
        if self.grid < 1 or self.grid > self.image_size:
            raise ValueError(f"GistConfig.grid must be in 1..image_size, not {self.grid}")
        if not self.orientations or min(self.orientations) < 1:
            raise ValueError(f"GistConfig.orientations must be positive counts, not {self.orientations}")
        object.__setattr__(self, "orientations", tuple(int(o) for o in self.orientations))

    @property
    def pad(self) -> int:
        """Boundary extension in pixels: LMgist pads 32 px around its 128/256-px images; a quarter
        of the size (8 px at 32×32) keeps the FFT small (48²) for the paper's tiny images."""
        return self.boundary if self.boundary is not None else min(32, self.image_size // 4)

    @property
    def channels(self) -> int:
        return 3 if self.color else 1

    @property
    def dim(self) -> int:
        """Descriptor length: channels × filters × grid²."""
        return self.channels * sum(self.orientations) * self.grid**2

    def key(self) -> str:
        """Hash of every setting (cache key component)."""
        return settings_hash("gist-v1", asdict(self))


# ----------------------------------------------------------------------------- filters


@lru_cache(maxsize=16)
def _gabor_bank(n: int, orientations: tuple[int, ...]) -> np.ndarray:
    """Transfer functions ``(K, n, n)`` float32 of ``createGabor.m`` for an n×n FFT (unshifted)."""
    f = np.arange(-n // 2, n // 2, dtype=np.float64)
    fx, fy = np.meshgrid(f, f)
    fr = np.fft.fftshift(np.sqrt(fx**2 + fy**2))
    t = np.fft.fftshift(np.angle(fx + 1j * fy))
    out = []
    for s, n_or in enumerate(orientations):
        for j in range(n_or):
            p1, p2, p3, p4 = 0.35, 0.3 / 1.85**s, 16.0 * n_or**2 / 32.0**2, math.pi / n_or * j
            tr = t + p4
            tr = tr + 2 * math.pi * (tr < -math.pi) - 2 * math.pi * (tr > math.pi)
            out.append(np.exp(-10 * p1 * (fr / n / p2 - 1) ** 2 - 2 * p3 * math.pi * tr**2))
    bank = np.stack(out).astype(np.float32)
    bank.setflags(write=False)
    return bank


@lru_cache(maxsize=16)
def _lowpass(n: int, fc: float) -> np.ndarray:
    """Gaussian low-pass ``(n, n)`` of ``prefilt.m`` (unshifted), cut-off ``fc`` cycles/image."""
    s1 = fc / math.sqrt(math.log(2))
    f = np.arange(-n // 2, n // 2, dtype=np.float64)
    fx, fy = np.meshgrid(f, f)
    g = np.fft.fftshift(np.exp(-(fx**2 + fy**2) / s1**2)).astype(np.float32)
    g.setflags(write=False)
    return g


@lru_cache(maxsize=16)
def _block_matrix(size: int, grid: int) -> np.ndarray:
    """``(grid, size)`` averaging matrix with ``downN.m``'s block edges ``fix(linspace(0, size, grid+1))``."""
    edges = np.fix(np.linspace(0, size, grid + 1)).astype(int)
    m = np.zeros((grid, size), np.float32)
    for i in range(grid):
        m[i, edges[i] : edges[i + 1]] = 1.0 / (edges[i + 1] - edges[i])
    m.setflags(write=False)
    return m


def _pad_symmetric(x: np.ndarray, before: int, after: int | None = None) -> np.ndarray:
    """MATLAB ``padarray(x, [p p], 'symmetric')`` on the last two dims (edge pixel repeated;
    pads wider than the image keep mirroring, unlike ``np.pad``)."""
    after = before if after is None else after
    h, w = x.shape[-2:]

    def idx(n: int) -> np.ndarray:
        i = np.remainder(np.arange(-before, n + after), 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)

    return x[..., idx(h)[:, None], idx(w)[None, :]]


# ----------------------------------------------------------------------------- descriptor

# scipy.fft is ~3× faster than torch.fft for these small complex64 2-D transforms on a CPU
_fft2, _ifft2 = sfft.fft2, sfft.ifft2


def _prefilter(x: np.ndarray, fc: float) -> np.ndarray:
    """``prefilt.m``: log, whitening and local contrast normalisation of ``(B, C, S, S)`` in [0, 255]."""
    w = 5  # prefilt.m pads by 5 pixels to reduce boundary artefacts
    s = x.shape[-1]
    x = np.log1p(x)
    n = s + 2 * w
    n += n % 2
    x = _pad_symmetric(x, w, n - s - w)
    gf = _lowpass(n, fc)
    out = x - _ifft2(_fft2(x) * gf).real
    local = np.sqrt(np.abs(_ifft2(_fft2((out**2).mean(axis=1, keepdims=True)) * gf)))
    out = out / (0.2 + local)
    return np.ascontiguousarray(out[..., w : w + s, w : w + s], dtype=np.float32)


def gist_batch(images: np.ndarray, config: GistConfig = GistConfig()) -> np.ndarray:
    """GIST of already-warped images.

    ``images``: ``(B, S, S, 3)`` or ``(B, S, S)`` uint8 / float in [0, 255] with
    ``S == config.image_size``. Returns ``(B, config.dim)`` float32.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1] != config.image_size or x.shape[2] != config.image_size:
        raise ValueError(
            f"gist_batch expects (B, {config.image_size}, {config.image_size}[, 3]) images, got {x.shape}"
        )
    b, s = x.shape[0], config.image_size
    if b == 0:
        return np.zeros((0, config.dim), np.float32)
    x = x.transpose(0, 3, 1, 2)  # (B, C, S, S)
    if not config.color:
        x = x.mean(axis=1, keepdims=True)  # LMgist: grey = mean of the channels
    elif x.shape[1] != 3:
        x = np.repeat(x, 3, axis=1)
    # LMgist: img = img - min(img(:)); img = 255 * img / max(img(:)); per image
    x = x - x.min(axis=(1, 2, 3), keepdims=True)
    x = x * (255.0 / np.maximum(x.max(axis=(1, 2, 3), keepdims=True), 1e-6))  # flat image: no 0/0
    x = _prefilter(x, config.fc_prefilt)
    be = config.pad
    n = s + 2 * be
    spec = _fft2(_pad_symmetric(x, be))  # (B, C, n, n) complex64
    bank = _gabor_bank(n, config.orientations)  # (K, n, n)
    pool = _block_matrix(s, config.grid)  # (g, S)
    feats = []
    step = 8  # filters per ifft2 call: bounds memory to B × C × 8 × n² complex values
    for k in range(0, bank.shape[0], step):
        resp = _ifft2(spec[:, :, None] * bank[k : k + step], overwrite_x=True)
        mag = np.abs(resp[..., be : be + s, be : be + s])  # (B, C, k, S(y), S(x))
        # block means -> (B, C, k, gx, gy): x-major, y-minor, like MATLAB's column-major downN
        feats.append((pool @ mag @ pool.T).swapaxes(-1, -2).reshape(b, x.shape[1], -1))
    return np.concatenate(feats, axis=2).reshape(b, -1).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- images


def warp_image(image: np.ndarray, size: int) -> np.ndarray:
    """Anisotropically resize ``(H, W, 3)`` uint8 to ``(size, size, 3)`` uint8 (area averaging,
    so that a shrink is anti-aliased and JPEG noise averages out)."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)


def load_warped(path: str | Path, size: int = 32, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file and warp it to ``(size, size, 3)`` RGB uint8.

    JPEGs are decoded at a reduced DCT scale (PIL ``draft``) and other images box-shrunk
    by an integer factor, never below 4× ``size``: several times faster than a full-size
    warp and indistinguishable after the area-averaging warp. Raises :class:`~rcnn.data.ImageReadError` naming the file.
    """
    path = Path(path)
    with image_errors(path), Image.open(path) as im:
        if im.width * im.height > max_pixels:
            raise ImageReadError(f"{path}: image is {im.width}x{im.height} pixels, over the {max_pixels}-pixel limit")
        if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
            im.draft("RGB" if im.mode != "L" else "L", (4 * size, 4 * size))
        im.load()
        im = ImageOps.exif_transpose(im)
        factor = min(im.width, im.height) // (4 * size)
        if factor >= 2 and im.mode in ("RGB", "L"):
            im = im.reduce(factor)  # fast integer box shrink (PNG etc.): same role as draft
        rgb = to_rgb8(im)
    return warp_image(rgb, size)


def gist(image: np.ndarray, config: GistConfig = GistConfig()) -> np.ndarray:
    """GIST ``(config.dim,)`` float32 of one ``(H, W, 3)`` RGB uint8 image of any size (warped first)."""
    return gist_batch(warp_image(image, config.image_size)[None], config)[0]


def gist_of_files(
    paths: list[str | Path], config: GistConfig = GistConfig(), batch: int = 64
) -> tuple[np.ndarray, list[str | None]]:
    """GIST of image files: ``(N, dim)`` float32 (rows of unreadable files are NaN) and one
    error message per file (``None`` when it was read)."""
    out = np.full((len(paths), config.dim), np.nan, np.float32)
    errors: list[str | None] = [None] * len(paths)
    for start in range(0, len(paths), batch):
        ims, rows = [], []
        for i in range(start, min(start + batch, len(paths))):
            try:
                ims.append(load_warped(paths[i], config.image_size))
                rows.append(i)
            except ImageReadError as e:
                errors[i] = str(e)
        if ims:
            out[rows] = gist_batch(np.stack(ims), config)
    return out, errors
