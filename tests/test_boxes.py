import numpy as np
import torch

from rcnn.boxes import (
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    flip_boxes,
    nms,
    remove_small_boxes,
    unique_boxes,
    voc_to_xyxy,
    xywh_to_xyxy,
    xyxy_to_voc,
    xyxy_to_xywh,
)


def reference_greedy_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """The textbook greedy NMS, written out for comparison."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        order = [j for j in order if box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0] <= thr]
    return keep


def test_voc_iou_convention():
    # VOC devkit: boxes [1,1,10,10] and [6,1,15,10] (1-based inclusive) overlap in 5x10 pixels,
    # each has 100 pixels, so IoU = 50 / 150.
    a, b = voc_to_xyxy([[1, 1, 10, 10]]), voc_to_xyxy([[6, 1, 15, 10]])
    assert np.allclose(box_iou(a, b), 50 / 150)
    assert np.allclose(box_area(a), 100)
    assert np.allclose(xyxy_to_voc(a), [[1, 1, 10, 10]])


def test_coco_roundtrip_and_types():
    b = np.array([[2.5, 3.0, 10.0, 20.0]], np.float32)
    assert np.allclose(xywh_to_xyxy(xyxy_to_xywh(b)), b)
    t = torch.tensor(b)
    assert isinstance(box_iou(t, t), torch.Tensor) and isinstance(box_iou(b, b), np.ndarray)


def test_clip_small_unique():
    b = np.array([[-5, -5, 50, 50], [10, 10, 12, 30], [10, 10, 12, 30], [0, 0, 20, 20]], np.float32)
    assert np.allclose(clip_boxes(b, 40, 30)[0], [0, 0, 40, 30])
    assert list(remove_small_boxes(b, 5)) == [0, 3]
    assert list(unique_boxes(b)) == [0, 1, 3]


def test_nms_matches_reference_greedy():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (300, 2))
    wh = rng.uniform(5, 60, (300, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(size=300).astype(np.float32)
    for thr in (0.3, 0.5):
        assert list(nms(boxes, scores, thr)) == reference_greedy_nms(boxes, scores, thr)


def test_nms_default_is_paper_03_and_per_class():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 14], [0, 0, 10, 10]], np.float32)  # IoU(0,1) = 0.714
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert list(nms(boxes, scores)) == [0]
    # different classes never suppress each other
    assert sorted(batched_nms(boxes, scores, np.array([0, 1, 1]))) == [0, 1]


def test_flip_boxes_mirrors_and_is_an_involution():
    b = np.array([[10, 20, 30, 40]], np.float32)
    np.testing.assert_array_equal(flip_boxes(b, 100), [[70, 20, 90, 40]])
    np.testing.assert_array_equal(flip_boxes(flip_boxes(b, 100), 100), b)
    assert flip_boxes(np.zeros((0, 4)), 10).shape == (0, 4)
