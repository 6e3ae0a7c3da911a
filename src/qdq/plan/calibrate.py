"""Stream activations out of ONNX Runtime into observers, one batch at a time.

Nothing keeps raw activations: each batch's tensors go into their observers and are dropped, so
peak memory depends on the batch size, not on the number of samples (two batches' tensors at
most: ONNX Runtime runs the next batch while the observers take this one).
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import onnx
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from qdq.data import Samples
from qdq.errors import DataError
from qdq.observers import Observer
from qdq.onnx.sessions import Use, fails_on_data, session_with_outputs
from qdq.plan.sample_stats import ChannelMeans, SampleStats
from qdq.qparams import Range
from qdq.workers import ONE_PROCESS, Workers, session_threads

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")

# Values this large are masks or sentinels (-3.4e38 "minus infinity"), never signal to quantize.
SENTINEL = 1e30
# Captured tensors of one batch stay under this: PP-OCRv4's recognizer yields 139 MB of
# activations per sample, so a fixed batch of 16 peaked at 5.7 GB.
CAPTURE_BUDGET = 256 * 2**20
# Samples per calibration shard: a fixed number, so that the shards (and the merged result)
# depend on the data alone, whether one process observes them or many workers. Large enough
# that a shard's merge costs little next to its batches.
SHARD_SAMPLES = 256
# Shards handed to the workers at once, at most, and per worker: their states (observers, and
# a sample's sums for each tensor bias correction reads) wait in the driver to be merged in
# order, so this bounds its memory: 16 shards at once had held 10 MB each on a small conv net
# with two workers, 140 MB more than one (the merged result is the same whatever the window).
WINDOW_SHARDS = 16
WINDOW_PER_WORKER = 2


class Tap(Protocol):
    """Something else fed from the calibration pass, instead of a pass of its own: `inputs` by
    name, on the stream's samples until `missing` runs out (GPTQ's H on the first samples,
    `qdq.passes.gptq.HessianSums`; FP32's outputs on those candidates are scored on,
    `qdq.plan.reference.TakenOutputs`)."""

    inputs: list[str]
    missing: int  # samples still to come that it may want

    def after(self, first: int) -> Tap:
        """An empty one for the stream's samples from `first` on (a later shard)."""

    def jobs(self, values: Mapping[str, np.ndarray], samples: int) -> list[Callable[[], None]]:
        """The work of taking a batch of `samples` samples (`inputs` by name in `values`), as
        jobs that may run at once, each beside the observers' updates."""

    def merge(self, other: Tap) -> None:
        """Add what a later shard took."""


