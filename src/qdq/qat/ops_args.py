"""What every ONNX op function in `qdq.qat.ops.OPS` takes, and the readers they share.

An op function gets the node's inputs as torch tensors (`Value`, None for an absent optional
input) and its attributes (`Attrs`); `as_ints`, `input_or_none` and `axes_of` read the inputs
that carry shapes, optional values and axes. Kept apart so each op family's module imports one small
module, not the registry; `TORCH_DTYPES` is here as `QdqGraph` makes its constants with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Value = torch.Tensor | None
Attrs = dict[str, object]


def as_ints(t: Value) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()] if t is not None else []


def input_or_none(inputs: Sequence[Value], i: int) -> Value:
    return inputs[i] if len(inputs) > i else None


def axes_of(inputs: Sequence[Value], attrs: Attrs, i: int = 1) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as input `i` (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    given = input_or_none(inputs, i)
    return as_ints(given) if given is not None else None


TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float32,  # trained in float32 throughout
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
}
