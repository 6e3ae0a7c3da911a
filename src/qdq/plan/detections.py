"""A detection head judged by its detections: F1 of the INT8 model's against FP32's, the
measure a user of a detector reads (`qdq.plan.parts` finds the head: 4 box channels, then
class scores)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.25  # a detection, and a row whose class agreement counts: best score above this
MATCH_IOU = 0.5  # a detection of the INT8 model matches FP32's: same class, IoU above this
NMS_IOU = 0.45  # class-wise non-maximum suppression drops a box overlapping a better one more


@dataclass
class Detections:
    """F1 of the INT8 model's detections against FP32's, summed over samples: detections are
    positions whose best class score exceeds CONFIDENCE, after class-wise NMS (IoU NMS_IOU);
    one matches an FP32 detection of the same class with IoU above MATCH_IOU (each FP32 one
    matched once, most confident first). Boxes are (cx, cy, w, h), as YOLO heads write them.

    F1 = 2 matched / (FP32's + INT8's): 1 when both find nothing."""

    axis: int  # the head output's channel axis, batch included
    boxes: tuple[int, int]  # channels start, stop along it
    scores: tuple[int, int]
    matched: int = 0
    reference: int = 0
    found: int = 0

    @property
    def f1(self) -> float:
        total = self.reference + self.found
        return 2 * self.matched / total if total else 1.0

    def update(self, reference: np.ndarray, approximation: np.ndarray) -> None:
        for want, got in zip(reference, approximation, strict=True):  # one sample at a time
            a, b = detect(*self._split(want)), detect(*self._split(got))
            self.matched += match(a, b)
            self.reference, self.found = self.reference + len(a[0]), self.found + len(b[0])

    def merged(self, other: Detections) -> Detections:
        return Detections(self.axis, self.boxes, self.scores, self.matched + other.matched,
                          self.reference + other.reference, self.found + other.found)  # fmt: skip

    def _split(self, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One sample's (positions, 4) boxes and (positions, classes) scores."""
        axis = self.axis - 1  # the batch axis is gone
        boxes = np.take(sample, np.arange(*self.boxes), axis=axis)
        scores = np.take(sample, np.arange(*self.scores), axis=axis)
        return rows(boxes, axis), rows(scores, axis)


Found = tuple[np.ndarray, np.ndarray, np.ndarray]  # corners (n, 4), class (n,), score (n,)


def detect(boxes: np.ndarray, scores: np.ndarray) -> Found:
    """Detections of one sample: (cx, cy, w, h) boxes and class scores per position ->
    corner boxes, classes and confidences kept by the threshold and class-wise NMS, best first.

    >>> b = np.array([[5, 5, 10, 10], [6, 5, 10, 10], [50, 50, 4, 4]], np.float32)
    >>> s = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.3]], np.float32)
    >>> detect(b, s)[1].tolist()  # the second box overlaps the first (IoU 0.82): dropped
    [0, 1]
    """
    classes, confidence = scores.argmax(axis=1), scores.max(axis=1)
    keep = np.flatnonzero(confidence > CONFIDENCE)
    keep = keep[np.argsort(-confidence[keep], kind="stable")]
    cx, cy, w, h = boxes[keep].astype(np.float64).T
    w, h = np.maximum(w, 0), np.maximum(h, 0)  # a negative side is an empty box, not an area
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    chosen: list[int] = []
    for i in range(len(keep)):
        same = [j for j in chosen if classes[keep[j]] == classes[keep[i]]]
        if not same or iou(corners[i], corners[same]).max() <= NMS_IOU:
            chosen.append(i)
    return corners[chosen], classes[keep[chosen]], confidence[keep[chosen]]


def match(reference: Found, found: Found) -> int:
    """How many of `found`'s detections (most confident first) match a distinct one of
    `reference`'s: same class, IoU above MATCH_IOU."""
    free = np.ones(len(reference[0]), bool)
    matched = 0
    for box, cls in zip(found[0], found[1], strict=True):
        candidates = np.flatnonzero(free & (reference[1] == cls))
        if candidates.size:
            overlaps = iou(box, reference[0][candidates])
            best = int(overlaps.argmax())
            if overlaps[best] > MATCH_IOU:
                free[candidates[best]] = False
                matched += 1
    return matched


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x0, y0, x1, y1) box with each of `others`.

    >>> iou(np.array([0, 0, 2, 2.0]), np.array([[1, 0, 3, 2.0]])).tolist()  # 2 / (4 + 4 - 2)
    [0.3333333333333333]
    """
    others = others.reshape(-1, 4)
    lo, hi = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    union = area + areas - inter
    same = (others == box).all(axis=1)  # two equal boxes overlap fully, even without area
    return np.where(union > 0, inter / np.where(union > 0, union, 1), same.astype(float))


def rows(scores: np.ndarray, axis: int | None) -> np.ndarray:
    """(rows, classes): one row per position, the classes along `axis` (the last if None)."""
    moved = scores if axis is None else np.moveaxis(scores, axis, -1)
    return moved.reshape(-1, moved.shape[-1])
