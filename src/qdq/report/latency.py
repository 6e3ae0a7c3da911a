"""The two models' latencies that `qdq compare` reports: one sample a call, and a batch (or a
sequence's run of steps) where the model takes one."""

from __future__ import annotations

import os

import numpy as np
import onnx

from qdq.data import Samples
from qdq.errors import DataError
from qdq.onnx.sessions import median_latency_ms
from qdq.plan.timing import timing_feed

# Latency at a batch too, where the model takes one: as many samples (up to the evaluation's
# batch size) as the slower model runs in about BATCH_RUN_MS one by one, and not below
# LEAST_BATCH (a few samples say little of throughput); the rounds stop after BATCH_BUDGET_S.
BATCH_RUN_MS = 100.0
LEAST_BATCH = 4
BATCH_BUDGET_S = 2.0


def latency_ratio(
    float_path: str | os.PathLike[str],
    quantized_path: str | os.PathLike[str],
    feed: dict[str, np.ndarray],
    runs: int,
) -> tuple[float, float] | None:
    """Median single-threaded latency of each model in ms, runs interleaved."""
    if runs <= 0:
        return None
    first, second = median_latency_ms([str(float_path), str(quantized_path)], feed, runs)
    return first, second


def batch_latency(
    float_path: str | os.PathLike[str],
    quantized_path: str | os.PathLike[str],
    reference: onnx.ModelProto,
    samples: Samples,
    batch_size: int,
    one: tuple[float, float] | None,
    runs: int,
) -> tuple[tuple[int, float, float] | None, bool]:
    """((samples, ms per run of each model), whether they were one sequence's steps) on a batch
    of the leading samples, where the model takes one: int8's gain at batch 1 can be a fraction
    of its gain at a batch (the digits CNN: 1.05x FP32's time one by one, 0.7x at 16), and
    deployments batch. The batch is what the slower model runs in about BATCH_RUN_MS one by one
    (`one`: the batch-1 latencies), at most `batch_size`. A model whose batch axis is fixed at
    1 beside a free one takes its samples as one sequence (Silero VAD's frames, `timing_feed`,
    as the frontier times it): timed on that run. No times where the batch would be under
    LEAST_BATCH, untimed (`runs` 0), or where the samples do not stack into a batch or ONNX
    Runtime does not run one."""
    if one is None or runs <= 0:
        return None, False
    try:  # where the samples or the model take no batch: batch 1 alone
        feed, count = timing_feed(reference, samples)
        sequence = count > 1
        if not sequence:
            size = min(batch_size, samples.count, int(BATCH_RUN_MS / max(*one, 1e-3)))
            if size < LEAST_BATCH:
                return None, False
            feed = next(samples.batches(size))
            count = samples.held_in(feed)
        if count < LEAST_BATCH:  # the model's batch axis is fixed at 1
            return None, False
        paths = [str(float_path), str(quantized_path)]
        first, second = median_latency_ms(paths, feed, runs, BATCH_BUDGET_S)
    except DataError:  # samples that do not stack
        return None, False
    except Exception as error:  # a model that runs no batch, in ONNX Runtime's own types
        if not type(error).__module__.startswith("onnxruntime"):
            raise
        return None, False
    return (count, first, second), sequence
