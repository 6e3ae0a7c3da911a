"""Running statistics over the calibration samples, kept beside the observers in the same pass:
each tensor's mean and largest sample (bias correction, pair-safe weights), and each layer's
means per channel sample by sample (the sequential bias correction)."""

from __future__ import annotations

import numpy as np

# Lone samples (a batch-1 model's) summed in their own dtype before they join the float64
# total, as a batch of this many is: adding each to the float64 total ran at memory speed, 7x
# a float32 add, and took 11 of the layout model's 120 thread-seconds of calibration.
PENDING = 16


class SampleStats:
    """Running mean and maximum over the batch axis: the expected value of one sample, element
    by element (for bias correction), and its largest (for weights that int8 kernels without
    VNNI must not saturate, `qdq.plan.saturation`)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.top: np.ndarray | None = None
        self.count = 0
        self.ragged = False  # samples of different shapes (dynamic axes): no single mean
        self.pending: np.ndarray | None = None  # the latest lone samples' sum, not yet in total
        self.waiting = 0  # how many samples `pending` holds

    def update(self, batch: np.ndarray) -> None:
        shape = self.top.shape if self.top is not None else batch.shape[1:]
        if shape != batch.shape[1:]:
            self.ragged = True
        if self.ragged:
            return
        # A batch is summed in its own dtype (float32: 3.6x faster than in float64; a batch is
        # a few dozen samples), lone samples (a batch-1 model's) in groups of PENDING, and the
        # sums join a float64 total in place (temporaries per sample had been a fifth of
        # calibration's work on ddddocr's detector).
        if len(batch) == 1:
            if self.pending is None:
                # float16 at least as float32: 16 samples of 5000 overflow float16
                self.pending = batch[0].astype(np.promote_types(batch.dtype, np.float32))
            else:
                np.add(self.pending, batch[0], out=self.pending)
            self.waiting += 1
            if self.waiting == PENDING:
                self._settle()
        else:
            self._settle()  # float16 summed as float32, as the lone samples are
            self._add(batch.sum(axis=0, dtype=np.promote_types(batch.dtype, np.float32)))
        largest = batch[0] if len(batch) == 1 else batch.max(axis=0)
        if self.top is None:
            self.top = largest.copy()
        else:
            np.maximum(self.top, largest, out=self.top)
        self.count += len(batch)

    def _add(self, batch_sum: np.ndarray) -> None:
        if self.total is None:
            self.total = batch_sum.astype(np.float64)
        else:
            np.add(self.total, batch_sum, out=self.total)

    def _settle(self) -> None:
        """Move the pending lone samples' sum into the float64 total."""
        if self.pending is not None:
            self._add(self.pending)
            self.pending, self.waiting = None, 0

    def merge(self, other: SampleStats) -> None:
        """Add the samples another shard saw."""
        self._settle()
        other._settle()
        if other.ragged or (self.total is not None and other.total is not None
                            and self.total.shape != other.total.shape):  # fmt: skip
            self.ragged = True
        if self.ragged or other.total is None:
            return
        self.total = other.total.copy() if self.total is None else self.total + other.total
        self.top = other.top.copy() if self.top is None else np.maximum(self.top, other.top)
        self.count += other.count

    @property
    def mean(self) -> np.ndarray | None:
        self._settle()
        return None if self.ragged or self.total is None else self.total / self.count

    @property
    def peak(self) -> np.ndarray | None:
        return None if self.ragged else self.top


class ChannelMeans:
    """Each sample's mean per channel (axis 1) of a tensor, for the first `limit` samples of a
    stream: the float network's layer means that the sequential bias correction compares its
    int8 network with, taken in the calibration pass instead of a second float pass. A tensor
    whose leading axis is not the samples' (a transformer's Gemm reads (samples x tokens,
    features)) has none: rows taken as samples there had given the digits transformer's
    attention projections another batch's means, and its output 16.7 dB instead of 42.3."""

    def __init__(self, limit: int) -> None:
        self.missing = max(limit, 0)  # samples still to take
        self.rows: list[np.ndarray] = []
        self.sample_bytes = 0  # one sample of the tensor, to size the correction's batches
        self.unaligned = False  # axis 0 was not the samples in some batch

    def update(self, batch: np.ndarray, samples: int) -> None:
        """Take `batch`, the tensor for `samples` samples. Of one sample, whatever its leading
        axis holds (an LSTM's steps), the tensor is that sample's: its mean over every axis but
        1 is the mean the correction measures on it, as batch-1 models run it (ddddocr's had
        run its float network again for its Gemm after the LSTM, 3.5 s of 28)."""
        per_sample = batch.nbytes // max(samples, 1)
        if samples == 1 and batch.ndim >= 2 and len(batch) != 1:
            batch = batch.mean(axis=0, keepdims=True)
        if len(batch) != samples:
            self.unaligned, self.missing = True, 0
        if self.unaligned:
            return
        self.sample_bytes = per_sample
        take = min(len(batch), self.missing)
        if take > 0:
            self.rows.append(batch[:take].mean(axis=tuple(range(2, batch.ndim))))
            self.missing -= take

    def merge(self, other: ChannelMeans) -> None:
        """The next shard's samples after this one's."""
        self.rows.extend(other.rows)
        self.sample_bytes = self.sample_bytes or other.sample_bytes
        self.unaligned = self.unaligned or other.unaligned

    @property
    def values(self) -> np.ndarray | None:
        """(samples, channels), or None where the samples' channel counts differ or axis 0 was
        not the samples."""
        if self.unaligned or not self.rows or len({r.shape[1:] for r in self.rows}) > 1:
            return None
        return np.concatenate(self.rows)
