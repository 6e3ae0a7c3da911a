"""ONNX ops as torch functions, named after the ops and stated as the spec states them.

`OPS` maps each op type `QdqGraph` (qdq.qat.convert) can run to a function of the node's
inputs (torch tensors; integer tensors carry shapes, as ONNX's Shape, Gather and Concat of
shapes do) and its attributes. The 67 ops cover the QDQ graphs of the PP-OCRv4 models,
EfficientNet-Lite0, the digits models and the unseen models `qdq finetune` was measured on;
an op or an attribute combination they do not cover raises `ModelError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from onnx import helper, numpy_helper
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from qdq.errors import ModelError

Value = torch.Tensor | None
Attrs = dict[str, object]


def _ints(t: Value) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()] if t is not None else []


def _opt(inputs: Sequence[Value], i: int) -> Value:
    return inputs[i] if len(inputs) > i else None


def _axes(inputs: Sequence[Value], attrs: Attrs, i: int = 1) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as input `i` (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    given = _opt(inputs, i)
    return _ints(given) if given is not None else None


def _spatial_pads(attrs: Attrs, x: torch.Tensor, kernel: Sequence[int]) -> list[int]:
    """ONNX pads (begins then ends) with auto_pad resolved against `x`'s spatial shape."""
    n = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * n))
    if auto == "VALID":
        return [0] * 2 * n
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if auto == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


def _padded(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list]:
    """`x` padded explicitly where begins and ends differ; the symmetric pads left to the op."""
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return x, pads[:n]
    torch_pads = [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]
    return F.pad(x, torch_pads, value=value), [0] * n


