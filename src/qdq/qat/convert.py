"""A differentiable torch copy of a QDQ ONNX graph, and its learned values written back.

`QdqGraph` runs the graph `qdq quantize` wrote node by node in torch: each QuantizeLinear ->
DequantizeLinear pair on an activation becomes one `FakeQuantize` (STE, LSQ scale), each
integer weight behind a DequantizeLinear becomes a float parameter seen through its own
`FakeQuantize`, each int32 bias a float parameter, and every other node the float op that
`qdq.qat.ops.OPS` names. `write_back` puts the learned weight codes, scales and biases into the same
initializers, so the file keeps its structure and ONNX Runtime fuses it as it fused the PTQ
output.

Why not a converter from PyPI: onnx2torch (1.5.15, the most used one, last released 2024-08)
has no converter for QuantizeLinear or DequantizeLinear (none among its node_converters), so
the Q/DQ pairs, the learned and tied scales, and the map from each torch parameter back to
the initializer it came from (which writing the same file needs) would be ours anyway; the
ops themselves are plain functions (qdq.qat.ops_*, tabled in qdq.qat.ops), each tested
against ONNX Runtime.

Scales are tied where ONNX Runtime needs them equal: a node whose int8 input and int8 output
carry the same scale and zero point (MaxPool, Reshape, Transpose, Resize, a shared Concat
scale) keeps them one learned value, or ORT would no longer drop that node's Q/DQ pair.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from qdq.errors import ModelError
from qdq.lowbit import WeightGrid
from qdq.onnx.graph import GraphIndex, clip_bounds
from qdq.plan.constants import BIAS_CODE_LIMIT
from qdq.plan.saturation import pair_clipped
from qdq.qat.exact import FusedConv, fused_convs, qlinear_conv
from qdq.qat.fakequant import FakeQuantize
from qdq.qat.lowbit import LowBitWeight
from qdq.qat.ops import OPS
from qdq.qat.ops_args import TORCH_DTYPES, Attrs, Value
from qdq.qparams import MIN_SCALE
from qdq.scheme import PerChannel, PerTensor, QScheme

WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT32 = np.iinfo(np.int32)


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
        self.fused = {
            q: f
            for q, f in fused_convs(
                graph, producer, consumers, self.initial, partial(self._absorbed, GraphIndex(model))
            ).items()
            if f.w_init in self.weight_of and _key(f.w_init) not in self.lowbit
        }

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

    def _absorbed(self, index: GraphIndex, act: onnx.NodeProto, q: onnx.NodeProto) -> bool:
        """Whether ONNX Runtime drops the Relu or Clip `act` before QuantizeLinear `q`: its
        range holds the grid's (a Relu: the grid starts at 0)."""
        if len(q.input) < 3 or q.input[1] not in self.group:
            return False
        grid = self.grids[self.group[q.input[1]]]
        zero_point = float(self.initial[q.input[2]])
        if act.op_type == "Relu":
            return zero_point == grid.qmin
        bounds = clip_bounds(act, index)
        start = np.float32(self.initial[q.input[1]])
        return None not in bounds and _inside(start, zero_point, grid, bounds)

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
                if step.outputs[0] in self.fused:
                    exact = self._fused_conv(self.fused[step.outputs[0]], env)
                    out = out + (exact - out).detach()
            elif step.op_type == "DequantizeLinear":
                out = self._dequantized(step, ins[0])
            else:
                out = OPS[step.op_type](ins, step.attrs)
            outs = out if isinstance(out, tuple | list) else (out,)
            env.update(zip(step.outputs, outs, strict=False))
        return [env[name] for name in self.outputs]

    def _fused_conv(self, f: FusedConv, env: dict[str, Value]) -> torch.Tensor:
        """ONNX Runtime's QLinearConv result for one fused group (`qdq.qat.exact`)."""
        return qlinear_conv(
            env[f.x],
            self.params[_key(f.w_init)],
            env[f.b] if f.b else None,
            f.attrs,
            self.grids[self.group[f.x_scale]],
            self.grids[self.weight_of[f.w_init]],
            self.grids[self.group[f.y_scale]],
        )

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
    dtype = TORCH_DTYPES.get(value.dtype, torch.float32)
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
