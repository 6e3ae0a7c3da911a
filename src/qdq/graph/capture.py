"""Stream activations out of ONNX Runtime into observers, one batch at a time.

Nothing keeps raw activations: each batch's tensors go into their observers and are dropped, so
peak memory depends on the batch size, not on the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from qdq.graph.data import Samples
from qdq.observers import Observer

log = logging.getLogger(__name__)

# Values this large are masks or sentinels (-3.4e38 "minus infinity"), never signal to quantize.
SENTINEL = 1e30


def session_with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> ort.InferenceSession:
    """A CPU session whose outputs are the model's own followed by `names`."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        extended.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def calibrate(
    model: onnx.ModelProto,
    samples: Samples,
    make: Callable[[str], Observer],
    names: list[str],
    batch_size: int,
    progress: bool = True,
) -> tuple[dict[str, Observer], dict[str, str]]:
    """Observers fed with every batch of `names`; tensors found unfit, with the reason."""
    session = session_with_outputs(model, names)
    observers = {name: make(name) for name in names}
    unfit: dict[str, str] = {}
    total = -(-samples.count // batch_size)
    for feed in tqdm(
        samples.batches(batch_size),
        total=total,
        desc="calibrating",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        values = session.run(names, feed)
        for name, value in zip(names, values, strict=True):
            if name in unfit:
                continue
            reason = unfit_reason(value)
            if reason:
                unfit[name] = reason
                continue
            observers[name].update(value)
    return {n: o for n, o in observers.items() if n not in unfit}, unfit


def unfit_reason(value: np.ndarray) -> str | None:
    """Why a tensor must stay in float (non-finite or sentinel values), or None."""
    if value.size == 0:
        return "is empty"
    lo, hi = float(np.min(value)), float(np.max(value))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "holds NaN or Inf (a mask?)"
    if max(-lo, hi) >= SENTINEL:
        return f"holds sentinel values up to {max(-lo, hi):.3g} (a mask?)"
    return None