def budgeted(batch_size: int, per_sample: int, budget: int = CAPTURE_BUDGET) -> int:
    """The batch size, lowered so that one batch captures at most `budget` bytes when each
    sample captures `per_sample`."""
    return max(1, min(batch_size, budget // max(per_sample, 1)))


def observe(
    model: onnx.ModelProto,
    samples: Samples,
    make: Callable[[str], Observer],
    names: list[str],
    batch_size: int,
    progress: bool = True,
    means: Iterable[str] = (),
    workers: Workers = ONE_PROCESS,
    channels: Iterable[str] = (),
    limit: int = 0,
    taps: Sequence[Tap] = (),
) -> tuple[dict[str, Observer], dict[str, str], dict[str, SampleStats], dict[str, ChannelMeans]]:
    """One pass over the data, before any range is computed: each fit tensor's merged observer
    (whose histogram can give more than one method's range; `fit_ranges` turns them into
    ranges), the tensors found unfit for int8 with the reason, the mean and largest sample of
    each tensor in `means` (for bias correction and pair-safe weights), and the means per
    channel of each tensor in `channels` on the first `limit` samples (for the sequential
    correction). Each of `taps` takes its inputs on its first samples (`Tap`).

    Unfit tensors are found without an extra pass over the data: an observer refuses NaN and
    Inf, and a final range beyond SENTINEL marks a mask. Shards of SHARD_SAMPLES samples are
    observed apart (on `workers` when parallel) and merged in sample order, so the result
    depends on the data alone, not on how many workers there are or when each finished."""
    if not names:  # nothing to observe (ONNX Runtime would return every output instead)
        return {}, {}, {}, {}
    job = _Job(model, samples, {name: make(name) for name in names},
               [m for m in means if m in names], batch_size, list(dict.fromkeys(channels)),
               limit, tuple(taps))  # fmt: skip
    spans = [
        (first, min(first + SHARD_SAMPLES, samples.count))
        for first in range(0, samples.count, SHARD_SAMPLES)
    ]
    if workers.parallel:  # a window of shards at a time: memory stays flat in the samples
        window = min(WINDOW_SHARDS, WINDOW_PER_WORKER * workers.width)
        with workers.pool(_open, _observe, job) as pool:  # the same workers for every window
            seen = _merged(
                shard
                for start in range(0, len(spans), window)
                for shard in pool.map(spans[start : start + window])
            )
    else:  # in this process, with its session and data handles
        opened = _open(job, reopen=False)
        with tqdm(total=samples.count, desc="calibrating", unit="sample",
                  disable=not progress, leave=False) as bar:  # fmt: skip
            seen = _merged(_observe(opened, span, bar) for span in spans)
    for tap, taken in zip(taps, seen.taps, strict=True):
        tap.merge(taken)
    fit = {n: o for n, o in seen.observers.items() if n not in seen.unfit}
    averages = seen.averages.items()
    found = {n: a for n, a in averages if a.mean is not None and n not in seen.unfit}
    return fit, seen.unfit, found, seen.channels


def observe_holding(
    model: onnx.ModelProto,
    samples: Samples,
    make: Callable[[str], Observer],
    names: list[str],
    batch_size: int,
    held: int,
    progress: bool = True,
    means: Iterable[str] = (),
    workers: Workers = ONE_PROCESS,
    channels: Iterable[str] = (),
    limit: int = 0,
    taps: Sequence[Tap] = (),
) -> tuple[
    dict[str, Observer],
    dict[str, Observer],
    dict[str, str],
    dict[str, SampleStats],
    dict[str, ChannelMeans],
]:
    """`observe` on all `samples`, and also the observers of all but the last `held` of them:
    ranges fitted without those samples can be judged on them fairly (ranges scored on the
    samples they were fitted to favour MinMax, docs/ptq.md). Still one pass over the data.
    Last, each of `channels`' means per channel on the first `limit` samples (and each of
    `taps`' inputs on its first samples)."""
    channels = list(channels)
    if not held:
        observers, unfit, found, per_channel = observe(
            model, samples, make, names, batch_size, progress, means, workers, channels, limit,
            taps,
        )  # fmt: skip
        return observers, observers, unfit, found, per_channel
    split = samples.count - held
    rest = (batch_size, progress, means, workers, channels)
    fitted, unfit, found, per_channel = observe(
        model, samples.span(0, split), make, names, *rest, limit, taps
    )
    # The held samples continue each fitted observer's stream (not a merge, which re-bins).
    fit = [name for name in names if name in fitted]
    resume = lambda name: copy.deepcopy(fitted[name])  # noqa: E731
    later = [tap.after(split) for tap in taps]
    every, unfit_last, found_last, per_channel_last = observe(
        model, samples.span(split, samples.count), resume, fit, *rest, limit - split, later
    )
    for tap, taken in zip(taps, later, strict=True):
        tap.merge(taken)
    for name, later in per_channel_last.items():
        if name in per_channel:
            per_channel[name].merge(later)
    unfit = {**unfit_last, **unfit}
    for name, average in found.items():
        average.merge(found_last.get(name, SampleStats()))
    means_all = {n: a for n, a in found.items() if n in found_last and a.mean is not None}
    every = {n: o for n, o in every.items() if n not in unfit}
    apart = {n: o for n, o in fitted.items() if n in every}
    return every, apart, unfit, means_all, per_channel


def fit_ranges(
    ranges: dict[str, Range], unfit: dict[str, str]
) -> tuple[dict[str, Range], dict[str, str]]:
    """The ranges fit for int8, and the unfit tensors: those given, and those whose range
    reaches SENTINEL (a mask)."""
    fit, unfit = {}, dict(unfit)
    for name, rng in ranges.items():
        magnitude = float(np.max(np.maximum(-rng.lo, rng.hi)))
        if magnitude >= SENTINEL:
            unfit[name] = f"holds sentinel values up to {magnitude:.3g} (a mask?)"
        else:
            fit[name] = rng
    return fit, unfit


@dataclass(frozen=True)
class _Job:
    """What every shard needs: sent once per worker."""

    model: onnx.ModelProto
    samples: Samples
    observers: dict[str, Observer]  # fresh, one per tensor: each shard observes into a copy
    means: list[str]
    batch_size: int
    channels: list[str]
    limit: int  # the samples whose means per channel are kept
    taps: tuple[Tap, ...]  # empty: each shard takes its own from each (`Tap.after`)


_Opened = tuple[_Job, "InferenceSession", Samples]


@dataclass
class _Seen:
    """One shard's observers, running means, means per channel, taps and unfit tensors
    (with the reason)."""

    observers: dict[str, Observer]
    averages: dict[str, SampleStats]
    unfit: dict[str, str]
    channels: dict[str, ChannelMeans]
    taps: list[Tap]


def _open(job: _Job, reopen: bool = True) -> _Opened:
    """A worker's session, and its own handles on the data (a forked file offset is shared)."""
    samples = pickle.loads(pickle.dumps(job.samples)) if reopen else job.samples
    return job, session_with_outputs(job.model, _fetched(job), use=Use.OBSERVING), samples


def _fetched(job: _Job) -> list[str]:
    """The tensors a shard's session outputs: the observed ones, then the other `channels` and
    the taps' inputs."""
    tapped = [name for tap in job.taps for name in tap.inputs]
    return list(dict.fromkeys([*job.observers, *job.channels, *tapped]))


def _observe(opened: _Opened, span: tuple[int, int], bar: tqdm | None = None) -> _Seen:
    """Samples `span` (first, last) through the observers: its first sample alone, to size the
    batches under CAPTURE_BUDGET, then the rest in batches (counted on `bar`, if given)."""
    job, session, samples = opened
    names = _fetched(job)
    first, last = span
    seen = _Seen(copy.deepcopy(job.observers), {n: SampleStats() for n in job.means}, {},
                 {n: ChannelMeans(job.limit - first) for n in job.channels},
                 [tap.after(first) for tap in job.taps])  # fmt: skip

    def fetched(name: str) -> bool:
        """Whether a batch still needs `name`: observed, or its means per channel or a tap's
        samples not yet taken."""
        if name in seen.observers:
            return True
        if name in seen.channels and seen.channels[name].missing:
            return True
        return any(name in tap.inputs and tap.missing > 0 for tap in seen.taps)

    def update(name: str, value: np.ndarray, count: int) -> str | None:
        """One tensor's batch of `count` samples into its observer; why the tensor is unfit,
        if it is."""
        if name in seen.channels:
            seen.channels[name].update(value, count)
        if name not in seen.observers:
            return None
        if value.size == 0:
            return "is empty"
        try:
            seen.observers[name].update(value)
        except DataError:
            return "holds NaN or Inf (a mask?)"
        if name in seen.averages:
            seen.averages[name].update(value)
        return None

    def captured(feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """The batch's tensors still needed, by name, and its sample count. A tensor fetched
        only for its means per channel or H, once taken, is not fetched again."""
        run = [n for n in names if fetched(n)]
        with fails_on_data("the float model on the calibration samples"):
            values = session.run(run, feed)
        return dict(zip(run, values, strict=True)), samples.held_in(feed)

    def observe(values: dict[str, np.ndarray], count: int) -> int:
        """Feed one batch's tensors to their observers, in parallel (each observer still sees
        its batches in order, so the result does not depend on the threads); returns the bytes
        captured."""
        live = [n for n in values if n not in seen.unfit]
        live = [n for n in live if n in seen.observers or n in seen.channels]  # not the tap's alone
        taking = [tap.jobs(values, count) for tap in seen.taps if tap.missing > 0]
        tapping = [pool.submit(job) for jobs in taking for job in jobs]
        batches = pool.map(update, live, map(values.get, live), [count] * len(live))
        for name, reason in zip(live, batches, strict=True):
            if reason:
                seen.unfit[name] = reason
        for job in tapping:
            job.result()
        if bar is not None:
            bar.update(count)
        return sum(v.nbytes for v in values.values())

    # One BLAS thread while ONNX Runtime's threads and the pool's fill the cores: OpenBLAS's own
    # threads spin between GPTQ's products and slowed ONNX Runtime's runs (ddddocr's detector's
    # calibration 19.0 -> 15.6 s, docs/ptq.md).
    threads = session_threads() or os.cpu_count() or 1
    with (
        threadpool_limits(limits=1, user_api="blas"),
        ThreadPoolExecutor(threads) as pool,
        ThreadPoolExecutor(1) as runner,
    ):
        per_sample = observe(*captured(next(samples.batches(1, first=first))))
        batch_size = budgeted(job.batch_size, per_sample)
        feeds = samples.batches(batch_size, first=first + 1, last=last)
        for values, count in _one_ahead(runner, captured, feeds):
            observe(values, count)
    return seen


def _one_ahead(
    runner: ThreadPoolExecutor, function: Callable[[T], R], items: Iterable[T]
) -> Iterator[R]:
    """`function` of each item in order, the next one computed on `runner` while the caller
    uses this one: ONNX Runtime runs a batch while the observers take the one before (ddddocr's
    detector's calibration 9.3-10.4 -> 8.1-8.9 s at 128 samples; its threads, which no longer
    spin, and the observers' share the cores)."""
    pending = None
    for item in items:
        ahead = runner.submit(function, item)
        if pending is not None:
            yield pending.result()
        pending = ahead
    if pending is not None:
        yield pending.result()


def _merged(shards: Iterable[_Seen]) -> _Seen:
    """The shards merged in sample order, each as it comes (only the running state and one
    shard are kept): a tensor unfit in any shard is unfit (the first shard's reason), and the
    others' observers and means merge."""
    shards = iter(shards)
    merged = next(shards)
    for shard in shards:
        for name, reason in shard.unfit.items():
            merged.unfit.setdefault(name, reason)
        for name, observer in merged.observers.items():
            if name not in merged.unfit:
                observer.merge(shard.observers[name])
        for name, average in merged.averages.items():
            average.merge(shard.averages[name])
        for name, means in merged.channels.items():
            means.merge(shard.channels[name])
        for tap, taken in zip(merged.taps, shard.taps, strict=True):
            tap.merge(taken)
    return merged


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
