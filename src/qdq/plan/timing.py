"""What the frontier's candidates and the accuracy budget's price are timed on: one calibration
sample, or a run of them where the model takes its samples as one sequence."""

from __future__ import annotations

import numpy as np
import onnx

from qdq.data import Samples
from qdq.onnx.sessions import Use, open_session

TIMING_STEPS = 128  # of a sequence the model takes in one call, timed together
TIMING_BYTES = 16 << 20  # and no more of its input than this (Silero: 128 frames in 0.3 MB)


def timing_feed(model: onnx.ModelProto, samples: Samples) -> tuple[dict[str, np.ndarray], int]:
    """The feed the frontier's candidates and the budget's price are timed on, and how many
    samples it holds: the first sample (the budget timed a batch before: a serial tail of
    seconds on two workers, docs/ptq.md), or the first TIMING_STEPS of a sequence the model
    takes in one call (`Samples.sequence`). Silero VAD's frames, timed one a call, put all
    int8 at 0.73x FP32's time and its STFT convolution float at 0.85x, so balanced kept that
    convolution float; a 4 s clip (125 frames) runs them at 0.24x and 0.57x. A model that
    refuses the joined feed is timed on the first sample."""
    feed, count = samples.sequence(TIMING_STEPS, TIMING_BYTES)
    if count > 1:
        try:
            open_session(model, Use.LATENCY).run(None, feed)
        except Exception as error:  # a shape the joined axis breaks, in ONNX Runtime's types
            if not type(error).__module__.startswith("onnxruntime"):
                raise
            return next(samples.batches(1)), 1
    return feed, count
