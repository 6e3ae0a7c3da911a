"""What an output decides, read as its user reads it: a recognizer's text from its per-step
class probabilities. Where the decisions are FP32's on every sample, how far the probabilities
moved does not matter to that user (PP-OCRv6's recognizer read every line as FP32 does from
13 dB of probability error), so the frontier credits such a candidate
(`qdq.plan.method.sample_scores`'s `decided`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Positions per sample from which an output of class probabilities counts as a sequence of
# decisions (`decision_outputs`): a text line's CTC steps (PP-OCR's recognizers: 40-80 per line).
MIN_STEPS = 16
DISTRIBUTION_ATOL = 1e-3  # a softmax's sums over its classes, in float32


def decision_outputs(
    names: Sequence[str], outputs: Sequence[Sequence[np.ndarray]]
) -> dict[str, int | None]:
    """The outputs that hold a sequence of decisions per sample, with their CTC blank class
    or None: class probabilities (in [0, 1], summing to 1 over the last axis; or their
    logarithms) at MIN_STEPS or more positions per sample in every feed. A classifier's one
    decision per sample is not among them: 16 agreeing samples say little of a flip rate
    (Magika kept all 16 and lost 1.5% of 2048 files). A sequence (samples, steps, classes)
    has a CTC blank where FP32's most frequent top class fills half the steps or more and sits
    between two other classes in most samples (PP-OCR's recognizers: class 0, at 58-71% of the
    steps of 16 lines); it is then read as CTC reads it (repeats merged, blanks dropped), where
    a character's step moving by one changes nothing. An attention decoder's padding
    (SLANet's) only trails its tokens, so its steps are compared one by one, as a segmenter's
    pixels are."""
    found: dict[str, int | None] = {}
    for i, name in enumerate(names):
        arrays = [np.asarray(feed[i]) for feed in outputs]
        if all(_steps(a) >= MIN_STEPS and _distribution(a) for a in arrays):
            found[name] = _ctc_blank(arrays)
    return found


def _ctc_blank(arrays: list[np.ndarray]) -> int | None:
    """The CTC blank of FP32's class sequences `arrays` (`decision_outputs`), or None."""
    if any(a.ndim != 3 for a in arrays):
        return None
    tops = [row for a in arrays for row in a.argmax(-1)]
    classes, counts = np.unique(np.concatenate(tops), return_counts=True)
    if counts.max() * 2 < sum(len(row) for row in tops):
        return None
    blank = int(classes[counts.argmax()])
    between = sum(_inside(row != blank) for row in tops)
    return blank if between * 2 > len(tops) else None


def _inside(read: np.ndarray) -> bool:
    """Whether a blank (False) lies between two other classes (True) in one sample's steps."""
    marked = np.flatnonzero(read)
    return len(marked) >= 2 and not read[marked[0] : marked[-1] + 1].all()


def _steps(output: np.ndarray) -> int:
    """Positions per sample of an output whose last axis holds classes (axis 0: samples)."""
    return int(np.prod(output.shape[1:-1])) if output.ndim >= 3 and output.shape[-1] > 1 else 0


def _distribution(output: np.ndarray) -> bool:
    """Whether `output` holds class probabilities over its last axis, or their logarithms
    (a CTC speech model's log-softmax)."""
    values = output.astype(np.float64)
    if np.all(values <= 0) and not np.all(values == 0):
        values = np.exp(values)
    in_unit = bool(np.all((values >= 0) & (values <= 1)))
    return in_unit and bool(np.allclose(values.sum(-1), 1.0, atol=DISTRIBUTION_ATOL))


def read_alike(want: np.ndarray, have: np.ndarray, blank: int | None) -> bool:
    """Whether every sample's decisions are FP32's: its top classes at every position, or
    with a CTC `blank`, the sequence CTC reads from them."""
    if want.shape != have.shape:
        return False
    tops = [np.argmax(a, -1).reshape(len(a), -1) for a in (want, have)]
    if blank is None:
        return bool(np.array_equal(*tops))
    return all(_ctc(a, blank) == _ctc(b, blank) for a, b in zip(*tops, strict=True))


@dataclass
class Readings:
    """Of the samples seen so far, how many a decision output reads as FP32 does
    (`read_alike`, sample by sample): what the report says of a recognizer, beside its SQNR."""

    blank: int | None  # the CTC blank class, or None: compared position by position
    alike: int = 0
    samples: int = 0
    same_positions: int = 0  # without a blank: positions whose class is FP32's, of `positions`
    positions: int = 0

    def update(self, want: np.ndarray, have: np.ndarray) -> None:
        """Add a batch of FP32's output and of the approximation's (axis 0: samples)."""
        for i in range(len(want)):
            self.alike += read_alike(want[i : i + 1], have[i : i + 1], self.blank)
        self.samples += len(want)
        if self.blank is None and want.shape == have.shape:
            self.same_positions += int((want.argmax(-1) == have.argmax(-1)).sum())
            self.positions += want[..., 0].size

    def merged(self, other: Readings) -> Readings:
        """Two shards of the same output's counts together."""
        return Readings(
            self.blank,
            self.alike + other.alike,
            self.samples + other.samples,
            self.same_positions + other.same_positions,
            self.positions + other.positions,
        )

    @property
    def share(self) -> float | None:
        """The share of samples read alike, None before any."""
        return self.alike / self.samples if self.samples else None

    def as_text(self) -> str:
        """'CTC reading as FP32's on 15 of 16 samples', or for classes compared position by
        position (a segmenter's pixels), also the share of positions alike."""
        if self.blank is not None:
            return f"CTC reading as FP32's on {self.alike} of {self.samples} samples"
        text = f"every position's class as FP32's on {self.alike} of {self.samples} samples"
        return text + (
            f" ({self.same_positions / self.positions:.2%} of positions)" if self.positions else ""
        )


def _ctc(steps: np.ndarray, blank: int) -> list[int]:
    """The classes CTC reads from one sample's top class per step."""
    merged = steps[np.concatenate([[True], steps[1:] != steps[:-1]])]
    return merged[merged != blank].tolist()