def conv(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    kernel = list(w.shape[2:])
    x, pads = _padded(x, _spatial_pads(attrs, x, kernel))
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    strides = attrs.get("strides", [1] * len(kernel))
    dilations = attrs.get("dilations", [1] * len(kernel))
    return fn(x, w, b, strides, pads, dilations, attrs.get("group", 1))


def conv_transpose(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.ndim - 2
    pads = list(attrs.get("pads", [0] * 2 * n))
    if pads[:n] != pads[n:] or "output_shape" in attrs:
        raise ModelError("ConvTranspose with asymmetric pads or output_shape has no converter")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    return fn(
        x,
        w,
        b,
        attrs.get("strides", [1] * n),
        pads[:n],
        attrs.get("output_padding", [0] * n),
        attrs.get("group", 1),
        attrs.get("dilations", [1] * n),
    )


def gemm(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    a = a.transpose(0, 1) if attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def clip(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    low, high = _opt(inputs, 1), _opt(inputs, 2)
    low = float(low) if low is not None else attrs.get("min")
    high = float(high) if high is not None else attrs.get("max")
    return torch.clamp(inputs[0], low, high)


def softmax(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """`opset` (set when the graph is read) < 13: over the axes from `axis` on, as one."""
    x = inputs[0]
    axis = attrs.get("axis", -1 if attrs["opset"] >= 13 else 1) % x.ndim
    if attrs["opset"] >= 13 or axis == x.ndim - 1:
        return torch.softmax(x, axis)
    return torch.softmax(x.flatten(axis), axis).reshape(x.shape)


def reshape(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def squeeze(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    axes = _axes(inputs, attrs)
    x = inputs[0]
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.ndim for a in axes))


def unsqueeze(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    rank = x.ndim + len(_axes(inputs, attrs))
    for a in sorted(a % rank for a in _axes(inputs, attrs)):
        x = x.unsqueeze(a)
    return x


def slice_(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes, steps = _axes(inputs, {}, 3), _opt(inputs, 4)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 1:
            raise ModelError("Slice with a negative step has no converter")
        index[axis] = slice(start, end, step)  # Python clamps as ONNX does
    return x[tuple(index)]


def split(inputs: Sequence[Value], attrs: Attrs) -> tuple[torch.Tensor, ...]:
    """`outputs` (set when the graph is read): how many parts, where no sizes are given."""
    x, axis = inputs[0], attrs.get("axis", 0)
    sizes = attrs.get("split") or _ints(_opt(inputs, 1))
    if not sizes:
        sizes = -(-x.shape[axis] // attrs["outputs"])
    return torch.split(x, sizes, axis)


def gather(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, indices, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0) % inputs[0].ndim
    picked = x.index_select(axis, (indices % x.shape[axis]).reshape(-1))
    return picked.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])


def gather_elements(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, indices, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0) % inputs[0].ndim
    return x.gather(axis, indices % x.shape[axis])


def pad(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    pads = list(attrs["pads"]) if "pads" in attrs else _ints(inputs[1])
    value = _opt(inputs, 2)
    value = float(value) if value is not None else attrs.get("value", 0.0)
    axes = _axes(inputs, {}, 3) or list(range(x.ndim))
    n = len(axes)
    full = {a % x.ndim: (pads[i], pads[n + i]) for i, a in enumerate(axes)}
    torch_pads = [p for d in reversed(range(x.ndim)) for p in full.get(d, (0, 0))]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    mode = attrs.get("mode", b"constant")
    mode = {"edge": "replicate"}.get(mode.decode(), mode.decode())
    return F.pad(x, torch_pads, mode=mode, value=value if mode == "constant" else None)


def pool(inputs: Sequence[Value], attrs: Attrs, kind: str) -> torch.Tensor:
    x, kernel = inputs[0], list(attrs["kernel_shape"])
    n = len(kernel)
    fill = -math.inf if kind == "max" else 0.0
    x, pads = _padded(x, _spatial_pads(attrs, x, kernel), fill)
    strides = attrs.get("strides", [1] * n)
    ceil = bool(attrs.get("ceil_mode", 0))
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        return fn(x, kernel, strides, pads, attrs.get("dilations", [1] * n), ceil)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    return fn(x, kernel, strides, pads, ceil, bool(attrs.get("count_include_pad", 0)))


def resize(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    scales, sizes = _opt(inputs, 2), _opt(inputs, 3)
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
    else:
        size = [math.floor(d * s) for d, s in zip(x.shape[2:], scales.tolist()[2:], strict=True)]
    mode = attrs.get("mode", b"nearest").decode()
    transform = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
    if mode == "nearest":  # ONNX's rounding lands on torch's floor for integer upsampling
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        torch_mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
        return F.interpolate(x, size, mode=torch_mode, align_corners=transform == "align_corners")
    raise ModelError(f"Resize mode {mode} with {transform} coordinates has no converter")


def reduce(inputs: Sequence[Value], attrs: Attrs, fn: Callable) -> torch.Tensor:
    x, axes = inputs[0], _axes(inputs, attrs)
    axes = axes or list(range(x.ndim))
    return fn(x, dim=axes, keepdim=bool(attrs.get("keepdims", 1)))


def layer_norm(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
    shape = x.shape[attrs.get("axis", -1) % x.ndim :]
    return F.layer_norm(x, shape, scale, bias, attrs.get("epsilon", 1e-5))


def batch_norm(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def flatten(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def shape(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    dims = list(inputs[0].shape)[attrs.get("start", 0) : attrs.get("end")]
    return torch.tensor(dims, dtype=torch.int64)


def cast(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    to = helper.tensor_dtype_to_np_dtype(attrs["to"])
    return inputs[0].to(TORCH_DTYPES.get(np.dtype(to), torch.float32))


def constant_of_shape(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    value = attrs.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value else torch.zeros(1)
    return fill.reshape(()).expand(_ints(inputs[0])).clone()


def expand(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """ONNX's Expand broadcasts both ways: a 1 in the shape keeps the input's size."""
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1]))))


def prelu(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, slope = inputs
    return torch.where(x >= 0, x, x * slope)


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


def lstm(inputs: Sequence[Value], attrs: Attrs) -> tuple[torch.Tensor, ...]:
    """ONNX's LSTM (gates i, o, f, c; sequence first; peepholes optional), one or both
    directions. Not converted: custom activations, clipping, coupled input-forget gates,
    batch-first layout, and sequences of different lengths."""
    x, w, r = inputs[:3]
    bias, lengths, h0, c0, peep = (_opt(inputs, i) for i in range(3, 8))
    odd = [k for k in ("activations", "clip", "input_forget", "layout") if attrs.get(k)]
    if odd or (lengths is not None and bool((lengths != x.shape[0]).any())):
        raise ModelError(f"LSTM with {odd or 'sequences of different lengths'} has no converter")
    directions, hidden = w.shape[0], w.shape[1] // 4
    zeros = x.new_zeros(directions, x.shape[1], hidden)
    h0, c0 = (zeros if v is None else v for v in (h0, c0))
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = attrs.get("direction", b"forward") == b"reverse" or d == 1
        b = bias[d, : 4 * hidden] + bias[d, 4 * hidden :] if bias is not None else 0
        p = peep[d].split(hidden) if peep is not None else (0, 0, 0)
        h, c, out = h0[d], c0[d], []
        for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
            i, o, f, g = (x[t] @ w[d].T + h @ r[d].T + b).split(hidden, -1)
            i, f = torch.sigmoid(i + p[0] * c), torch.sigmoid(f + p[2] * c)
            c = f * c + i * torch.tanh(g)
            h = torch.sigmoid(o + p[1] * c) * torch.tanh(c)
            out.append(h)
        ys.append(torch.stack(out[::-1] if reverse else out))
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)


def _elementwise(fn: Callable) -> Callable[[Sequence[Value], Attrs], torch.Tensor]:
    return lambda inputs, attrs: fn(*inputs)


def _variadic(fn: Callable) -> Callable[[Sequence[Value], Attrs], torch.Tensor]:
    def run(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
        out = inputs[0]
        for x in inputs[1:]:
            out = fn(out, x)
        return out

    return run


TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float32,  # trained in float32 throughout
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
}

OPS: dict[str, Callable[[Sequence[Value], Attrs], object]] = {
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": _elementwise(torch.matmul),
    "Add": _elementwise(torch.add),
    "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul),
    "Div": _elementwise(torch.div),
    "Pow": _elementwise(torch.pow),
    "Sqrt": _elementwise(torch.sqrt),
    "Erf": _elementwise(torch.erf),
    "Exp": _elementwise(torch.exp),
    "Reciprocal": _elementwise(torch.reciprocal),
    "Not": _elementwise(torch.logical_not),
    "IsNaN": _elementwise(torch.isnan),
    "And": _elementwise(torch.logical_and),
    "Or": _elementwise(torch.logical_or),
    "Greater": _elementwise(torch.gt),
    "GreaterOrEqual": _elementwise(torch.ge),
    "Less": _elementwise(torch.lt),
    "LessOrEqual": _elementwise(torch.le),
    "PRelu": prelu,
    "Tanh": _elementwise(torch.tanh),
    "Neg": _elementwise(torch.neg),
    "Abs": _elementwise(torch.abs),
    "Relu": _elementwise(torch.relu),
    "Sigmoid": _elementwise(torch.sigmoid),
    "HardSwish": _elementwise(F.hardswish),
    "Identity": _elementwise(lambda x: x),
    "Equal": _elementwise(torch.eq),
    "Where": _elementwise(torch.where),
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "Clip": clip,
    "Concat": lambda i, a: torch.cat([x for x in i if x is not None], a["axis"]),
    "Reshape": reshape,
    "Expand": expand,
    "Range": range_,
    "DepthToSpace": depth_to_space,
    "SpaceToDepth": space_to_depth,
    "LSTM": lstm,
    "Flatten": flatten,
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(reversed(range(i[0].ndim))))),
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Slice": slice_,
    "Split": split,
    "Softmax": softmax,
    "Gather": gather,
    "GatherElements": gather_elements,
    "Pad": pad,
    "Shape": shape,
    "Cast": cast,
    "ConstantOfShape": constant_of_shape,
    "MaxPool": lambda i, a: pool(i, a, "max"),
    "AveragePool": lambda i, a: pool(i, a, "average"),
    "GlobalAveragePool": lambda i, a: i[0].mean(tuple(range(2, i[0].ndim)), keepdim=True),
    "GlobalMaxPool": lambda i, a: i[0].amax(tuple(range(2, i[0].ndim)), keepdim=True),
    "Resize": resize,
    "ReduceMean": lambda i, a: reduce(i, a, torch.mean),
    "ReduceSum": lambda i, a: reduce(i, a, torch.sum),
    "ReduceMax": lambda i, a: reduce(i, a, torch.amax),
    "LayerNormalization": layer_norm,
    "BatchNormalization": batch_norm,
}
