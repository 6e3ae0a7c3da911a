"""Stream activations out of ONNX Runtime into observers, one batch at a time.

Nothing keeps raw activations: each batch's tensors go into their observers and are dropped, so
peak memory depends on the batch size, not on the number of samples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from tqdm import tqdm

from qdq.data import Samples
from qdq.errors import DataError
from qdq.observers import Observer
from qdq.onnx.sessions import session_with_outputs
from qdq.qparams import Range

log = logging.getLogger(__name__)

# Values this large are masks or sentinels (-3.4e38 "minus infinity"), never signal to quantize.
SENTINEL = 1e30
# Captured tensors of one batch stay under this: PP-OCRv4's recognizer yields 139 MB of
# activations per sample, so a fixed batch of 16 peaked at 5.7 GB.
CAPTURE_BUDGET = 256 * 2**20


def budgeted(batch_size: int, per_sample: int, budget: int = CAPTURE_BUDGET) -> int:
    """The batch size, lowered so that one batch captures at most `budget` bytes when each
    sample captures `per_sample`."""
    return max(1, min(batch_size, budget // max(per_sample, 1)))


class SampleMean:
    """Running mean over the batch axis: the expected value of one sample, element by element."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0
        self.ragged = False  # samples of different shapes (dynamic axes): no single mean

    def update(self, batch: np.ndarray) -> None:
        if self.total is not None and self.total.shape != batch.shape[1:]:
            self.ragged = True
        if self.ragged:
            return
        # One batch summed in float32 (3.6x faster than in float64; a batch is a few dozen
        # samples), batches accumulated in float64.
        batch_sum = batch.sum(axis=0).astype(np.float64)
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.count += len(batch)

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.ragged or self.total is None else self.total / self.count


def calibrate(
    model: onnx.ModelProto,
    samples: Samples,
    make: Callable[[str], Observer],
    names: list[str],
    batch_size: int,
    progress: bool = True,
    means: Iterable[str] = (),
) -> tuple[dict[str, Range], dict[str, str], dict[str, np.ndarray]]:
    """The range of each tensor in `names` after every batch; the tensors found unfit for int8,
    with the reason; and the mean sample of each tensor in `means` (for bias correction).

    Unfit tensors are found without an extra pass over the data: an observer refuses NaN and
    Inf, and a final range beyond SENTINEL marks a mask."""
    if not names:  # nothing to observe (ONNX Runtime would return every output instead)
        return {}, {}, {}
    means = [m for m in means if m in names]
    session = session_with_outputs(model, names)
    observers = {name: make(name) for name in names}
    averages = {name: SampleMean() for name in means}
    unfit: dict[str, str] = {}

    def update(name: str, value: np.ndarray) -> str | None:
        """One tensor's batch into its observer; why the tensor is unfit, if it is."""
        if value.size == 0:
            return "is empty"
        try:
            observers[name].update(value)
        except DataError:
            return "holds NaN or Inf (a mask?)"
        if name in averages:
            averages[name].update(value)
        return None

    def observe(feed: dict[str, np.ndarray]) -> int:
        """Feed one batch's tensors to their observers, in parallel (each observer still sees
        its batches in order, so the result does not depend on the threads); returns the bytes
        captured."""
        values = dict(zip(names, session.run(names, feed), strict=True))
        live = [name for name in names if name not in unfit]
        for name, reason in zip(live, pool.map(update, live, map(values.get, live)), strict=True):
            if reason:
                unfit[name] = reason
        return sum(v.nbytes for v in values.values())

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        per_sample = observe(next(samples.batches(1)))  # one sample first, to size the batches
        batches = samples.batches(budgeted(batch_size, per_sample), first=1)
        with tqdm(total=samples.count, initial=1, desc="calibrating", unit="sample",
                  disable=not progress, leave=False) as bar:  # fmt: skip
            for feed in batches:
                observe(feed)
                bar.update(len(next(iter(feed.values()))))
    ranges = {}
    for name, observer in observers.items():
        if name in unfit:
            continue
        rng = observer.compute()
        magnitude = float(np.max(np.maximum(-rng.lo, rng.hi)))
        if magnitude >= SENTINEL:
            unfit[name] = f"holds sentinel values up to {magnitude:.3g} (a mask?)"
        else:
            ranges[name] = rng
    found = {n: a.mean for n, a in averages.items() if a.mean is not None and n not in unfit}
    return ranges, unfit, found


def unfit_reason(value: np.ndarray) -> str | None:
    """Why a constant must stay in float (non-finite or sentinel values), or None."""
    if value.size == 0:
        return "is empty"
    lo, hi = float(np.min(value)), float(np.max(value))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "holds NaN or Inf (a mask?)"
    if max(-lo, hi) >= SENTINEL:
        return f"holds sentinel values up to {max(-lo, hi):.3g} (a mask?)"
    return None
