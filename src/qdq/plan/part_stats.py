"""Each part of each output measured against FP32 (`qdq.plan.parts` finds the parts): its
error, class agreement for scores, detection F1 for a head; and the worst part, which every
automatic choice maximises (`worst_sqnr`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qdq.metrics import ErrorStats
from qdq.plan.detections import CONFIDENCE, Detections, rows
from qdq.plan.parts import TOP_K, Kind, Part, is_detection


@dataclass
class PartStats:
    """One part's error (SQNR, cosine, ...), class agreement for scores, F1 for a head."""

    part: Part
    error: ErrorStats = field(default_factory=ErrorStats)
    top1: int = 0
    topk: int = 0
    rows: int = 0
    detections: Detections | None = None

    def update(
        self,
        reference: np.ndarray,
        approximation: np.ndarray,
        outputs: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Add a batch of the whole output (FP32, then quantized); `outputs`, FP32's outputs
        of the batch by name, are needed where the part has a gate."""
        if self.part.gate is not None and outputs is None:
            raise ValueError(f"part {self.part.label} needs FP32's outputs by name")
        if reference.shape != approximation.shape:  # an NMS's rows: a count set by the data
            self.error.unmatched += 1
            return
        want, got = self.part.pair(reference, approximation, outputs or {})
        self.error.update(want, got)
        classes = self.part.axis is None or self.part.stop - self.part.start > 1
        if self.part.kind is Kind.SCORES and classes:  # one score channel has no class to agree
            want_rows, got_rows = rows(want, self.part.axis), rows(got, self.part.axis)
            confident = want_rows.max(axis=1) > CONFIDENCE
            best = want_rows[confident].argmax(axis=1)
            top = np.argsort(-got_rows[confident], axis=1)[:, :TOP_K]
            self.top1 += int((top[:, 0] == best).sum())
            self.topk += int((top == best[:, None]).any(axis=1).sum())
            self.rows += len(best)
        if self.detections is not None:
            self.detections.update(reference, approximation)

    @property
    def agreement_rows(self) -> int:
        """The rows its top-1 and top-k agreements count: confident positions of a scores part,
        else the samples of a (batch, classes) output (`ErrorStats`), else 0."""
        if self.part.kind is Kind.SCORES and self.rows:
            return self.rows
        return self.error.rows if self.error.classes and self.part.axis is None else 0

    def as_dict(self) -> dict[str, float | None]:
        """Its error; class agreement for a scores part or a whole (batch, classes) output,
        never for boxes or values beside other quantities (an argmax over cx, cy, w, h)."""
        out = self.error.as_dict()
        if self.part.axis is not None:
            out = {k: v for k, v in out.items() if not k.startswith("top")}
        if self.part.kind is Kind.SCORES and self.rows:
            out["top1_agreement"] = self.top1 / self.rows
            out[f"top{TOP_K}_agreement"] = self.topk / self.rows
        if self.detections is not None:
            out["detection_f1"] = self.detections.f1
        return out

    def merged(self, other: PartStats) -> PartStats:
        """The sums of two shards of the same part."""
        detections = None
        if self.detections is not None and other.detections is not None:
            detections = self.detections.merged(other.detections)
        top1, topk, rows = self.top1 + other.top1, self.topk + other.topk, self.rows + other.rows
        return PartStats(self.part, self.error.merged(other.error), top1, topk, rows, detections)


def part_stats(parts: Sequence[Part]) -> list[PartStats]:
    """Fresh statistics for `parts` of one output; a detection head's scores also count F1."""
    stats = [PartStats(p) for p in parts]
    if is_detection(parts):
        boxes, scores = parts[:2]
        stats[1].detections = Detections(
            boxes.axis, (boxes.start, boxes.stop), (scores.start, scores.stop)
        )
    return stats


def update_all(
    stats: Sequence[PartStats],
    reference: np.ndarray,
    approximation: np.ndarray,
    outputs: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Add a batch of one output to each of its parts' statistics (`outputs`: FP32's outputs
    of the batch by name, for gated parts)."""
    for s in stats:
        s.update(reference, approximation, outputs)


def worst_sqnr(stats: Iterable[PartStats]) -> float:
    """What automatic choices maximise: the lowest SQNR of any part of any output (inf for a
    model with no float output: nothing to lose); a NaN one is the lowest of all (min() had
    passed it over unless it came first), and so is one whose size differed from FP32's on a
    sample (an NMS that kept another number of boxes)."""
    scores = (-math.inf if s.error.unmatched else s.error.sqnr_db for s in stats)
    return min((-math.inf if math.isnan(v) else v for v in scores), default=math.inf)


def judged(
    parts: dict[str, list[Part]],
    reference: Sequence[Sequence[np.ndarray]],
    approximation: Iterable[Sequence[np.ndarray]],
) -> list[PartStats]:
    """Every part's statistics of an approximation's outputs (per feed, in `parts`' order)
    against FP32's."""
    stats = {name: part_stats(p) for name, p in parts.items()}
    if not stats:  # no float output to judge (ONNX Runtime asked for none returns them all)
        return []
    for want, got in zip(reference, approximation, strict=True):
        by_name = dict(zip(stats, want, strict=True))
        for name, ref, out in zip(stats, want, got, strict=True):
            update_all(stats[name], ref, out, by_name)
    return [s for group in stats.values() for s in group]
