"""A differentiable torch copy of a QDQ ONNX graph, and its learned values written back.

`QdqGraph` runs the graph `qdq quantize` wrote node by node in torch: each QuantizeLinear ->
DequantizeLinear pair on an activation becomes one `FakeQuantize` (STE, LSQ scale), each
integer weight behind a DequantizeLinear becomes a float parameter seen through its own
`FakeQuantize`, each int32 bias a float parameter, and every other node the float op that
`OPS` names. `write_back` puts the learned weight codes, scales and biases into the same
initializers, so the file keeps its structure and ONNX Runtime fuses it as it fused the PTQ
output.

Why not a converter from PyPI: onnx2torch (1.5.15, the most used one, last released 2024-08)
has no converter for QuantizeLinear or DequantizeLinear (none among its node_converters), so
the Q/DQ pairs, the learned and tied scales, and the map from each torch parameter back to
the initializer it came from (which writing the same file needs) would be ours anyway. The 51
ops below are plain functions named after the ONNX ops, as the spec states them, covering the
QDQ graphs of the PP-OCRv4 models, EfficientNet-Lite0 and the digits models, each tested
against ONNX Runtime.

Scales are tied where ONNX Runtime needs them equal: a node whose int8 input and int8 output
carry the same scale and zero point (MaxPool, Reshape, Transpose, Resize, a shared Concat
scale) keeps them one learned value, or ORT would no longer drop that node's Q/DQ pair.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from qdq.errors import ModelError
from qdq.lowbit import WeightGrid
from qdq.onnx.graph import GraphIndex, clip_bounds
from qdq.plan.constants import BIAS_CODE_LIMIT
from qdq.plan.saturation import pair_clipped
from qdq.qat.fakequant import FakeQuantize
from qdq.qat.lowbit import LowBitWeight
from qdq.qparams import MIN_SCALE
from qdq.scheme import PerChannel, PerTensor, QScheme

Value = torch.Tensor | None
Attrs = dict[str, object]
WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT32 = np.iinfo(np.int32)


# ---- ops, named after ONNX, on torch tensors (integer tensors carry shapes) -----------------


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
    return inputs[0].to(_TORCH_DTYPES.get(np.dtype(to), torch.float32))


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


_TORCH_DTYPES = {
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


# ---- the graph as a module ----------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One node to run: how, on which tensors, into which."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Attrs


@dataclass(frozen=True)
class Bias:
    """Where an int32 bias's scale comes from: its own initializer, and for a Conv or Gemm
    bias the input's and the weight's scales (written back as s_x * s_w)."""

    scale: str
    x_scale: str | None
    w_scale: str | None


def _key(name: str) -> str:
    """An initializer name as a module key: no dots, distinct for distinct names."""
    stem = re.sub(r"\W", "_", name)
    return f"{stem}_{zlib.crc32(name.encode()):08x}"


class QdqGraph(nn.Module):
    """The QDQ graph in torch: `forward(feeds)` -> the graph's outputs, in order.

    `weights` and `activations` are the grids qdq quantized with (their code ranges: a 4-bit
    weight's codes lie in [-7, 7] inside its int8 container). With a low-bit `weight_grid`
    (binary, ternary, power of two) each weight is seen through its `LowBitWeight`: its codes
    and scale follow the float weight, as in PTQ, and only the weight is learned."""

    def __init__(
        self,
        model: onnx.ModelProto,
        weights: QScheme,
        activations: QScheme,
        weight_grid: WeightGrid = WeightGrid.UNIFORM,
    ) -> None:
        super().__init__()
        self.weight_grid = WeightGrid(weight_grid)
        self.lowbit = nn.ModuleDict()  # weight initializer's key -> its LowBitWeight
        graph = model.graph
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13
        )
        self.initial = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initial]
        self.outputs = [o.name for o in graph.output]
        self.constants: dict[str, torch.Tensor] = {}
        self.grids = nn.ModuleDict()  # scale initializer group -> FakeQuantize
        self.params = nn.ParameterDict()  # learned weights and biases, by initializer
        self.group: dict[str, str] = {}  # scale initializer -> its group's key
        self.weight_of: dict[str, str] = {}  # integer weight initializer -> its scale's group
        self.bias_of: dict[str, Bias] = {}  # int32 bias initializer -> its scales
        consumers = _consumers(graph)
        producer = {o: n for n in graph.node for o in n.output}
        self._tie_scales(graph, producer, consumers)
        self.steps: list[Step] = []
        for node in graph.node:
            if node.op_type not in OPS and node.op_type not in QDQ_OPS:
                raise ModelError(
                    f"node {node.name!r}: {node.op_type} has no torch converter in qdq finetune; "
                    "keep it out of the model given to finetune, or please report it"
                )
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs.update(opset=self.opset, outputs=len(node.output))
            self.steps.append(Step(node.op_type, tuple(node.input), tuple(node.output), attrs))
            if node.op_type == "QuantizeLinear":
                self._grid(node.input[1], node.input[2], activations, None, per_sample=True)
            elif node.op_type == "DequantizeLinear" and node.input[0] in self.initial:
                self._constant(node, attrs, consumers, producer, weights, activations)
        for name, value in self.initial.items():
            if name not in self.weight_of and name not in self.bias_of:
                self.constants[name] = _tensor(value)
        self._bound_clipped_scales(model)

    def _bound_clipped_scales(self, model: onnx.ModelProto) -> None:
        """Hold each scale that a Clip's QuantizeLinear uses where ONNX Runtime drops that Clip.

        ONNX Runtime removes a Clip before a QuantizeLinear, and so fuses the Conv before it
        into a QLinearConv, only while the grid's range lies within the Clip's (up to float32
        epsilon: `ClipQuantFusion`). A ReLU6 output's grid is [0, 6] exactly, so a scale
        learned a hair larger keeps the Clip, and the Conv runs in float: EfficientNet-Lite0,
        500 steps, left 3 of its 48 convolutions unfused and 20% slower."""
        index = GraphIndex(model)
        for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
            clip = index.producer.get(q.input[0])
            if clip is None or clip.op_type != "Clip" or q.input[1] not in self.group:
                continue
            bounds = clip_bounds(clip, index)
            grid = self.grids[self.group[q.input[1]]]
            zero_point = float(self.initial[q.input[2]])
            start = np.float32(self.initial[q.input[1]])
            if None in bounds or not _inside(start, zero_point, grid, bounds):
                continue  # not dropped in the PTQ file either: nothing to keep
            bound = max(_largest_inside(zero_point, grid, bounds), float(start))
            grid.max_scale = min(grid.max_scale or math.inf, bound)

    def _tie_scales(self, graph: onnx.GraphProto, producer: dict, consumers: dict) -> None:
        """Union of activation scales a node passes through unchanged (see the module doc)."""
        parent: dict[str, str] = {}

        def find(s: str) -> str:
            while parent.setdefault(s, s) != s:
                s = parent[s]
            return s

        for node in graph.node:
            if node.op_type in QDQ_OPS:
                continue
            ins = [
                p for i in node.input if (p := producer.get(i)) and p.op_type == "DequantizeLinear"
            ]
            outs = [
                c
                for o in node.output
                for c in consumers.get(o, [])
                if c.op_type == "QuantizeLinear"
            ]
            for dq in ins:
                for q in outs:
                    if dq.input[0] not in self.initial and self._same_grid(dq, q):
                        parent[find(q.input[1])] = find(dq.input[1])
        for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
            self.group[q.input[1]] = _key(find(q.input[1]))

    def _same_grid(self, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
        return all(
            np.array_equal(self.initial[x], self.initial[y])
            for x, y in zip(a.input[1:3], b.input[1:3], strict=False)
        )

    def _grid(
        self,
        scale: str,
        zero_point: str,
        scheme: QScheme,
        axis: int | None,
        per_sample: bool,
        learn_scale: bool = True,
    ) -> str:
        """The FakeQuantize of `scale`'s group, made on first use from the initializers."""
        key = self.group.setdefault(scale, _key(scale))
        if key not in self.grids:
            s, z = self.initial[scale].copy(), self.initial[zero_point].astype(np.float32)
            self.grids[key] = FakeQuantize(
                s, z, scheme.qmin, scheme.qmax, axis, learn_scale, per_sample=per_sample
            )
        return key

    def _constant(
        self,
        node: onnx.NodeProto,
        attrs: Attrs,
        consumers: dict,
        producer: dict,
        weights: QScheme,
        activations: QScheme,
    ) -> None:
        """A learned float copy of an integer initializer: a weight on its grid, or a bias."""
        codes, scale = self.initial[node.input[0]], self.initial[node.input[1]]
        zero_point = self.initial[node.input[2]]
        values = codes.astype(np.float64) - zero_point.reshape(_shape(scale, attrs, codes))
        values = values * scale.reshape(_shape(scale, attrs, codes))
        self.params[_key(node.input[0])] = nn.Parameter(_tensor(values.astype(np.float32)))
        if codes.dtype == np.int32:  # a bias: its scale follows s_x * s_w when written back
            user = consumers[node.output[0]][0]
            if user.op_type == "Add":  # a MatMul's bias, which ONNX Runtime fuses into QGemm
                other = next(i for i in user.input if i != node.output[0])
                matmul = producer.get(other)
                user = matmul if matmul is not None and matmul.op_type == "MatMul" else user
            x_dq, w_dq = (producer.get(i) for i in user.input[:2])
            if not all(p is not None and p.op_type == "DequantizeLinear" for p in (x_dq, w_dq)):
                x_dq = w_dq = None  # not a Conv/Gemm bias: it keeps its own scale
            self.bias_of[node.input[0]] = Bias(
                node.input[1], x_dq and x_dq.input[1], w_dq and w_dq.input[1]
            )
            return
        slot = any(
            WEIGHT_SLOTS.get(c.op_type) == list(c.input).index(node.output[0])
            for c in consumers[node.output[0]]
        )
        axis = attrs.get("axis", 1) if scale.ndim else None
        lowbit = slot and self.weight_grid is not WeightGrid.UNIFORM
        self.weight_of[node.input[0]] = self._grid(
            *(node.input[1], node.input[2], weights if slot else activations, axis),
            per_sample=False,
            learn_scale=not lowbit,  # a low-bit grid's scale follows the weight
        )
        if lowbit:
            granularity = PerTensor() if axis is None else PerChannel(axis % codes.ndim)
            scheme = replace(weights, granularity=granularity)
            self.lowbit[_key(node.input[0])] = LowBitWeight(self.weight_grid, scheme)

    def forward(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        env: dict[str, Value] = {**self.constants, **feeds, "": None}
        for step in self.steps:
            ins = [env.get(i) for i in step.inputs]  # integer initializers: see _dequantized
            if step.op_type == "QuantizeLinear":
                out: object = self.grids[self.group[step.inputs[1]]](ins[0])
            elif step.op_type == "DequantizeLinear":
                out = self._dequantized(step, ins[0])
            else:
                out = OPS[step.op_type](ins, step.attrs)
            outs = out if isinstance(out, tuple | list) else (out,)
            env.update(zip(step.outputs, outs, strict=False))
        return [env[name] for name in self.outputs]

    def _dequantized(self, step: Step, x: Value) -> torch.Tensor:
        name = step.inputs[0]
        if _key(name) in self.lowbit:
            return self.lowbit[_key(name)](self.params[_key(name)])
        if name in self.weight_of:
            return self.grids[self.weight_of[name]](self.params[_key(name)])
        if name in self.bias_of:
            return self.params[_key(name)]
        return x  # an activation's QuantizeLinear already fake-quantized it

    def weight_param(self, initializer: str) -> nn.Parameter:
        """The learned float copy of an integer weight or int32 bias initializer."""
        return self.params[_key(initializer)]


def _inside(scale: np.float32, zero_point: float, grid: FakeQuantize, bounds: tuple) -> bool:
    """ONNX Runtime's test for dropping the Clip, in its float32 arithmetic."""
    eps = np.finfo(np.float32).eps
    lowest = scale * np.float32(grid.qmin - zero_point)
    highest = scale * np.float32(grid.qmax - zero_point)
    with np.errstate(invalid="ignore", over="ignore"):
        low, high = np.float32(bounds[0]), np.float32(bounds[1])
        return bool(not (eps < low - lowest) and not (eps < highest - high))


def _largest_inside(zero_point: float, grid: FakeQuantize, bounds: tuple) -> float:
    """The largest float32 scale whose grid passes `_inside`."""
    low, high = bounds
    limits = [math.inf]
    if grid.qmax > zero_point and math.isfinite(high):
        limits.append(high / (grid.qmax - zero_point))
    if grid.qmin < zero_point and math.isfinite(low):
        limits.append(low / (grid.qmin - zero_point))
    scale = np.float32(min(limits)) * np.float32(1 + 1e-6)  # then down to the exact float
    while not _inside(scale, zero_point, grid, bounds):
        scale = np.nextafter(scale, np.float32(0))
    return float(scale)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _shape(scale: np.ndarray, attrs: Attrs, codes: np.ndarray) -> tuple[int, ...]:
    """The shape that broadcasts a per-axis `scale` along DequantizeLinear's axis of `codes`."""
    if scale.ndim == 0:
        return ()
    shape = [1] * codes.ndim
    shape[attrs.get("axis", 1) % codes.ndim] = -1
    return tuple(shape)


def _tensor(value: np.ndarray) -> torch.Tensor:
    dtype = _TORCH_DTYPES.get(value.dtype, torch.float32)
    return torch.from_numpy(np.array(value)).to(dtype)  # a copy: initializers are read-only


# ---- writing back ---------------------------------------------------------------------------


def write_back(model: onnx.ModelProto, graph: QdqGraph, pairs: bool = False) -> onnx.ModelProto:
    """A copy of `model` with `graph`'s learned weight codes, scales and biases in place of its
    initializers (same names, shapes and dtypes), so its structure is unchanged. `pairs`: the
    uniform weights' pairs of neighbours kept from saturating x86 u8s8 kernels: none adds more
    codes than 128 or than it did in `model`, PTQ's (`qdq.plan.saturation`)."""
    values: dict[str, np.ndarray] = {}
    users = _weight_users(model) if pairs else {}
    with torch.no_grad():
        scales = {
            key: g.bounded_scale().clamp_min(MIN_SCALE).double().numpy()
            for key, g in graph.grids.items()
        }
        for weight, key in graph.weight_of.items():  # low-bit codes first: biases use s_w
            if _key(weight) in graph.lowbit:
                codes, scale = graph.lowbit[_key(weight)].codes_and_scale(
                    graph.weight_param(weight)
                )
                values[weight], scales[key] = codes.double().numpy(), scale.double().numpy()
        for scale, key in graph.group.items():
            values[scale] = scales[key]
        for bias, where in graph.bias_of.items():
            b = graph.params[_key(bias)].double().numpy()
            scale = graph.initial[where.scale].astype(np.float64)
            if where.x_scale is not None and where.w_scale is not None:
                s_x = scales[graph.group[where.x_scale]]
                # A bias too large for int32 codes raises its channel's weight scale, as PTQ does.
                needed = np.abs(b) / (s_x * BIAS_CODE_LIMIT)
                w_key = graph.group[where.w_scale]
                s_w = np.maximum(scales[w_key], needed if needed.ndim else needed.max())
                scales[w_key] = values[where.w_scale] = s_w
                scale = values[where.scale] = s_x * s_w
            values[bias] = np.clip(np.rint(b / scale), INT32.min, INT32.max)
        for weight, key in graph.weight_of.items():
            if weight in values:  # on a low-bit grid, written above
                continue
            grid, w = graph.grids[key], graph.params[_key(weight)].double().numpy()
            axis = grid.axis if scales[key].ndim else None
            s = scales[key] if axis is None else np.expand_dims(scales[key], _others(w, axis))
            z = float(grid.zero_point.reshape(-1)[0])  # per tensor (a weight: 0, symmetric)
            values[weight] = np.clip(np.rint(w / s) + z, grid.qmin, grid.qmax)
            if weight in users and z == 0:
                values[weight] = pair_clipped(users[weight], values[weight], graph.initial[weight])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.name in values:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            new = values[tensor.name].astype(dtype).reshape(tuple(tensor.dims))
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, tensor.name))
    return out


def _weight_users(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Each integer weight's compute node: the sole reader of its DequantizeLinear."""
    index = GraphIndex(model)
    users = {}
    for node in index.nodes:
        if node.op_type == "DequantizeLinear" and index.is_constant(node.input[0]):
            user = index.sole_consumer(node.output[0])
            if user is not None:
                users[node.input[0]] = user
    return users


def _others(w: np.ndarray, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(w.ndim) if d != axis % w.ndim)
