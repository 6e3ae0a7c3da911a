"""ONNX Runtime's own int8 arithmetic in the torch copy's forward pass, where it fuses a group.

ONNX Runtime runs `DequantizeLinear -> Conv [-> Relu or Clip] -> QuantizeLinear` as one
QLinearConv where it can drop the Relu or Clip: the int32 sum of the codes' products plus the
int32 bias, times `M = (s_x * s_w[c]) / s_y` in float32, rounded half to even (docs/engine.md,
"Requantization"). The fake-quantized copy computes the same Conv in float32 on the
dequantized values and rounds that, which lands on the other side of a rounding boundary now
and then; a network that amplifies such one-code differences (PP-OCRv4's recognizer: from
1e-5 of the codes at its fourth block to over half of them after its first
squeeze-and-excitation gate, docs/finetune.md) then trains a model that ONNX Runtime does not
run. Here the forward value of such a group is ONNX Runtime's codes, and the gradient the
fake-quantized path's (straight through), so what trains is what runs. `clip_inside` is
ONNX Runtime's test for dropping the Clip, which decides whether it fuses such a group at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from qdq.engine.integer import requantize_mlas
from qdq.qat.fakequant import FakeQuantize
from qdq.qat.ops_conv import conv
from qdq.qparams import MIN_SCALE


@dataclass(frozen=True)
class FusedConv:
    """A group ONNX Runtime runs as QLinearConv, by the tensors the torch copy holds: the
    Conv's input and bias (DequantizeLinear outputs; no bias: ""), its attributes, the input's
    scale, the weight's integer initializer, and the output QuantizeLinear's scale and type."""

    x: str
    b: str
    attrs: dict
    x_scale: str
    w_init: str
    y_scale: str
    y_dtype: np.dtype  # the output codes' type (the QuantizeLinear's zero point's)


def fused_convs(
    graph: onnx.GraphProto,
    producer: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    initial: dict[str, np.ndarray],
    absorbed: Callable[[onnx.NodeProto, onnx.NodeProto], bool],
) -> dict[str, FusedConv]:
    """Each QuantizeLinear output that ONNX Runtime computes with QLinearConv: the Conv reads
    an activation and a constant weight through DequantizeLinear, and its output goes to this
    QuantizeLinear alone, directly or through a Relu or Clip that `absorbed(activation, q)`
    says ONNX Runtime drops (its range holds the grid's)."""
    found = {}
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        node = producer.get(q.input[0])
        if node is not None and node.op_type in ("Relu", "Clip"):
            if len(consumers.get(node.output[0], [])) != 1 or not absorbed(node, q):
                continue
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Conv" or len(consumers[node.output[0]]) != 1:
            continue
        x_dq, w_dq = (producer.get(i) for i in node.input[:2])
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in (x_dq, w_dq)):
            continue
        if x_dq.input[0] in initial or w_dq.input[0] not in initial:
            continue
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and (producer.get(bias) is None or producer[bias].op_type != "DequantizeLinear"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        y_dtype = initial[q.input[2]].dtype if len(q.input) > 2 else np.dtype(np.uint8)
        found[q.output[0]] = FusedConv(
            node.input[0], bias, attrs, x_dq.input[1], w_dq.input[0], q.input[1], y_dtype
        )
    return found


def qlinear_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    attrs: dict,
    x_grid: FakeQuantize,
    w_grid: FakeQuantize,
    y_grid: FakeQuantize,
    y_dtype: np.dtype,
) -> torch.Tensor:
    """ONNX Runtime's QLinearConv output, dequantized, for the fake-quantized input `x`,
    weight `w` and float bias `b` on their grids (no gradient: a value to put in the forward
    pass). The sums are exact in float64, requantized by the engine's `requantize_mlas`; the
    scales and the bias are those `write_back` writes."""
    grids = (x_grid, w_grid, y_grid)
    with torch.no_grad():
        s_x, s_w, s_y = (g.bounded_scale().detach().clamp_min(MIN_SCALE) for g in grids)
        z_x, z_y = x_grid.zero_point, y_grid.zero_point
        x_codes = x_grid.codes(x).double() - z_x.double()
        z_w = w_grid.zero_point.double()  # one per output channel, or one for all
        z_w = z_w.reshape(-1, *[1] * (w.ndim - 1)) if z_w.numel() > 1 else z_w
        w_codes = w_grid.codes(w).double() - z_w
        acc = conv([x_codes, w_codes], attrs)
        channel = (1, -1) + (1,) * (acc.ndim - 2)
        if b is not None:
            bias_scale = s_x.double() * s_w.double()
            acc = acc + torch.round(b.double() / bias_scale).reshape(channel)
        multiplier = ((s_x * s_w) / s_y).float().reshape(channel)
        codes = requantize_mlas(acc.numpy(), multiplier.numpy(), z_y.numpy(), y_dtype)
        return (torch.from_numpy(codes.astype(np.float32)) - z_y) * s_y  # DequantizeLinear


def clip_inside(scale: np.float32, zero_point: float, grid: FakeQuantize, bounds: tuple) -> bool:
    """ONNX Runtime's test for dropping a Clip before a QuantizeLinear (`ClipQuantFusion`):
    the grid's range within the Clip's `bounds`, to float32 epsilon, in its float32 arithmetic."""
    eps = np.finfo(np.float32).eps
    lowest = scale * np.float32(grid.qmin - zero_point)
    highest = scale * np.float32(grid.qmax - zero_point)
    with np.errstate(invalid="ignore", over="ignore"):
        low, high = np.float32(bounds[0]), np.float32(bounds[1])
        return bool(not (eps < low - lowest) and not (eps < highest - high))


def largest_scale_inside(zero_point: float, grid: FakeQuantize, bounds: tuple) -> float:
    """The largest float32 scale whose grid passes `clip_inside`."""
    low, high = bounds
    limits = [math.inf]
    if grid.qmax > zero_point and math.isfinite(high):
        limits.append(high / (grid.qmax - zero_point))
    if grid.qmin < zero_point and math.isfinite(low):
        limits.append(low / (grid.qmin - zero_point))
    scale = np.float32(min(limits)) * np.float32(1 + 1e-6)  # then down to the exact float
    while not clip_inside(scale, zero_point, grid, bounds):
        scale = np.nextafter(scale, np.float32(0))
    return float(scale)
