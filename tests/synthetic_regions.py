"""A synthetic region-feature source for detector tests (no CNN, no proposals module).

Each image has a few objects of classes 0 and 1 (class 2 never occurs). Proposals are jittered
copies of the objects (all IoUs) plus random background boxes. A region's feature is
``sum_c iou_c * mu_c + noise`` where ``iou_c`` is its max IoU with class ``c`` objects, so a
linear SVM can separate well-localised regions from the rest, and only if it is trained right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcnn.boxes import box_iou
from rcnn.data import ImageRecord
from rcnn.sources import FeatureSource

CLASSES = ["cell", "blob", "absent"]
D = 24


class SyntheticSource(FeatureSource):
    name = "synthetic"
    layer = "fc7"
    mode = "shared"
    weights_hash = "0" * 64

    def __init__(self, seed: int = 0, noise: float = 0.35):
        rng = np.random.default_rng(1234)
        self.mu = rng.normal(size=(len(CLASSES), D)).astype(np.float32)
        self.bg = rng.normal(size=D).astype(np.float32) * 0.5
        self.noise = noise
        self.seed = seed
        self.calls = 0

    def _feats(self, boxes: np.ndarray, record: ImageRecord, rng) -> np.ndarray:
        f = np.tile(self.bg, (len(boxes), 1)) + self.noise * rng.normal(size=(len(boxes), D)).astype(np.float32)
        if len(record.boxes):
            iou = box_iou(boxes, record.boxes)
            for c in range(len(CLASSES)):
                m = record.labels == c
                if m.any():
                    f += iou[:, m].max(1, keepdims=True) ** 2 * self.mu[c] * 3
        return f.astype(np.float32)

    def regions(self, record: ImageRecord):
        self.calls += 1
        rng = np.random.default_rng(int(record.image_id) * 7 + 1)
        boxes = []
        for b in record.boxes:
            w, h = b[2] - b[0], b[3] - b[1]
            for _ in range(25):
                j = rng.normal(scale=0.35, size=4) * np.array([w, h, w, h])
                boxes.append(b + j)
        for _ in range(150):
            x, y = rng.uniform(0, 280, 2)
            s = rng.uniform(10, 60, 2)
            boxes.append([x, y, x + s[0], y + s[1]])
        boxes = np.clip(np.asarray(boxes, np.float32), 0, 320)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0] + 2) & (boxes[:, 3] > boxes[:, 1] + 2)]
        return boxes, self._feats(boxes, record, rng).astype(np.float16)

    def gt_features(self, record: ImageRecord):
        rng = np.random.default_rng(int(record.image_id) * 7 + 2)
        return self._feats(record.boxes.astype(np.float32), record, rng).astype(np.float16)


def synthetic_records(n: int, start: int = 0) -> list[ImageRecord]:
    rng = np.random.default_rng(start + 99)
    recs = []
    for i in range(start, start + n):
        k = int(rng.integers(1, 4))
        boxes, labels = [], []
        for _ in range(k):
            x, y = rng.uniform(0, 240, 2)
            s = rng.uniform(25, 70)
            boxes.append([x, y, x + s, y + s * rng.uniform(0.7, 1.3)])
            labels.append(int(rng.integers(0, 2)))
        difficult = np.zeros(k, bool)
        if i % 5 == 0:
            difficult[0] = True
        recs.append(ImageRecord(str(i), Path(f"/nonexistent/{i}.jpg"), 320, 320, np.asarray(boxes, np.float32),
                                np.asarray(labels, np.int64), difficult))
    return recs
