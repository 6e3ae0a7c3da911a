"""Shape and data-movement ops as torch functions: reshapes, slices, gathers, Pad, Cast, the
shape arithmetic (Shape, ConstantOfShape, Expand, Range) and depth/space rearrangements. Integer
tensors carry shapes here, as ONNX's Shape, Gather and Concat of shapes do."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from onnx import helper, numpy_helper
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from qdq.errors import ModelError
from qdq.qat.ops_args import TORCH_DTYPES, Attrs, Value, as_ints, axes_of, input_or_none


def reshape(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, shape = inputs[0], as_ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def squeeze(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    axes = axes_of(inputs, attrs)
    x = inputs[0]
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.ndim for a in axes))


def unsqueeze(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    rank = x.ndim + len(axes_of(inputs, attrs))
    for a in sorted(a % rank for a in axes_of(inputs, attrs)):
        x = x.unsqueeze(a)
    return x


def slice_(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = as_ints(inputs[1]), as_ints(inputs[2])
        axes, steps = axes_of(inputs, {}, 3), input_or_none(inputs, 4)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = as_ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step == 0:
            raise ModelError("Slice with a step of 0 is not valid ONNX; re-export the model")
        if step > 0:
            index[axis] = slice(start, end, step)  # Python clamps as ONNX does
        else:  # torch slices only forward: pick the indices ONNX's clamping gives
            picked = _backward_range(start, end, step, x.shape[axis])
            x = x.index_select(axis, torch.tensor(picked, dtype=torch.long, device=x.device))
    return x[tuple(index)]


def _backward_range(start: int, end: int, step: int, size: int) -> list[int]:
    """Slice's indices for a negative step: start clamps to [0, size-1] and end to [-1, size-1]
    after negatives count from the back, so a huge negative end (torch's `flip`) reaches index 0."""
    start = min(max(start + size if start < 0 else start, 0), size - 1)
    end = min(max(end + size if end < 0 else end, -1), size - 1)
    return list(range(start, end, step))


def split(inputs: Sequence[Value], attrs: Attrs) -> tuple[torch.Tensor, ...]:
    """`outputs` (set when the graph is read): how many parts, where no sizes are given."""
    x, axis = inputs[0], attrs.get("axis", 0)
    sizes = attrs.get("split") or as_ints(input_or_none(inputs, 1))
    if not sizes:  # equal parts of ceil(n / parts), the last smaller, even empty
        step = -(-x.shape[axis] // attrs["outputs"])
        sizes = [max(0, min(step, x.shape[axis] - i * step)) for i in range(attrs["outputs"])]
    return torch.split(x, list(sizes), axis)


def gather(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, indices, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0) % inputs[0].ndim
    picked = x.index_select(axis, (indices % x.shape[axis]).reshape(-1))
    return picked.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])


def gather_elements(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, indices, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0) % inputs[0].ndim
    return x.gather(axis, indices % x.shape[axis])


def pad(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    pads = list(attrs["pads"]) if "pads" in attrs else as_ints(inputs[1])
    value = input_or_none(inputs, 2)
    value = float(value) if value is not None else attrs.get("value", 0.0)
    axes = axes_of(inputs, {}, 3) or list(range(x.ndim))
    n = len(axes)
    full = {a % x.ndim: (pads[i], pads[n + i]) for i, a in enumerate(axes)}
    torch_pads = [p for d in reversed(range(x.ndim)) for p in full.get(d, (0, 0))]
    mode = attrs.get("mode", b"constant")
    mode = {"edge": "replicate", "wrap": "circular"}.get(mode.decode(), mode.decode())
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    # torch pads the last k <= 3 axes of a tensor of k + 1 or k + 2 axes, as many as given
    kept = len(torch_pads) // 2
    while kept > 1 and torch_pads[2 * kept - 2 : 2 * kept] == [0, 0]:
        kept -= 1
    kept = max(kept, x.ndim - 2)
    if x.ndim - kept < 1 or kept > 3:
        raise ModelError(f"Pad {mode} of these axes of a {x.ndim}-axis tensor has no converter")
    return F.pad(x, torch_pads[: 2 * kept], mode=mode)


def flatten(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def shape(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    dims = list(inputs[0].shape)[attrs.get("start", 0) : attrs.get("end")]
    return torch.tensor(dims, dtype=torch.int64)


def cast(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """To the type's torch twin; float16 as its values rounded (training stays float32)."""
    to = np.dtype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if to == np.float16:
        return inputs[0].to(torch.float16).to(torch.float32)
    if to not in TORCH_DTYPES:
        raise ModelError(f"Cast to {to} has no converter")
    return inputs[0].to(TORCH_DTYPES[to])


def constant_of_shape(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    value = attrs.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value else torch.zeros(1)
    return fill.reshape(()).expand(as_ints(inputs[0])).clone()


def expand(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """ONNX's Expand broadcasts both ways: a 1 in the shape keeps the input's size."""
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(as_ints(inputs[1]))))


def range_(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    start, limit, delta = inputs
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def depth_to_space(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """DCR (default): depth holds (row, column, channel); CRD: (channel, row, column)."""
    x, b = inputs[0], attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", b"DCR") == b"CRD":
        y = x.reshape(n, c // b**2, b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, b, b, c // b**2, h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // b**2, h * b, w * b)


def space_to_depth(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, b = inputs[0], attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def scatter_nd(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """ScatterND without a reduction: a copy of the data with the slices `indices` name
    replaced by `updates` (Swin's shifted-window mask)."""
    data, indices, updates = inputs[:3]
    if attrs.get("reduction", b"none") != b"none":
        raise ModelError(f"ScatterND with reduction {attrs['reduction']!r} has no converter")
    out = data.clone()
    out[tuple(indices.long().unbind(-1))] = updates
    return out
