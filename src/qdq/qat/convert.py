"""A differentiable torch copy of a QDQ ONNX graph (its learned values go back: `qdq.qat.write`).

`QdqGraph` runs the graph `qdq quantize` wrote node by node in torch: each QuantizeLinear ->
DequantizeLinear pair on an activation becomes one `FakeQuantize` (STE, LSQ scale), each
integer weight behind a DequantizeLinear becomes a float parameter seen through its own
`FakeQuantize`, each int32 bias a float parameter, and every other node the float op that
`qdq.qat.ops.OPS` names. `qdq.qat.write.write_back` puts the learned weight codes, scales and
biases into the same initializers, so the file keeps its structure and ONNX Runtime fuses it
as it fused the PTQ output.

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
from collections.abc import Sequence
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
from qdq.qat.exact import (
    FusedConv,
    clip_inside,
    fused_convs,
    largest_scale_inside,
    qlinear_conv,
)
from qdq.qat.fakequant import FakeQuantize
from qdq.qat.lowbit import LowBitWeight
from qdq.qat.ops import OPS
from qdq.qat.ops_args import TORCH_DTYPES, Attrs, Value
from qdq.scheme import PerChannel, PerTensor, QScheme

WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


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
        self._check_pairs(graph, producer, activations)
        self._tie_scales(graph, producer, consumers)
        self.steps: list[Step] = []
        for node in graph.node:
            if node.op_type not in OPS and node.op_type not in QDQ_OPS:
                raise ModelError(
                    f"node {node.name!r}: {node.op_type} has no torch converter in qdq finetune; "
                    "keep it out of the model given to finetune, or please report it"
                )
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            made = sum(bool(name) for name in node.output)  # an optional output left out is ""
            attrs.update(opset=self.opset, outputs=len(node.output), made=made)
            self.steps.append(Step(node.op_type, tuple(node.input), tuple(node.output), attrs))
            if node.op_type == "QuantizeLinear":
                self._grid(node.input[1], node.input[2], activations, None, per_sample=True)
            elif node.op_type == "DequantizeLinear" and node.input[0] in self.initial:
                self._constant(node, attrs, consumers, producer, weights, activations)
        for name, value in self.initial.items():
            if name not in self.weight_of and name not in self.bias_of:
                self.constants[name] = _tensor(value)
        index = GraphIndex(model)
        self._bound_clipped_scales(index)
        absorbed = partial(self._absorbed, index)
        self.fused = {
            q: f
            for q, f in fused_convs(graph, producer, consumers, self.initial, absorbed).items()
            if f.w_init in self.weight_of and _key(f.w_init) not in self.lowbit
        }

    def _check_pairs(self, graph: onnx.GraphProto, producer: dict, activations: QScheme) -> None:
        """Refuse Q/DQ pairs `qdq quantize` does not write with these settings: each
        activation QuantizeLinear per tensor with a zero point of the activations' type, and
        each DequantizeLinear of an activation on its QuantizeLinear's grid (the torch copy
        keeps the activation dequantized between the two; a QuantizeLinear's output taken as
        a graph output is that value too)."""
        for node in graph.node:
            if node.op_type not in QDQ_OPS:
                continue
            name, (data, scale, *zero) = f"node {node.name!r} ({node.op_type})", node.input
            if not (zero and zero[0] in self.initial and scale in self.initial):
                raise ModelError(f"{name} has no constant scale and zero point: no file qdq writes")
            if node.op_type == "QuantizeLinear":
                dtype, want = self.initial[zero[0]].dtype, activations.storage_dtype
                if dtype != want or self.initial[scale].size != 1:
                    raise ModelError(
                        f"{name} is not the {want} per-tensor pair these settings make"
                    )
            elif data not in self.initial:
                q = producer.get(data)
                if q is None or q.op_type != "QuantizeLinear" or not self._same_grid(node, q):
                    raise ModelError(f"{name} dequantizes no QuantizeLinear of its own grid")

    def _bound_clipped_scales(self, index: GraphIndex) -> None:
        """Hold each scale that a Clip's QuantizeLinear uses where ONNX Runtime drops that Clip.

        ONNX Runtime removes a Clip before a QuantizeLinear, and so fuses the Conv before it
        into a QLinearConv, only while the grid's range lies within the Clip's (up to float32
        epsilon: `ClipQuantFusion`). A ReLU6 output's grid is [0, 6] exactly, so a scale
        learned a hair larger keeps the Clip, and the Conv runs in float: EfficientNet-Lite0,
        500 steps, left 3 of its 48 convolutions unfused and 20% slower."""
        for q in (n for n in index.nodes if n.op_type == "QuantizeLinear"):
            clip = index.producer.get(q.input[0])
            if clip is None or clip.op_type != "Clip" or not self._absorbed(index, clip, q):
                continue  # not dropped in the PTQ file either: nothing to keep
            grid = self.grids[self.group[q.input[1]]]
            zero_point = float(self.initial[q.input[2]])
            largest = largest_scale_inside(zero_point, grid, clip_bounds(clip, index))
            bound = max(largest, float(self.initial[q.input[1]]))
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
        return None not in bounds and clip_inside(start, zero_point, grid, bounds)

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
        for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # its scale, maybe repeated
                self.group[dq.input[1]] = self.group[q.input[1]]  # per channel: written too

    def _same_grid(self, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
        """The same scale and zero point, one of them maybe repeated per channel (a float
        Conv's reader, `qdq.passes.insert_qdq._per_channel_reader`)."""
        return all(
            np.array_equal(self.initial[x], self.initial[y])
            or _one_value(self.initial[x], self.initial[y])
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
        if slot and zero_point.dtype != weights.storage_dtype:
            raise ModelError(f"weight {node.input[0]!r} is {zero_point.dtype}, not the settings'")
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

    def forward(
        self,
        feeds: dict[str, torch.Tensor],
        known: dict[str, torch.Tensor] | None = None,
        inner: Sequence[str] = (),
    ) -> list[torch.Tensor]:
        """The graph's outputs on `feeds`, then the values of its `inner` tensors. `known`
        holds values some QuantizeLinear outputs must take (dequantized; ONNX Runtime's own,
        from `qdq finetune`'s file): the forward pass carries them on, the gradient is the
        fake-quantized path's. Elsewhere a fused convolution's output takes ONNX Runtime's
        arithmetic (`qdq.qat.exact`)."""
        env: dict[str, Value] = {**self.constants, **feeds, "": None}
        known = known or {}
        for step in self.steps:
            ins = [env.get(i) for i in step.inputs]  # integer initializers: see _dequantized
            if step.op_type == "QuantizeLinear":
                out: object = self.grids[self.group[step.inputs[1]]](ins[0])
                exact = known.get(step.outputs[0])
                if exact is None and step.outputs[0] in self.fused:
                    exact = self._fused_conv(self.fused[step.outputs[0]], env)
                if exact is not None:
                    out = out + (exact - out).detach()
            elif step.op_type == "DequantizeLinear":
                out = self._dequantized(step, ins[0])
            else:
                out = OPS[step.op_type](ins, step.attrs)
            outs = out if isinstance(out, tuple | list) else (out,)
            # an output left out is "", the name every absent optional input reads as None
            made = zip(step.outputs, outs, strict=False)
            env.update((name, value) for name, value in made if name)
        return [env[name] for name in [*self.outputs, *inner]]

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
            f.y_dtype,
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

    def lowbit_weight(self, initializer: str) -> LowBitWeight | None:
        """The low-bit grid a weight initializer is seen through, if it has one."""
        name = _key(initializer)
        return self.lowbit[name] if name in self.lowbit else None  # noqa: SIM401 (no .get)


def _one_value(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` and `b` hold one value between them, however often repeated."""
    first = a.reshape(-1)[0]
    return bool(np.all(a == first) and np.all(b == first))


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
