"""Rewrite a float graph into QDQ form from a `Plan`.

Each planned activation gets one QuantizeLinear -> DequantizeLinear pair right after its
producer, read by the consumers that run in int8 (float consumers of a float op's output read
the exact tensor); weights become integer initializers behind a DequantizeLinear (so the file
shrinks about 4x); biases become int32 with scale s_x * s_w. ONNX Runtime then fuses
DQ -> op -> Q into its int8 kernels (QLinearConv, QLinearMatMul, QLinearAdd, ...).

A Conv, ConvTranspose or Gemm kept float between int8 neighbours reads its input through a
DequantizeLinear whose scale is repeated per channel (`_per_channel_reader`): ONNX Runtime
(1.32 here, `WeightBiasQuantization`) quantizes the float weights of any such op that
reads a per-tensor DequantizeLinear and writes a QuantizeLinear, to one symmetric int8 scale per
tensor, so a layer qdq keeps float for its accuracy would run in coarse int8 instead
(EfficientNet-Lite0 with its depthwise convolutions "float": 12.6 dB against all int8's 20.8).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qdq.errors import ModelError
from qdq.onnx.graph import (
    GraphIndex,
    all_names,
    attributes,
    copied_except,
    rename,
    subgraph_reads,
    subgraphs,
)
from qdq.onnx.model import FLOORS_KEY, METADATA_KEY, WEIGHTS_KEY
from qdq.passes.recurrent import quantize_lstm_weights
from qdq.plan.build import Plan
from qdq.plan.flow import reads_int8
from qdq.qparams import QParams
from qdq.scheme import PerChannel

INT32 = np.iinfo(np.int32)
# Ops whose float weights ONNX Runtime quantizes per tensor when a DequantizeLinear with one
# scale feeds input 0 and a QuantizeLinear reads the output.
WEIGHTS_QUANTIZED_BY_ORT = frozenset({"Conv", "ConvTranspose", "Gemm"})


def insert_qdq(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """A new model with Q/DQ pairs, integer weights and int32 biases as `plan` says."""
    index = GraphIndex(model)
    out = copied_except(model, "node", "initializer")
    graph = out.graph
    initializers = {t.name: t for t in model.graph.initializer}
    used_float: set[str] = set()
    renamed: dict[str, str] = {}  # int8 consumers read this name instead
    prequant: dict[str, str] = {}  # a quantized graph output's float tensor, renamed
    # Quantized tensors that a float op (or the caller) made. Their float consumers read them
    # as they are; those of an int8 kernel's output read the DequantizeLinear, or ONNX Runtime
    # could not fuse the kernel with its QuantizeLinear.
    made_float = {
        t
        for t in plan.activations
        if (producer := index.producer.get(t)) is None
        or not plan.decisions[producer.name].quantized
    }
    copies: dict[str, str] = {}
    per_channel: dict[tuple[str, int], str] = {}  # (tensor, axis) -> its per-channel DQ's output
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    # a weight that several int8 layers read is stored once where their codes agree
    reads = Counter(
        name
        for node in index.nodes
        for i, name in enumerate(node.input)
        if (node.name, i) in plan.constants
    )
    stored: dict[tuple, str] = {}
    # every name the model has, and each new stem with its suffixed names as it is made
    taken = all_names(model.graph)

    def add_pair(tensor: str, qparams: QParams) -> None:
        # keep an output's name on the dequantized copy; an input that is also an output
        # (passed through) has no producer to rename, and stays exact
        if tensor in index.graph_outputs and tensor not in index.graph_inputs:
            source, target = f"{tensor}_prequant", tensor
            prequant[tensor] = source
        else:
            source, target = tensor, f"{tensor}_dq"
            renamed[tensor] = target
        copies[tensor] = target
        new_inits.extend(_qparam_tensors(tensor, qparams))
        new_nodes.extend(_pair(tensor, source, target, qparams))

    for name in index.graph_inputs:
        if name in plan.activations:
            add_pair(name, plan.activations[name])
    for node in index.nodes:
        node = _copy(node)
        for i, name in enumerate(node.input):
            key = (node.name, i)
            if key in plan.constants:
                codes = plan.codes(key, index.constant(name))
                node.input[i] = _dequantized_constant(
                    _stem(f"{name}_{key[0]}_{key[1]}", taken),
                    name,
                    plan.constants[key],
                    codes,
                    new_nodes,
                    new_inits,
                    stored if reads[name] > 1 else None,
                )
            elif key in plan.biases:
                values = plan.bias_values.get(key)
                if values is None:
                    values = index.constant(name)
                values = np.reshape(values, -1)  # a Gemm's (1, N) row: QGemm's int32 bias is 1-D
                stem = _stem(f"{name}_{key[0]}_{key[1]}", taken)
                node.input[i] = _dequantized_bias(
                    stem, values, plan.biases[key], new_nodes, new_inits
                )
            elif name in made_float and not reads_int8(
                node, name, plan.decisions, plan.activations
            ):
                node.input[i] = prequant.get(name, name)  # a float op reads the exact tensor
            elif i == 0 and name in renamed and _weights_exposed(node, plan):
                node.input[i] = (
                    _per_channel_reader(
                        node, index, name, plan.activations[name], per_channel, new_nodes,
                        new_inits, taken,
                    )
                    or renamed[name]
                )  # fmt: skip
            else:
                node.input[i] = renamed.get(name, name)
                if name in initializers:
                    used_float.add(name)
        # an If's or Loop's branch reads as a float op: a kernel's output through its
        # DequantizeLinear (so the kernel fuses with its QuantizeLinear), a float op's as is
        outer = {
            name: prequant.get(name, name) if name in made_float else renamed.get(name, name)
            for name in subgraph_reads(node)
            if name in renamed or name in prequant
        }
        for body in subgraphs(node) if outer else ():
            for inner in body.node:
                rename(inner, outer)
        quantized = [name for name in node.output if name in plan.activations]
        for i, name in enumerate(node.output):
            if name in quantized and name in index.graph_outputs:
                node.output[i] = f"{name}_prequant"
        new_nodes.append(node)
        for name in quantized:
            add_pair(name, plan.activations[name])
    graph.node.extend(new_nodes)
    # a constant output (folded from constants alone) is kept as the initializer it became
    kept = (
        used_float | index.graph_outputs | {n for node in index.nodes for n in subgraph_reads(node)}
    )
    graph.initializer.extend(t for n, t in initializers.items() if n in kept)
    graph.initializer.extend(new_inits)
    floors = {t: float(f) for t, f in plan.floors.items() if t in copies}
    props = {
        **_props(model),
        METADATA_KEY: json.dumps(copies),
        FLOORS_KEY: json.dumps(floors),
        WEIGHTS_KEY: plan.weights,
    }
    helper.set_model_props(out, props)
    quantize_lstm_weights(out, [name for name, d in plan.decisions.items() if d.dynamic])
    return out


def _weights_exposed(node: onnx.NodeProto, plan: Plan) -> bool:
    """Whether `node` is a float op whose float weights ONNX Runtime would quantize."""
    return node.op_type in WEIGHTS_QUANTIZED_BY_ORT and not plan.decisions[node.name].quantized


def _per_channel_reader(
    node: onnx.NodeProto,
    index: GraphIndex,
    tensor: str,
    qparams: QParams,
    made: dict[tuple[str, int], str],
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    taken: set[str],
) -> str | None:
    """The name a float `node` reads quantized `tensor` by: a DequantizeLinear of the same
    codes with the scale and zero point repeated along the channel axis, which ONNX Runtime
    does not take for an int8 unit (the values are the same); None (the shared one) where
    the channels cannot be told (a weight that is not a constant) or there is one channel."""
    axis, channels = _input_channels(node, index)
    if channels < 2:
        return None
    if (tensor, axis) not in made:
        stem = _stem(f"{tensor}_per_channel_{axis}", taken)
        scale = np.full(channels, qparams.scale, qparams.scale.dtype)
        zero_point = np.full(channels, qparams.zero_point, qparams.zero_point.dtype)
        inputs = [f"{tensor}_quantized", f"{stem}_scale", f"{stem}_zero_point"]
        inits.append(numpy_helper.from_array(scale, inputs[1]))
        inits.append(numpy_helper.from_array(zero_point, inputs[2]))
        dq = helper.make_node(
            "DequantizeLinear", inputs, [f"{stem}_dq"], name=f"{stem}_DQ", axis=axis
        )
        nodes.append(dq)
        made[tensor, axis] = f"{stem}_dq"
    return made[tensor, axis]


def _input_channels(node: onnx.NodeProto, index: GraphIndex) -> tuple[int, int]:
    """(axis, length) of the channel axis of a Conv's, ConvTranspose's or Gemm's input 0, as
    its constant weight gives it; length 0 when the weight is not a constant."""
    weight = node.input[1]
    if weight not in index.initializers:
        return 1, 0
    shape = index.initializers[weight].dims
    attrs = attributes(node)
    if node.op_type == "Conv":
        return 1, shape[1] * int(attrs.get("group", 1))
    if node.op_type == "ConvTranspose":
        return 1, shape[0]
    return (0 if attrs.get("transA", 0) else 1), shape[1 if attrs.get("transB", 0) else 0]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _axis(qparams: QParams) -> dict[str, int]:
    g = qparams.scheme.granularity
    return {"axis": g.axis} if isinstance(g, PerChannel) else {}


def _qparam_tensors(name: str, qparams: QParams) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(qparams.scale, f"{name}_scale"),
        numpy_helper.from_array(qparams.zero_point, f"{name}_zero_point"),
    ]


def _pair(
    tensor: str, source: str, target: str, qparams: QParams
) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    inputs = [f"{tensor}_scale", f"{tensor}_zero_point"]
    q = helper.make_node(
        "QuantizeLinear", [source, *inputs], [f"{tensor}_quantized"], name=f"{tensor}_Q"
    )
    dq = helper.make_node(
        "DequantizeLinear", [f"{tensor}_quantized", *inputs], [target], name=f"{tensor}_DQ"
    )
    return q, dq


def _stem(candidate: str, taken: set[str]) -> str:
    """`candidate`, or it with the first counter, such that neither it nor any of its suffixed
    names is taken; all of them taken from now on. A weight's stem, `{weight}_{node}_{input}`,
    repeats another's or an activation's (weight `A` of node `x_n`, weight `A_x` of `n`)."""
    stem, k = candidate, 0
    while stem in taken or any(stem + suffix in taken for suffix in SUFFIXES):
        k += 1
        stem = f"{candidate}_{k}"
    taken.update([stem, *(stem + suffix for suffix in SUFFIXES)])
    return stem


def _dequantized_constant(
    stem: str,
    name: str,
    qparams: QParams,
    codes: np.ndarray,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    stored: dict[tuple, str] | None = None,
) -> str:
    """Integer initializer + DequantizeLinear in place of a float constant; returns the new name.
    With `stored` (the stems already written, by content), the same codes and qparams of the
    same constant get a DequantizeLinear of their own that reads the stored initializers."""
    axis = _axis(qparams)
    if stored is not None:
        digest = hashlib.sha256(np.ascontiguousarray(codes)).digest()
        scale, zero_point = qparams.scale.tobytes(), qparams.zero_point.tobytes()
        content = (name, codes.dtype.str, codes.shape, digest, scale, zero_point, str(axis))
        first = stored.setdefault(content, stem)
        if first != stem:
            return _dq(first, stem, axis, nodes)
    return _behind_dq(stem, codes, qparams.scale, qparams.zero_point, axis, nodes, inits)


def _dequantized_bias(
    stem: str,
    values: np.ndarray,
    scale: np.ndarray,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> str:
    """int32 bias with scale s_x * s_w, zero point 0 (docs/quantization.md, §8)."""
    bias = values.astype(np.float64)
    codes = np.clip(np.rint(bias / scale), INT32.min, INT32.max).astype(np.int32)
    axis = {"axis": 0} if scale.ndim else {}
    zero_point = np.zeros(scale.shape, np.int32)
    return _behind_dq(stem, codes, scale, zero_point, axis, nodes, inits)


def _behind_dq(
    stem: str,
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: dict[str, int],
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> str:
    """Store integer `codes` as initializers and append the DequantizeLinear that reads them."""
    inits.append(numpy_helper.from_array(codes, f"{stem}_quantized"))
    inits.append(numpy_helper.from_array(scale, f"{stem}_scale"))
    inits.append(numpy_helper.from_array(zero_point, f"{stem}_zero_point"))
    return _dq(stem, stem, axis, nodes)


def _dq(source: str, stem: str, axis: dict[str, int], nodes: list[onnx.NodeProto]) -> str:
    """Append a DequantizeLinear of the initializers `source` stored, named after `stem`."""
    inputs = [f"{source}_quantized", f"{source}_scale", f"{source}_zero_point"]
    nodes.append(
        helper.make_node("DequantizeLinear", inputs, [f"{stem}_dq"], name=f"{stem}_DQ", **axis)
    )
    return f"{stem}_dq"


# The suffixes of the tensors this pass adds beside a tensor `t` (`t_quantized`, `t_scale`...).
SUFFIXES = ("_prequant", "_quantized", "_scale", "_zero_point", "_dq")


def free_reserved_names(model: onnx.ModelProto) -> int:
    """Rename in place each tensor named as this pass would name a tensor it adds beside
    another one (`x_quantized` beside `x`: two definitions of one name, which ONNX Runtime
    refuses); returns how many. A graph input or output keeps its name: refused instead."""
    graph = model.graph
    facing = {v.name for v in (*graph.input, *graph.output)}
    names = facing | {t.name for t in graph.initializer}
    names |= {out for node in graph.node for out in node.output}
    typed = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output,
                                                             *graph.value_info)}  # fmt: skip
    typed |= {t.name: t.data_type for t in graph.initializer}
    # a stem of known non-float type (an int64 `length` beside `length_scale`) gets no Q/DQ
    floats = {n for n in names if typed.get(n, 0) in (0, onnx.TensorProto.FLOAT)}  # 0: unknown
    clashes = sorted(n for n in names for s in SUFFIXES if n.endswith(s) and n[: -len(s)] in floats)
    if refused := [n for n in clashes if n in facing]:
        raise ModelError(
            f"the model's inputs or outputs {refused} are named as qdq names the tensors it "
            f"adds (a tensor's name plus {list(SUFFIXES)}); rename them in the model"
        )
    renamed = {}
    for name in clashes:
        fresh, k = f"{name}_", 1
        while fresh in names:
            fresh, k = f"{name}_{k}", k + 1
        renamed[name] = fresh
        names.add(fresh)
    if renamed:
        _rename(graph, renamed)
    return len(renamed)


def _rename(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Every use of the names in `renamed`, subgraphs (which may read outer names) included."""
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
        for subgraph in subgraphs(node):
            _rename(subgraph, renamed)
