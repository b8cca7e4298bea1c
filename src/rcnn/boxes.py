"""Box operations on ``(N, 4)`` arrays.

Convention (everywhere inside the library): boxes are float ``xyxy`` in 0-based
*pixel-edge* coordinates. ``x1`` is the left edge of the first pixel column the box
covers and ``x2`` the right edge of the last, so a box covering pixel columns 0..9
is ``x1=0, x2=10``; width is ``x2 - x1``. A VOC box ``xmin=1..xmax=10`` (1-based,
inclusive) is therefore ``[0, 10)`` here, and the VOC devkit's "+1" area rule is
exactly ``(x2 - x1) * (y2 - y1)``: IoUs computed here equal the devkit's.

Heavy lifting goes to ``torchvision.ops``; these wrappers accept numpy arrays or
tensors and return the same kind they were given.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import ops

ArrayLike = np.ndarray | torch.Tensor

#: Greedy NMS IoU threshold used for detection (paper §2.2: "0.3 in all experiments").
NMS_IOU = 0.3


def _t(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32) if not isinstance(x, torch.Tensor) else x


def _back(x: torch.Tensor, like: ArrayLike) -> ArrayLike:
    return x.numpy() if isinstance(like, np.ndarray) else x


def box_area(boxes: ArrayLike) -> ArrayLike:
    """Area of ``(N,4)`` boxes, ``(N,)``; degenerate boxes have area <= 0."""
    b = _t(boxes).reshape(-1, 4)
    return _back((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), boxes)


def box_iou(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """Pairwise IoU ``(N, M)`` of ``(N,4)`` and ``(M,4)`` boxes (torchvision)."""
    ta, tb = _t(a).reshape(-1, 4), _t(b).reshape(-1, 4)
    return _back(ops.box_iou(ta, tb), a)


def clip_boxes(boxes: ArrayLike, width: int, height: int) -> ArrayLike:
    """Clip ``(N,4)`` boxes to an image of ``width`` x ``height`` pixels."""
    return _back(ops.clip_boxes_to_image(_t(boxes).reshape(-1, 4), (height, width)), boxes)


def remove_small_boxes(boxes: ArrayLike, min_size: float) -> ArrayLike:
    """Indices ``(K,)`` (int64) of boxes whose width and height are both >= ``min_size``."""
    return _back(ops.remove_small_boxes(_t(boxes).reshape(-1, 4), float(min_size)), boxes)


def unique_boxes(boxes: ArrayLike, decimals: int = 2) -> ArrayLike:
    """Indices of the first occurrence of each distinct box, in original order."""
    b = np.round(np.asarray(_t(boxes).reshape(-1, 4)), decimals)
    _, first = np.unique(b, axis=0, return_index=True)
    keep = np.sort(first).astype(np.int64)
    return keep if isinstance(boxes, np.ndarray) else torch.from_numpy(keep)


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float = NMS_IOU) -> ArrayLike:
    """Greedy NMS (paper §2.2): indices ``(K,)`` of kept boxes, by decreasing score.

    A box is rejected when its IoU with a higher-scoring kept box is *larger* than
    ``iou_threshold``.
    """
    return _back(ops.nms(_t(boxes).reshape(-1, 4), _t(scores).reshape(-1), iou_threshold), boxes)


def batched_nms(
    boxes: ArrayLike, scores: ArrayLike, labels: ArrayLike, iou_threshold: float = NMS_IOU
) -> ArrayLike:
    """Per-class greedy NMS (each class independently, paper §2.2); indices ``(K,)``."""
    lab = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    keep = ops.batched_nms(_t(boxes).reshape(-1, 4), _t(scores).reshape(-1), lab, iou_threshold)
    return _back(keep, boxes)


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Boxes ``(N,4)`` xyxy pixel-edge mirrored left–right in an image ``width`` px wide: ``[W-x2, y1, W-x1, y2]``."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1).astype(np.float32)


def voc_to_xyxy(voc: ArrayLike) -> np.ndarray:
    """VOC 1-based inclusive ``[xmin, ymin, xmax, ymax]`` -> library pixel-edge ``xyxy``."""
    b = np.asarray(voc, dtype=np.float32).reshape(-1, 4).copy()
    b[:, :2] -= 1.0
    return b


def xyxy_to_voc(boxes: ArrayLike) -> np.ndarray:
    """Library pixel-edge ``xyxy`` -> VOC 1-based inclusive (the inverse of ``voc_to_xyxy``)."""
    b = np.asarray(_t(boxes), dtype=np.float32).reshape(-1, 4).copy()
    b[:, :2] += 1.0
    return b


def xywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """COCO ``[x, y, w, h]`` (pixel-edge, 0-based) -> ``xyxy``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] += b[:, :2]
    return b


def xyxy_to_xywh(boxes: ArrayLike) -> np.ndarray:
    """``xyxy`` -> COCO ``[x, y, w, h]``."""
    b = np.asarray(_t(boxes), dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] -= b[:, :2]
    return b
