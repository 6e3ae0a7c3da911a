"""FP32's outputs that candidate plans are scored against: run for the purpose, or kept from
calibration's runs, whose session runs the model's whole graph anyway (`TakenOutputs`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from qdq.data import Samples
from qdq.onnx.sessions import fails_on_data, open_session, run_named


@dataclass(frozen=True)
class Reference:
    """FP32's float outputs on the feeds candidates are scored on: computed once for every
    scorer of those feeds (the range method's choice and the checks after it score on the
    same held-out samples). `counts`: the samples each feed holds (`Samples.held_in`: one
    where an input's leading axis is not a batch)."""

    feeds: list[dict]
    names: list[str]
    outputs: list[list[np.ndarray]]
    counts: list[int]


def float_reference(model: onnx.ModelProto, feeds: list[dict], counts: list[int]) -> Reference:
    """`model`'s float outputs on `feeds`, as copies: an array ONNX Runtime returns holds its
    session's whole memory arena while it lives (PP-OCRv4's detector: a 6 MB output kept 225 MB
    after the session was gone; scratch `/work/notes/r72/arena.py`)."""
    session = open_session(model)
    names = [o.name for o in session.get_outputs() if o.type == "tensor(float)"]
    with fails_on_data("the float model on the calibration samples"):
        outputs = [[o.copy() for o in run_named(session, names, feed)] for feed in feeds]
    return Reference(feeds, names, outputs, counts)


class TakenOutputs:
    """A calibration `Tap` (`qdq.plan.calibrate`) keeping the model's float outputs on the
    samples `wanted` (by position in the calibration stream), from which `reference` builds
    the references of those samples without running the model again: a batch-1 model runs
    each sample alone, so the held-out reference and the frontier's cost ddddocr's detector
    48 runs (0.8 s) of their own. A sample's outputs are taken as not depending on the other
    samples of its batch (calibration batches them otherwise than the references do); where
    their shapes do (detections padded to the batch's most), the model runs again."""

    def __init__(self, names: list[str], wanted: Iterable[int], start: int = 0) -> None:
        self.wanted = sorted(set(wanted))
        self.inputs = names if self.wanted else []  # the model's float outputs, if any wanted
        self.start = self.next = start  # the stream's first sample, and the next one to come
        self.taken: dict[int, list[np.ndarray]] = {}
        self.whole = True  # False once a batch's outputs did not lead with its samples

    @property
    def missing(self) -> int:
        """Samples still to come up to the last wanted one."""
        return max(0, self.wanted[-1] + 1 - self.next) if self.wanted else 0

    def after(self, first: int) -> TakenOutputs:
        """An empty one for the stream's samples from `first` on (a later shard)."""
        return TakenOutputs(self.inputs, self.wanted, self.start + first)

    def jobs(self, values: Mapping[str, np.ndarray], samples: int) -> list[Callable[[], None]]:
        """Keeps copies of the batch's wanted samples' outputs, here rather than as jobs for
        the pool (a few samples' outputs, against every observed tensor's)."""
        first, self.next = self.next, self.next + samples
        wanted = [i for i in self.wanted if first <= i < self.next]
        outputs = [values[name] for name in self.inputs]
        # copies, as `float_reference` keeps (kept as returned, two of them took PP-OCRv4's
        # detector's peak from 1.7 to 2.9 GB)
        if samples == 1:
            self.taken.update((i, [o.copy() for o in outputs]) for i in wanted)
        elif all(o.ndim and len(o) == samples for o in outputs):
            for i in wanted:
                self.taken[i] = [o[i - first : i - first + 1].copy() for o in outputs]
        elif wanted:
            self.whole = False
        return []

    def merge(self, other: TakenOutputs) -> None:
        """Add what a later shard took."""
        self.taken.update(other.taken)
        self.whole = self.whole and other.whole

    def reference(
        self, model: onnx.ModelProto, samples: Samples, first: int, feeds: list[dict]
    ) -> Reference:
        """FP32's outputs on `feeds`, consecutive batches of `samples` from sample `first` on:
        as taken, or where they were not, from `model` (`float_reference`); a batch's outputs
        that do not lead with its samples cannot be split, nor joined again. The rows used are
        dropped: the references hold their own copies (each sample is in one reference but
        where the samples are so few that the frontier's and the held-out ones meet; the second
        then runs the model)."""
        outputs, counts = [], [samples.held_in(feed) for feed in feeds]
        for count in counts:
            rows = [self.taken.pop(i, None) for i in range(first, first + count)]
            if not self.whole or any(row is None for row in rows):
                return float_reference(model, feeds, counts)
            if count > 1 and any(o.ndim == 0 or len(o) != 1 for row in rows for o in row):
                return float_reference(model, feeds, counts)  # a sample run alone, not led by it
            if count == 1:
                outputs.append(rows[0])
            else:
                try:
                    outputs.append([np.concatenate(o) for o in zip(*rows, strict=True)])
                except ValueError:  # shapes that depend on the batch: not to be joined
                    return float_reference(model, feeds, counts)
            first += count
        return Reference(feeds, self.inputs, outputs, counts)

    def last(
        self, model: onnx.ModelProto, samples: Samples, batch_size: int, count: int
    ) -> Reference:
        """`reference` on the last `count` of `samples`, in batches of `batch_size`."""
        first = samples.count - count
        feeds = list(samples.span(first, samples.count).batches(batch_size))
        return self.reference(model, samples, first, feeds)
