"""Region proposals *with masks*: selective search's hierarchical grouping, keeping masks.

The paper (§4) scores CPMC's ~150 figure-ground regions per image. No maintained Python
CPMC exists, so regions come from selective search's hierarchical grouping (Uijlings et
al.) over Felzenszwalb superpixels, where every merged region keeps its *mask*.

OpenCV's ``ximgproc.segmentation`` provides the superpixels
(``createGraphSegmentation``) but its selective search returns boxes only; the grouping
(colour / texture / size / fill similarities, greedy merging of neighbours) is therefore
written here, vectorised with numpy, so that each region's mask survives.

Three methods (``MaskProposalConfig.method``):

* ``"cnn"`` (default): ``"ranked"`` below plus masks *generated* by a learned, class-agnostic
  mask head on CNN features (:mod:`rcnn.segmentation.maskhead`, DeepMask / Mask R-CNN style)
  in the boxes of the best ranked candidates, snapped to the superpixel cells and ranked by
  the head's objectness ahead of the grouping candidates (:func:`cnn_candidates`). On
  Penn-Fudan test it lifts the mean best IoU at K = 150 from 0.589 to 0.751.
* ``"ranked"`` follows CPMC's *ranking* stage: every grouping region, plus the
  union of each neighbouring pair among the best ``pair_top`` of them (pedestrians' clothes
  and limbs are often separate regions until they merge with the background), is described
  by mid-level cues and scored by a regression forest trained to predict its best IoU with
  an object (:mod:`rcnn.segmentation.ranking`, :func:`train_mask_ranker`; the packaged
  ``pennfudan`` ranker is trained on Penn-Fudan's train split by
  ``bench/segmentation_ranker.py``). CPMC's seeded min-cut *generation* was tried
  (OpenCV ``grabCut`` from box proposals, and a superpixel parametric min-cut with colour
  models): on Penn-Fudan it reached a mean best IoU of only ~0.41 from 200 selective-search
  boxes, and even from the ground-truth boxes 0.51-0.59 (grabCut) / <= 0.55 (min-cut),
  below the grouping pool, so it is not used (README, Semantic segmentation).
* ``"grouping"``: selective search's own ranking (hierarchy level x random), no learned ranker.

Masks are stored compactly: one ``(H,W)`` segment map that refines every strategy's
superpixels (their intersection), plus a ``(K,S)`` membership matrix saying which segments
form each region (bit-packed on disk). ``RegionMasks.masks()`` expands them on demand.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from rcnn.cache import atomic_write, cache_dir, file_sha256, settings_hash
from rcnn.data import ImageRecord, load_image
from rcnn.progress import ProgressFn, tracked
from rcnn.segmentation.maskhead import load_mask_head, maskhead_path, snap
from rcnn.segmentation.packaged import load_once, packaged_file
from rcnn.segmentation.ranking import FEATURES, ForestRanker, SegmentStats, describe, train_ranker

SIMILARITIES = ("colour", "texture", "size", "fill")


@dataclass(frozen=True)
class MaskProposalConfig:
    """Settings of the mask proposals; ``key()`` names their cache.

    Defaults follow selective search's fast mode (HSV and Lab, two ``k``, similarity sets
    C+T+S+F and T+S+F) and O2P's CPMC budget of 150 regions per image (paper §4).
    """

    color_spaces: tuple[str, ...] = ("hsv", "lab")
    ks: tuple[int, ...] = (30, 60)  # at max_side 320: ~300-800 superpixels (measured on Penn-Fudan train)
    sigma: float = 0.8
    min_size: int = 30  # superpixel minimum size (pixels)
    similarity_sets: tuple[tuple[str, ...], ...] = (
        ("colour", "texture", "size", "fill"),
        ("texture", "size", "fill"),
    )
    top_k: int = 150  # paper §4: "CPMC to generate 150 region proposals per image"
    dedup_iou: float = 0.8  # a region this similar to a better-ranked one is dropped
    # regions under this fraction of the image are dropped; None = 0.005 for "grouping",
    # 0.0005 for "ranked" (a fifth of Penn-Fudan's people cover < 0.7 % of their image)
    min_area_frac: float | None = None
    max_area_frac: float = 0.7  # near-whole-image regions carry no shape information
    seed: int = 0  # selective search ranks by hierarchy level x a random number
    max_side: int = 320  # images are grouped at most this large (masks are upsampled back)
    # paper §4 (CPMC): figure-ground candidates ranked by a regressor of their overlap with
    # an object. "cnn" = "ranked" + masks from a learned mask head on CNN features; "ranked" =
    # grouping regions + pairs by the forest ranker; "grouping" = selective search's own ranking
    # (level x random)
    method: str = "cnn"
    ranker: str = "pennfudan"  # a packaged ranker name or an .npz from train_mask_ranker
    pair_top: int = 100  # unions of neighbouring pairs among this many best singles join the pool
    # method "cnn" only: a learned mask head (rcnn.segmentation.maskhead) predicts a mask in
    # each of the cnn_boxes best candidate boxes, snapped to the cells at each threshold
    mask_head: str = "pennfudan"  # a packaged head name or a .safetensors from train_mask_head
    cnn_boxes: int = 150
    cnn_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)
    cnn_box_nms: float = 0.7  # candidate boxes this similar to a better-ranked one are skipped
    # how snapped masks are ranked: "cnn-first" (by the head's objectness, all before the
    # grouping candidates) | "objectness" (mixed with the forest's scores) | "ranker" | "product"
    cnn_score: str = "cnn-first"
    cnn_refine: bool = True  # a second pass from the boxes of the first pass's masks (at 0.4)
    cnn_flip: bool = True  # average each mask with the one predicted on the mirrored image

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"mask proposal method must be one of {METHODS}, not {self.method!r}")
        if self.cnn_score not in CNN_SCORES:
            raise ValueError(f"cnn_score must be one of {CNN_SCORES}, not {self.cnn_score!r}")
        for f in ("color_spaces", "ks", "cnn_thresholds"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(self, "similarity_sets", tuple(tuple(x) for x in self.similarity_sets))

    @property
    def min_area(self) -> float:
        """Effective ``min_area_frac``."""
        if self.min_area_frac is not None:
            return float(self.min_area_frac)
        return 0.005 if self.method == "grouping" else 0.0005

    def key(self) -> str:
        if self.method == "grouping":  # the fields this method has always had: its cached regions stay valid
            d = {k: v for k, v in asdict(self).items() if k not in ("method", "ranker", "pair_top")}
            d["min_area_frac"] = self.min_area
            return settings_hash("mask-proposals-v1", d)
        d = asdict(self)
        if self.method == "ranked":  # the cnn settings do not apply (and existing caches keep their key)
            for k in CNN_FIELDS:
                d.pop(k)
            return settings_hash("mask-proposals-v2", d, file_sha256(ranker_path(self.ranker)))
        return settings_hash("mask-proposals-v3", d, file_sha256(ranker_path(self.ranker)),
                             file_sha256(maskhead_path(self.mask_head)))


METHODS = ("cnn", "ranked", "grouping")
CNN_SCORES = ("cnn-first", "objectness", "ranker", "product")
CNN_FIELDS = ("mask_head", "cnn_boxes", "cnn_thresholds", "cnn_box_nms", "cnn_score", "cnn_refine", "cnn_flip")
RANKERS = Path(__file__).resolve().parent / "rankers"


def ranker_path(name: str) -> Path:
    """The ranker file of ``name``: a packaged ranker (``rankers/<name>.npz``) or a path."""
    return packaged_file(RANKERS, name, ".npz", "mask ranker")


def load_ranker(name: str) -> ForestRanker:
    return load_once(ranker_path(name), ForestRanker.load)


@dataclass
class RegionMasks:
    """``K`` region masks over an ``(H,W)`` image.

    ``segments`` (H,W) int32 segment map with ``S`` segments; ``members`` (K,S) bool,
    region ``k`` = union of segments with ``members[k]``. Regions are in rank order.
    """

    segments: np.ndarray
    members: np.ndarray
    _areas: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.members.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segments.shape)  # type: ignore[return-value]

    @property
    def num_segments(self) -> int:
        return int(self.members.shape[1])

    def segment_areas(self) -> np.ndarray:
        """(S,) int64 pixel count per segment."""
        if self._areas is None:
            self._areas = np.bincount(self.segments.ravel(), minlength=self.num_segments)
        return self._areas

    @property
    def areas(self) -> np.ndarray:
        """(K,) int64 pixels per region."""
        return self.members.astype(np.int64) @ self.segment_areas()

    @property
    def boxes(self) -> np.ndarray:
        """(K,4) float32 pixel-edge xyxy bounding box of each region."""
        x1, y1, x2, y2 = _label_boxes(self.segments, self.num_segments).T
        m = self.members
        out = np.stack([
            np.where(m, x1, np.inf).min(1), np.where(m, y1, np.inf).min(1),
            np.where(m, x2, -np.inf).max(1), np.where(m, y2, -np.inf).max(1),
        ], 1)
        return out.astype(np.float32).reshape(-1, 4)

    def masks(self, idx: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """(k,H,W) bool masks of regions ``idx`` (all when None)."""
        m = self.members if idx is None else self.members[np.asarray(idx, dtype=np.int64)]
        return m[:, self.segments]

    def iou(self, gt_masks: np.ndarray) -> np.ndarray:
        """(K,G) mask IoU of every region with each of ``gt_masks`` (G,H,W) bool."""
        gt = np.asarray(gt_masks, dtype=bool).reshape(-1, *self.shape)
        if gt.shape[0] == 0 or len(self) == 0:
            return np.zeros((len(self), gt.shape[0]), np.float32)
        n = self.num_segments
        # overlap of each segment with each GT mask: (S,G), one bincount per mask
        ov = np.stack([np.bincount(self.segments[g], minlength=n) for g in gt], 1).astype(np.float64)
        m = self.members.astype(np.float64)
        inter = m @ ov
        union = self.areas[:, None] + gt.reshape(gt.shape[0], -1).sum(1)[None, :] - inter
        return (inter / np.maximum(union, 1)).astype(np.float32)

    def subset(self, idx: Sequence[int] | np.ndarray) -> RegionMasks:
        return RegionMasks(self.segments, self.members[np.asarray(idx, dtype=np.int64)], self._areas)

    # -- storage -------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        seg = self.segments
        dtype = np.uint16 if self.num_segments <= np.iinfo(np.uint16).max else np.int32
        return {
            "segments": seg.astype(dtype),
            "members": np.packbits(self.members, axis=1),
            "num_segments": np.array(self.num_segments, np.int64),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> RegionMasks:
        n = int(a["num_segments"])
        members = np.unpackbits(a["members"], axis=1, count=n).astype(bool)
        return cls(a["segments"].astype(np.int32), members)


# ----------------------------------------------------------------------- superpixels


def _label_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n,4) float64 pixel-edge xyxy box of each label 0..n-1 (inf for absent labels)."""
    out = np.tile(np.array([np.inf, np.inf, -np.inf, -np.inf]), (n, 1))
    for i, sl in enumerate(ndimage.find_objects(labels.astype(np.int32) + 1, max_label=n)):
        if sl is not None:
            out[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


def _convert(image: np.ndarray, space: str) -> np.ndarray:
    if space == "hsv":
        return cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    if space == "lab":
        return cv2.cvtColor(image, cv2.COLOR_RGB2Lab)
    if space == "rgb":
        return image
    raise ValueError(f"unknown colour space {space!r} (expected hsv, lab or rgb)")


def felzenszwalb(image: np.ndarray, k: float, sigma: float = 0.8, min_size: int = 50) -> np.ndarray:
    """(H,W) int32 Felzenszwalb-Huttenlocher superpixels (labels 0..n-1) via OpenCV."""
    gs = cv2.ximgproc.segmentation.createGraphSegmentation(sigma=sigma, k=float(k), min_size=int(min_size))
    lab = gs.processImage(np.ascontiguousarray(image)).astype(np.int32)
    _, inv = np.unique(lab, return_inverse=True)  # make labels dense
    return inv.reshape(lab.shape).astype(np.int32)


def _adjacency(labels: np.ndarray, n: int) -> np.ndarray:
    """(P,2) int64 unique neighbouring superpixel pairs (i<j), 4-connectivity."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    d = a != b
    lo, hi = np.minimum(a[d], b[d]).astype(np.int64), np.maximum(a[d], b[d]).astype(np.int64)
    code = np.unique(lo * n + hi)
    return np.stack([code // n, code % n], 1)


def _colour_hist(img: np.ndarray, labels: np.ndarray, n: int, space: str, bins: int = 25) -> np.ndarray:
    """(n, 3*bins) L1-normalised per-channel colour histograms (selective search: 25 bins)."""
    flat = labels.ravel().astype(np.int64)
    out = np.empty((n, 3 * bins), np.float32)
    for c in range(3):
        top = 180 if (space == "hsv" and c == 0) else 256  # OpenCV hue is 0..179
        b = np.minimum(img[..., c].ravel().astype(np.int64) * bins // top, bins - 1)
        out[:, c * bins:(c + 1) * bins] = np.bincount(flat * bins + b, minlength=n * bins).reshape(n, bins)
    return out / np.maximum(out.sum(1, keepdims=True), 1)


def _texture_hist(img: np.ndarray, labels: np.ndarray, n: int, bins: int = 10) -> np.ndarray:
    """(n, 3*8*bins) L1-normalised gradient-orientation histograms (selective search's
    SIFT-like texture: Gaussian derivatives, sigma=1, 8 orientations, 10 bins per channel)."""
    flat = labels.ravel().astype(np.int64)
    out = np.empty((n, 3 * 8 * bins), np.float32)
    angles = np.arange(8) * (np.pi / 4)
    col = 0
    for c in range(3):
        ch = cv2.GaussianBlur(img[..., c].astype(np.float32), (0, 0), 1.0)
        gx = cv2.Sobel(ch, cv2.CV_32F, 1, 0, ksize=3).ravel()
        gy = cv2.Sobel(ch, cv2.CV_32F, 0, 1, ksize=3).ravel()
        for t in angles:
            d = np.maximum(np.cos(t) * gx + np.sin(t) * gy, 0)
            d /= max(float(d.max()), 1e-6)
            b = np.minimum((d * bins).astype(np.int64), bins - 1)
            out[:, col:col + bins] = np.bincount(flat * bins + b, minlength=n * bins).reshape(n, bins)
            col += bins
    return out / np.maximum(out.sum(1, keepdims=True), 1)


# ----------------------------------------------------------------- hierarchical grouping


def hierarchical_grouping(
    labels: np.ndarray,
    colour: np.ndarray,
    texture: np.ndarray,
    similarities: Sequence[str] = SIMILARITIES,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedily merge the most similar neighbouring regions until one is left.

    ``labels`` (H,W) int32 superpixels 0..n-1; ``colour``/``texture`` (n,D) histograms.
    Returns ``members`` (R,n) bool, row ``r`` = superpixels in region ``r`` (rows 0..n-1
    are the superpixels, then one row per merge, in merge order), and ``level`` (R,) int:
    the region's position in the hierarchy counted from the top (last merge = 1, the
    superpixels last), which selective search multiplies by a random number to rank.

    One function on purpose: the merge loop updates the similarity heap, sizes, boxes and
    histograms of the merged pair together (selective search's algorithm, step for step).
    """
    unknown = set(similarities) - set(SIMILARITIES)
    if unknown or not similarities:
        raise ValueError(f"similarities must be a non-empty subset of {SIMILARITIES}, got {similarities}")
    n = int(labels.max()) + 1
    im_size = float(labels.size)
    total = 2 * n - 1
    size = np.zeros(total, np.float64)
    size[:n] = np.bincount(labels.ravel(), minlength=n)
    bb = np.zeros((total, 4), np.float64)
    bb[:n] = _label_boxes(labels, n)
    col = np.zeros((total, colour.shape[1]), np.float32)
    tex = np.zeros((total, texture.shape[1]), np.float32)
    col[:n], tex[:n] = colour, texture
    use_c, use_t, use_s, use_f = (s in similarities for s in SIMILARITIES)

    def sim(i: np.ndarray | int, js: np.ndarray) -> np.ndarray:
        s = np.zeros(len(js), np.float64)
        if use_c:
            s += np.minimum(col[i], col[js]).sum(-1)
        if use_t:
            s += np.minimum(tex[i], tex[js]).sum(-1)
        if use_s:
            s += 1.0 - (size[i] + size[js]) / im_size
        if use_f:
            bw = np.maximum(bb[i, 2], bb[js, 2]) - np.minimum(bb[i, 0], bb[js, 0])
            bh = np.maximum(bb[i, 3], bb[js, 3]) - np.minimum(bb[i, 1], bb[js, 1])
            s += 1.0 - (bw * bh - size[i] - size[js]) / im_size
        return s

    pairs = _adjacency(labels, n)
    neigh: list[set[int]] = [set() for _ in range(total)]
    for a, b in pairs.tolist():
        neigh[a].add(b)
        neigh[b].add(a)
    heap = list(zip((-sim(pairs[:, 0], pairs[:, 1])).tolist(), pairs[:, 0].tolist(), pairs[:, 1].tolist(),
                    strict=True))
    heapq.heapify(heap)
    alive = np.zeros(total, bool)
    alive[:n] = True
    members = np.zeros((total, n), bool)
    members[np.arange(n), np.arange(n)] = True
    k = n
    while heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue  # lazy deletion: a pair whose region was already merged
        alive[i] = alive[j] = False
        alive[k] = True
        si, sj = size[i], size[j]
        size[k] = si + sj
        bb[k, :2] = np.minimum(bb[i, :2], bb[j, :2])
        bb[k, 2:] = np.maximum(bb[i, 2:], bb[j, 2:])
        col[k] = (si * col[i] + sj * col[j]) / (si + sj)  # size-weighted, as in selective search
        tex[k] = (si * tex[i] + sj * tex[j]) / (si + sj)
        members[k] = members[i] | members[j]
        nb = (neigh[i] | neigh[j]) - {i, j}
        for m in nb:
            neigh[m].discard(i)
            neigh[m].discard(j)
            neigh[m].add(k)
        neigh[k] = nb
        neigh[i] = neigh[j] = set()
        if nb:
            js = np.fromiter(nb, np.int64, len(nb))
            for s, jj in zip((-sim(k, js)).tolist(), js.tolist(), strict=True):
                heapq.heappush(heap, (s, k, jj))
        k += 1
    members = members[:k]
    # position in the hierarchy from the top: last merge = 1, ..., superpixels last
    level = np.empty(k, np.int64)
    level[n:] = np.arange(k - n, 0, -1)
    level[:n] = k - n + 1 + np.arange(n)
    return members, level


# ----------------------------------------------------------------------- proposals


def _work_image(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H,W,3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    H, W = image.shape[:2]
    scale = min(1.0, max_side / max(H, W))
    work = image if scale == 1.0 else cv2.resize(
        image, (max(1, round(W * scale)), max(1, round(H * scale))), interpolation=cv2.INTER_AREA)
    return work, scale


@dataclass
class _Pool:
    """Every grouping candidate of one (working-size) image.

    ``maps``: the superpixelisations; ``strategies``: per (map, similarity set) the
    ``(members (R,n) bool, level (R,))`` of its hierarchy; ``segments``: the refinement
    of all maps (every candidate is a union of its cells); ``to_sp[m]`` cell -> superpixel.
    """

    maps: list[np.ndarray]
    strategies: list[tuple[int, np.ndarray, np.ndarray]]
    segments: np.ndarray
    to_sp: list[np.ndarray]

    def rows(self, s: int, idx: np.ndarray) -> np.ndarray:
        """(len(idx), S) bool membership over ``segments`` of strategy ``s``'s regions ``idx``."""
        m, members, _ = self.strategies[s]
        return members[idx][:, self.to_sp[m]]


def _grouping_pool(work: np.ndarray, config: MaskProposalConfig) -> _Pool:
    maps: list[np.ndarray] = []
    strategies = []
    for space in config.color_spaces:
        conv = _convert(work, space)
        for k in config.ks:
            labels = felzenszwalb(conv, k, config.sigma, config.min_size)
            n = int(labels.max()) + 1
            ch = _colour_hist(conv, labels, n, space)
            th = _texture_hist(conv, labels, n)
            maps.append(labels)
            for sims in config.similarity_sets:
                members, level = hierarchical_grouping(labels, ch, th, sims)
                strategies.append((len(maps) - 1, members, level))
    # The intersection of all superpixelisations: every candidate is a union of its cells.
    code = np.zeros(maps[0].shape, np.int64)
    for m in maps:
        code = code * (int(m.max()) + 1) + m
    _, first, inv = np.unique(code.ravel(), return_index=True, return_inverse=True)
    segments = inv.reshape(code.shape).astype(np.int32)
    return _Pool(maps, strategies, segments, [m.ravel()[first] for m in maps])


def _select(rows_of, order: np.ndarray, areas: np.ndarray, config: MaskProposalConfig) -> np.ndarray:
    """Greedy ranked selection: walk candidates in ``order`` (rows from ``rows_of(idx)``,
    (k,S) over cells of ``areas``), keep those within the area limits that no kept region
    already covers with mask IoU >= ``dedup_iou``; stop at ``top_k``. Returns (K,S) bool."""
    kept = np.zeros((config.top_k, len(areas)), np.float32)
    kept_area = np.zeros(config.top_k, np.float32)
    area32 = areas.astype(np.float32)
    npx = float(areas.sum())
    nk = 0
    chunk = 256
    for start in range(0, len(order), chunk):
        rows = rows_of(order[start:start + chunk]).astype(np.float32)
        ra = rows @ area32
        ok = np.flatnonzero((ra >= config.min_area * npx) & (ra <= config.max_area_frac * npx))
        if len(ok) == 0:
            continue
        rows, ra = rows[ok], ra[ok]
        weighted = rows * area32
        # IoU with the regions kept so far and among this chunk, in two matrix products
        ik = weighted @ kept[:nk].T
        iou_kept = (ik / (ra[:, None] + kept_area[None, :nk] - ik)).max(1) if nk else np.zeros(len(ok))
        ic = weighted @ rows.T
        iou_chunk = ic / (ra[:, None] + ra[None, :] - ic)
        taken: list[int] = []
        for r in range(len(ok)):
            if iou_kept[r] >= config.dedup_iou or (taken and iou_chunk[r, taken].max() >= config.dedup_iou):
                continue  # a better-ranked region already has (nearly) this mask
            taken.append(r)
            if nk + len(taken) == config.top_k:
                break
        kept[nk:nk + len(taken)], kept_area[nk:nk + len(taken)] = rows[taken], ra[taken]
        nk += len(taken)
        if nk == config.top_k:
            break
    return kept[:nk] > 0


def _to_image_size(result: RegionMasks, H: int, W: int) -> RegionMasks:
    """Upsample the segment map of a working-size result to (H,W)."""
    if result.shape == (H, W):
        return result
    seg_full = cv2.resize(result.segments, (W, H), interpolation=cv2.INTER_NEAREST)
    result = _compact(RegionMasks(seg_full, result.members))
    # rule: a region left without pixels by the resize is dropped (features need >= 1 pixel)
    nonempty = result.members.any(1)
    if not nonempty.all():
        result = result.subset(np.flatnonzero(nonempty))
    return result


def mask_proposals(image: np.ndarray, config: MaskProposalConfig = MaskProposalConfig()) -> RegionMasks:
    """Top-``config.top_k`` ranked, deduplicated region masks of an ``(H,W,3)`` RGB uint8 image.

    ``config.method``: ``"ranked"`` (default) scores every grouping region and the unions
    of neighbouring top regions with the learned ranker (:func:`ranked_candidates`);
    ``"grouping"`` ranks as selective search does (hierarchy level times a seeded random
    number in (0,1]). Either way a candidate is kept in rank order unless a kept region
    already covers it with mask IoU >= ``dedup_iou``.
    """
    work, _ = _work_image(image, config.max_side)
    H, W = np.asarray(image).shape[:2]
    pool = _grouping_pool(work, config)
    areas = np.bincount(pool.segments.ravel()).astype(np.float64)
    if config.method == "cnn":
        rows, score = cnn_candidates(image, work, pool, config)
        order = np.argsort(-score, kind="stable")
        kept = _select(lambda idx: rows[idx], order, areas, config)
    elif config.method == "ranked":
        rows, score = ranked_candidates(work, pool, config)
        order = np.argsort(-score, kind="stable")
        kept = _select(lambda idx: rows[idx], order, areas, config)
    else:
        rng = np.random.default_rng(config.seed)
        cand_rank = [level * rng.uniform(1e-9, 1.0, len(level)) for _, _, level in pool.strategies]
        owner = np.concatenate([np.full(len(r), s) for s, r in enumerate(cand_rank)])
        local = np.concatenate([np.arange(len(r)) for r in cand_rank])
        order = np.argsort(np.concatenate(cand_rank), kind="stable")

        def rows_of(idx: np.ndarray) -> np.ndarray:
            return np.stack([pool.rows(owner[i], np.array([local[i]]))[0] for i in idx])

        kept = _select(rows_of, order, areas, config)
    return _to_image_size(RegionMasks(pool.segments, kept), H, W)


# ------------------------------------------------------------------- learned ranking


def _area_ok(rows_area: np.ndarray, npx: float, config: MaskProposalConfig) -> np.ndarray:
    return (rows_area >= config.min_area * npx) & (rows_area <= config.max_area_frac * npx)


def _singles(work: np.ndarray, pool: _Pool, config: MaskProposalConfig) -> tuple[np.ndarray, np.ndarray]:
    """The grouping regions within the area limits, each once: rows (R,S) bool over
    ``pool.segments`` and descriptors (R,F)."""
    npx = float(work.shape[0] * work.shape[1])
    singles, feats = [], []
    stats = [SegmentStats.from_labels(work, labels) for labels in pool.maps]
    for m, members, level in pool.strategies:
        st = stats[m]
        area = members.astype(np.float32) @ st.area.astype(np.float32)
        ok = np.flatnonzero(_area_ok(area, npx, config))
        lv = (level[ok] - 1) / max(float(level.max()), 1.0)
        feats.append(describe(members[ok], st, lv))
        singles.append(members[ok][:, pool.to_sp[m]])
    rows = np.concatenate(singles)
    X = np.concatenate(feats)
    # exact duplicates across strategies (the same union of cells) are scored once
    _, uniq = np.unique(np.packbits(rows, axis=1), axis=0, return_index=True)
    uniq = np.sort(uniq)
    return rows[uniq], X[uniq]


def _pairs(work: np.ndarray, pool: _Pool, rows: np.ndarray, score: np.ndarray,
           config: MaskProposalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unions of neighbouring (or overlapping, not nested) pairs among the ``pair_top``
    best (deduplicated) singles by ``score``: rows (P,S) bool and descriptors (P,F)."""
    empty = np.zeros((0, rows.shape[1]), bool), np.zeros((0, len(FEATURES)), np.float32)
    if config.pair_top <= 0 or len(rows) < 2:
        return empty
    npx = float(work.shape[0] * work.shape[1])
    seg_st = SegmentStats.from_labels(work, pool.segments)
    area = seg_st.area.astype(np.float32)
    top = _select(lambda idx: rows[idx], np.argsort(-score, kind="stable"), seg_st.area,
                  MaskProposalConfig(**{**asdict(config), "top_k": config.pair_top}))
    tf = top.astype(np.float32)
    touch = tf[:, seg_st.pair_i] @ tf[:, seg_st.pair_j].T
    inter = (tf * area) @ tf.T
    touch = touch + touch.T + inter
    ta = tf @ area
    union = ta[:, None] + ta[None, :] - inter
    nested = inter >= 0.9 * np.minimum(ta[:, None], ta[None, :])
    i, j = np.nonzero(np.triu((touch > 0) & ~nested & (union <= config.max_area_frac * npx), 1))
    if len(i) == 0:
        return empty
    prow = top[i] | top[j]
    return prow, describe(prow, seg_st, np.zeros(len(i)), np.ones(len(i)))


def candidate_pool(work: np.ndarray, pool: _Pool, config: MaskProposalConfig,
                   ranker: ForestRanker | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All candidates of the ranked method over ``pool.segments``: the grouping regions
    within the area limits, then the unions of neighbouring pairs among the ``pair_top``
    best singles (by ``ranker``; by hierarchy level when None).

    Returns ``rows`` (R,S) bool, descriptors ``X`` (R,F) and scores (R,) (predicted IoU;
    minus the hierarchy level without a ranker).
    """
    rows, X = _singles(work, pool, config)
    score = ranker.predict(X) if ranker is not None else -X[:, FEATURES.index("level")]
    prow, pX = _pairs(work, pool, rows, score, config)
    if len(prow) == 0:
        return rows, X, score
    pscore = ranker.predict(pX) if ranker is not None else np.full(len(pX), -1.0)
    return np.concatenate([rows, prow]), np.concatenate([X, pX]), np.concatenate([score, pscore])


def ranked_candidates(work: np.ndarray, pool: _Pool, config: MaskProposalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(R,S) bool candidate rows over ``pool.segments`` and their predicted IoU (R,)."""
    rows, _, score = candidate_pool(work, pool, config, load_ranker(config.ranker))
    return rows, score


def cnn_candidates(image: np.ndarray, work: np.ndarray, pool: _Pool,
                   config: MaskProposalConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ranked pool plus masks predicted by the learned mask head (method ``"cnn"``).

    The boxes of the ranked candidates, best first, skipping a box with IoU >=
    ``cnn_box_nms`` to a better one, up to ``cnn_boxes``, go through
    :class:`~rcnn.segmentation.maskhead.MaskPredictor` on the full-resolution ``image``;
    each predicted mask is snapped to ``pool.segments`` at every ``cnn_thresholds`` value;
    with ``cnn_refine`` the boxes of the masks at 0.4 go through the head once more (snapped
    at 0.3 and 0.5). Snapped masks are ranked by the head's objectness ahead of every
    grouping candidate (``"cnn-first"``, default), by objectness mixed with the forest's
    scores, by the forest ranker, or by forest x objectness. Returns rows (R,S) bool and
    scores (R,)."""
    import torch
    from torchvision.ops import nms

    ranker = load_ranker(config.ranker)
    rows, _, score = candidate_pool(work, pool, config, ranker)
    if len(rows) == 0 or config.cnn_boxes <= 0:
        return rows, score
    boxes = RegionMasks(pool.segments, rows).boxes
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(score.astype(np.float32)), config.cnn_box_nms).numpy()
    boxes = boxes[keep[: config.cnn_boxes]]
    sx, sy = work.shape[1] / np.asarray(image).shape[1], work.shape[0] / np.asarray(image).shape[0]
    to_image = np.array([sx, sy, sx, sy], np.float32)
    head = load_mask_head(config.mask_head)
    maps = head.maps(np.asarray(image), config.cnn_flip)  # the trunk runs once for both passes
    probs, obj = head.predict(maps, boxes / to_image, config.cnn_flip)
    th = config.cnn_thresholds
    crows = snap(probs, boxes, pool.segments, th)
    cobj = np.repeat(obj, len(th)).astype(np.float64)
    if config.cnn_refine:
        # the first pass's masks have tighter boxes than the grouping regions they came from
        mid = snap(probs, boxes, pool.segments, (0.4,))
        mid = mid[mid.any(1)]
        if len(mid):
            rb = RegionMasks(pool.segments, mid).boxes
            p2, o2 = head.predict(maps, rb / to_image, config.cnn_flip)
            crows = np.concatenate([crows, snap(p2, rb, pool.segments, (0.3, 0.5))])
            cobj = np.concatenate([cobj, np.repeat(o2, 2).astype(np.float64)])
    nonempty = crows.any(1)
    crows, cobj = crows[nonempty], cobj[nonempty]
    if len(crows) == 0:
        return rows, score
    if config.cnn_score == "cnn-first":
        cscore = cobj + 1.0 + max(float(score.max()), 0.0)  # above every forest score
    elif config.cnn_score == "objectness":
        cscore = cobj
    else:
        st = SegmentStats.from_labels(work, pool.segments)
        cscore = ranker.predict(describe(crows, st, np.zeros(len(crows)), np.ones(len(crows))))
        if config.cnn_score == "product":
            cscore = cscore * cobj
    return np.concatenate([rows, crows]), np.concatenate([score, cscore])


def _training_image(image: np.ndarray, gt: np.ndarray, config: MaskProposalConfig):
    work, scale = _work_image(image, config.max_side)
    gt = np.asarray(gt, bool).reshape(-1, *np.asarray(image).shape[:2])
    if scale != 1.0 and len(gt):
        gt = np.stack([cv2.resize(g.astype(np.uint8), work.shape[1::-1], interpolation=cv2.INTER_NEAREST)
                       for g in gt]).astype(bool)
    return work, _grouping_pool(work, config), gt


def _best_iou(rows: np.ndarray, segments: np.ndarray, gt: np.ndarray) -> np.ndarray:
    if len(gt) == 0 or len(rows) == 0:
        return np.zeros(len(rows), np.float32)
    return RegionMasks(segments, rows).iou(gt).max(1)


def train_mask_ranker(
    images: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], config: MaskProposalConfig = MaskProposalConfig(),
    n_trees: int = 40, seed: int = 0, progress: ProgressFn | None = None,
) -> tuple[ForestRanker, dict]:
    """CPMC-style ranker (paper §4): a regression forest predicting each candidate's best
    IoU with a ground-truth object, from :func:`~rcnn.segmentation.ranking.describe`.

    ``images``: (H,W,3) uint8 RGB; ``gt_masks``: per image (G,H,W) bool object masks.
    Stage 1 learns on the single grouping regions; its ranking picks the pairs whose
    unions stage 2 adds to the training rows. Returns the ranker and a summary dict.
    """
    prepared, Xs, ys = [], [], []
    items = zip(images, gt_masks, strict=True)
    for image, gt in tracked(items, progress, "ranker training images"):
        work, pool, g = _training_image(image, gt, config)
        rows, X = _singles(work, pool, config)
        prepared.append((work, pool, g))
        Xs.append(X)
        ys.append(_best_iou(rows, pool.segments, g))
    X1, y1 = np.concatenate(Xs), np.concatenate(ys)
    stage1 = train_ranker(X1, y1, n_trees=n_trees, seed=seed)
    info = {"images": len(prepared), "single_rows": len(X1), "pair_rows": 0}
    if config.pair_top <= 0:
        return stage1, info
    for work, pool, g in prepared:
        rows, X = _singles(work, pool, config)
        prow, pX = _pairs(work, pool, rows, stage1.predict(X), config)
        Xs.append(pX)
        ys.append(_best_iou(prow, pool.segments, g))
    X2, y2 = np.concatenate(Xs), np.concatenate(ys)
    info["pair_rows"] = len(X2) - len(X1)
    return train_ranker(X2, y2, n_trees=n_trees, seed=seed), info


def _compact(r: RegionMasks) -> RegionMasks:
    """Drop segments that no longer appear (e.g. after nearest-neighbour upsampling)."""
    present = np.bincount(r.segments.ravel(), minlength=r.num_segments) > 0
    if present.all():
        return r
    remap = np.cumsum(present) - 1
    return RegionMasks(remap[r.segments].astype(np.int32), r.members[:, present])


# --------------------------------------------------------------------------- caching


def _cache_path(image_path: Path, config: MaskProposalConfig) -> Path:
    sha = file_sha256(image_path)
    return cache_dir() / "mask_proposals" / config.key() / sha[:2] / f"{sha}.npz"


def get_mask_proposals(
    record: ImageRecord | str | Path,
    config: MaskProposalConfig = MaskProposalConfig(),
    dataset_root: str | Path | None = None,
) -> RegionMasks:
    """Region masks of one image, from the cache (keyed by the image bytes and ``config``)
    or computed and stored atomically."""
    path = Path(record.path if isinstance(record, ImageRecord) else record)
    if dataset_root is not None and not path.is_absolute() and not path.exists():
        path = Path(dataset_root) / path
    cpath = _cache_path(path, config)
    try:
        with np.load(cpath, allow_pickle=False) as z:
            return RegionMasks.from_arrays({k: z[k] for k in z.files})
    except (OSError, ValueError, EOFError, KeyError):
        pass
    regions = mask_proposals(load_image(path), config)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **regions.to_arrays())  # segment maps compress ~10x

    atomic_write(cpath, write)
    return regions


# ---------------------------------------------------------------------------- recall


def mask_recall(best_iou: Sequence[float] | np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Summary of best region IoU per ground-truth instance: mean and recall at ``threshold``."""
    b = np.asarray(best_iou, np.float64)
    if b.size == 0:
        return {"instances": 0, "mean_best_iou": float("nan"), f"recall@{threshold:g}": float("nan")}
    return {"instances": int(b.size), "mean_best_iou": float(b.mean()),
            f"recall@{threshold:g}": float((b >= threshold).mean()), "recall@0.7": float((b >= 0.7).mean())}
