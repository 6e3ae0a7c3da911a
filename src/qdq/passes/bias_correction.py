"""Empirical bias correction (Nagel et al. 2019, docs/ptq.md): rounding the weights moves each
layer's expected output by `(W_q - W) E[x]`; subtracting that from the bias cancels it.

`E[x]` is the mean input sample seen in calibration, kept whole (not per channel), so that zero
padding, strides, groups and depthwise layers are handled by running the layer's own op on it.
`correct_sequentially` then measures what the rest of the int8 network (activation rounding,
clipping, nonlinearities) does to each layer's mean, and cancels that too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from functools import lru_cache
from itertools import chain

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from tqdm import tqdm

from qdq.affine import dequantize
from qdq.data import Samples
from qdq.onnx.graph import GraphIndex
from qdq.onnx.sessions import Use, open_session
from qdq.passes.insert_qdq import insert_qdq
from qdq.plan.build import Plan
from qdq.plan.calibrate import budgeted
from qdq.plan.rules import RULES
from qdq.plan.sample_stats import ChannelMeans

CORRECTABLE = ("Conv", "ConvTranspose", "Gemm")


def correction_inputs(index: GraphIndex, plan_nodes: list[str]) -> list[str]:
    """The activation inputs whose mean sample bias correction needs."""
    chosen = set(plan_nodes)
    return [n.input[0] for n in index.nodes if n.name in chosen and n.op_type in CORRECTABLE]


def correct_biases(
    index: GraphIndex,
    plan: Plan,
    means: dict[str, np.ndarray],
    memo: dict[tuple, np.ndarray] | None = None,
) -> Plan:
    """`plan` with the corrected float bias of each quantized layer in its `bias_values`.
    `memo` keeps each layer's correction for the next plan of the same `means`: a layer's
    correction depends only on its own weight grid, and the plans of the frontier, the range
    method's choice and the accuracy search re-plan every layer on the same grids (a quarter of
    the search's time went to correcting the same layers again)."""
    corrected = dict(plan.bias_values)
    for node in index.nodes:
        rule = RULES.get(node.op_type)
        key = (node.name, rule.bias) if rule and rule.bias is not None else None
        if node.op_type not in CORRECTABLE or key not in plan.biases:
            continue
        mean = means.get(node.input[0])
        if mean is None:
            continue
        weight_key = (node.name, rule.weight)
        qparams = plan.constants[weight_key]
        learned = plan.given_codes(weight_key)
        grid = (
            node.name,
            qparams.scale.tobytes(),
            qparams.zero_point.tobytes(),
            qparams.scheme,
            None if learned is None else hashlib.sha256(learned.tobytes()).digest(),
        )
        bias = None if memo is None else memo.get(grid)
        if bias is None:
            weight = index.constant(node.input[rule.weight])
            error = dequantize(plan.codes(weight_key, weight), qparams) - weight
            shift = _expected_output(node, mean[None].astype(np.float32), error)
            channel_means = shift.mean(axis=tuple(d for d in range(shift.ndim) if d != 1))
            bias = index.constant(node.input[rule.bias]) - channel_means
            if memo is not None:
                memo[grid] = bias
        corrected[key] = bias
    return replace(plan, bias_values=corrected)


def _expected_output(node: onnx.NodeProto, mean: np.ndarray, error: np.ndarray) -> np.ndarray:
    """The node's own op applied to the mean input with the weight error as weight, no bias."""
    attrs = tuple(a.SerializeToString() for a in node.attribute)
    session = _one_op(node.op_type, attrs, mean.shape, error.shape)
    w = error.astype(np.float32)
    return session.run(None, {"x": mean, "w": w})[0].astype(np.float64)


@lru_cache(maxsize=512)
def _one_op(
    op_type: str, attrs: tuple[bytes, ...], x_shape: tuple[int, ...], w_shape: tuple[int, ...]
) -> ort.InferenceSession:
    """A session of one op reading `x` and its weight `w` as inputs, kept for the next plan:
    the accuracy search and the layout probe replan, and each plan corrects every layer again
    (opening a session per layer and plan had been a sixth of the search's time)."""
    single = helper.make_node(op_type, ["x", "w"], ["y"])
    for serialized in attrs:
        single.attribute.add().ParseFromString(serialized)
    graph = helper.make_graph(
        [single],
        "bias_correction",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape),
            helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, w_shape),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # One thread: a kept session's idle pool threads would spin and take the cores from the
    # work between its runs (with the default pools the search ran 2x slower); one sample needs
    # no more.
    return open_session(model, threads=1)


def correctable_outputs(index: GraphIndex, quantized: list[str]) -> list[str]:
    """The outputs of the layers among `quantized` that the sequential correction may correct
    (whose float means per channel calibration can take on the way)."""
    wanted = set(quantized)
    return [n.output[0] for n in index.nodes if n.name in wanted and n.op_type in CORRECTABLE]


def correct_sequentially(
    model: onnx.ModelProto,
    index: GraphIndex,
    plan: Plan,
    samples: Samples,
    batch_size: int,
    count: int,
    progress: bool = False,
    float_means: Mapping[str, ChannelMeans] | None = None,
) -> Plan:
    """`plan` after sequential empirical bias correction on the first `count` samples: layer by
    layer in graph order, set the bias so that the quantized network's mean output per channel
    equals the float network's, measured with every earlier layer already corrected. Catches the
    bias from upstream activation rounding, clipping and the nonlinearities that turn noise into
    a shift. One pass, a batch at a time: the float network gives each layer's mean output per
    channel, and the quantized network, run whole, moves each layer's output by its correction
    so far (a running mean over the batches, this batch's included) inside the graph, as its
    new bias will move it, before the next layer reads it. Memory: one batch's tensors, the
    batch sized as calibration sizes its own, whatever `count`. Where `float_means` holds every
    layer's float means per channel on the first `count` samples (calibration takes them), the
    float network does not run again."""
    layers = []
    for node in index.nodes:
        rule = RULES.get(node.op_type)
        if node.op_type in CORRECTABLE and (node.name, rule.bias) in plan.biases:
            layers.append((node, (node.name, rule.bias)))
    if not layers:
        return plan
    outputs = [node.output[0] for node, _ in layers]
    ranks = [
        2 if node.op_type == "Gemm" else index.constant(node.input[1]).ndim for node, _ in layers
    ]
    means = [_MEAN.format(i) for i in range(len(layers))]
    quantized = open_session(_correcting(insert_qdq(model, plan), outputs, ranks), Use.CALIBRATION)
    wanted = [_CORRECTION.format(i) for i in range(len(layers))]
    taken = [(float_means or {}).get(name) for name in outputs]
    rows = [None if t is None else t.values for t in taken]
    if all(r is not None and len(r) >= min(count, samples.count) for r in rows):
        size = budgeted(batch_size, sum(t.sample_bytes for t in taken))
        batches = _taken_means(samples, rows, size, count)
    else:
        averaging = _averaging(model, outputs, ranks)
        batches = _float_means(samples, averaging, outputs, means, batch_size, count)

    corrections = [  # one per channel: a Gemm's (1, N) bias takes its (N,) correction
        np.zeros(index.constant(node.input[k[1]]).size, np.float32) for node, k in layers
    ]
    seen = 0
    with tqdm(total=min(count, samples.count), desc="correcting biases", unit="sample",
              disable=not progress, leave=False) as bar:  # fmt: skip
        for feed, layer_means in batches:
            batch = samples.held_in(feed)
            seen += batch
            inputs = dict(feed, **{_WEIGHT: np.array(batch / seen, np.float32)})
            inputs.update(zip(means, layer_means, strict=True))
            inputs.update(zip(map(_SO_FAR.format, range(len(layers))), corrections, strict=True))
            corrections = quantized.run(wanted, inputs)
            bar.update(batch)
    corrected = dict(plan.bias_values)
    for (node, key), correction in zip(layers, corrections, strict=True):
        base = corrected.get(key, index.constant(node.input[key[1]]))
        corrected[key] = base - correction.astype(np.float64)
    return replace(plan, bias_values=corrected)


def _taken_means(
    samples: Samples, rows: list[np.ndarray], size: int, count: int
) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """Each batch of the first `count` samples, and its float means per layer from `rows`
    (per sample, as calibration took them): a batch's mean is its samples' mean, all of one
    shape. One sample first, as `_float_means` batches them."""
    start = 0
    for feed in chain(samples.batches(1, last=1), samples.batches(size, first=1, last=count)):
        end = start + samples.held_in(feed)
        yield feed, [r[start:end].mean(axis=0).astype(np.float32) for r in rows]
        start = end


def _float_means(
    samples: Samples,
    averaging: onnx.ModelProto,
    outputs: list[str],
    means: list[str],
    batch_size: int,
    count: int,
) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """Each batch of the first `count` samples and the float means of its layer outputs, from
    the float network (`_averaging`, whose `means` are those of `outputs`): one sample first,
    to size the batches by the layer outputs it yields (as calibration does by what it
    captures)."""
    reference = open_session(averaging, Use.CALIBRATION)
    first = next(samples.batches(1))
    values = reference.run([*outputs, *means], first)
    yield first, values[len(outputs) :]
    size = budgeted(batch_size, sum(v.nbytes for v in values[: len(outputs)]))
    for feed in samples.batches(size, first=1, last=count):
        yield feed, reference.run(means, feed)


# Tensors the sequential correction's graphs add, per corrected layer i.
_MEAN = "qdq_sequential/{}/float_mean"  # the float network's mean per channel, this batch
_WEIGHT = "qdq_sequential/weight"  # this batch's share of the samples seen so far
_SO_FAR = "qdq_sequential/{}/so_far"  # the correction before this batch
_CORRECTION = "qdq_sequential/{}/correction"  # the correction after it


def _averaging(model: onnx.ModelProto, outputs: list[str], ranks: list[int]) -> onnx.ModelProto:
    """`model` whose outputs are `outputs` (of rank `ranks`) and the mean per channel of each
    (`_MEAN`; the outputs themselves only size the batches: one sample fetches them)."""
    averaging = onnx.ModelProto()
    averaging.CopyFrom(model)
    graph = averaging.graph
    del graph.output[:]
    for i, (name, rank) in enumerate(zip(outputs, ranks, strict=True)):
        _add_mean(averaging, name, _MEAN.format(i), rank)
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    graph.output.extend(onnx.ValueInfoProto(name=_MEAN.format(i)) for i in range(len(outputs)))
    _prune(graph)
    return averaging


def _correcting(model: onnx.ModelProto, outputs: list[str], ranks: list[int]) -> onnx.ModelProto:
    """`model` with each of `outputs` (of rank `ranks`) moved by its running correction before
    any node reads it: `so_far + (mean per channel - float mean - so_far) * weight` (the
    running mean over batches of the quantized mean's excess), which it outputs."""
    corrected = onnx.ModelProto()
    corrected.CopyFrom(model)
    graph = corrected.graph
    del graph.output[:]
    renamed = {name: f"{name}/uncorrected" for name in outputs}
    constants = {t.name: t for t in graph.initializer}
    producers = {o: node for node in graph.node for o in node.output}
    for node in graph.node:
        if node.output[0] in renamed:  # its weight and bias as float constants (see below)
            node.input[1:] = [_dequantized(name, producers, constants) for name in node.input[1:]]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    known = {t.name for t in graph.initializer}
    graph.initializer.extend(t for name, t in constants.items() if name not in known)
    graph.input.append(helper.make_tensor_value_info(_WEIGHT, onnx.TensorProto.FLOAT, []))
    for i, (name, rank) in enumerate(zip(outputs, ranks, strict=True)):
        step, so_far, out = f"qdq_sequential/{i}/", _SO_FAR.format(i), _CORRECTION.format(i)
        _add_mean(corrected, renamed[name], step + "mean", rank)
        shape = np.array([-1, *[1] * (rank - 2)], np.int64)
        graph.initializer.append(numpy_helper.from_array(shape, step + "shape"))
        graph.node.extend([
            helper.make_node("Sub", [step + "mean", _MEAN.format(i)], [step + "excess"]),
            helper.make_node("Sub", [step + "excess", so_far], [step + "change"]),
            helper.make_node("Mul", [step + "change", _WEIGHT], [step + "step"]),
            helper.make_node("Add", [so_far, step + "step"], [out]),
            helper.make_node("Reshape", [out, step + "shape"], [step + "broadcast"]),
            helper.make_node("Sub", [renamed[name], step + "broadcast"], [name]),
        ])  # fmt: skip
        for value in (_MEAN.format(i), so_far):
            graph.input.append(helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, [None]))
        graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [None]))
    _prune(graph)
    return corrected


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes `graph`'s outputs do not need: those after the last corrected layer (ONNX
    Runtime runs every node whichever outputs are asked for; the LSTM behind ddddocr's CNN had
    doubled the correction's time)."""
    nodes = list(graph.node)
    producers = {o: i for i, node in enumerate(nodes) for o in node.output}
    kept: set[int] = set()
    wanted = [o.name for o in graph.output]
    while wanted:
        i = producers.get(wanted.pop())
        if i is not None and i not in kept:
            kept.add(i)
            wanted.extend(_reads(nodes[i]))
    needed = [onnx.NodeProto() for _ in kept]
    for copy, i in zip(needed, sorted(kept), strict=True):
        copy.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(needed)


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors `node` reads, those its subgraphs read from outside included."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in (
            [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
        ):
            names.extend(name for inner in graph.node for name in _reads(inner))
    return names


def _add_mean(model: onnx.ModelProto, name: str, mean: str, rank: int) -> None:
    """Append to `model`'s graph a node writing the mean per channel (axis 1) of `name`, a
    tensor of `rank` dimensions, to `mean`."""
    axes = [d for d in range(rank) if d != 1]
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:  # axes became an input
        model.graph.initializer.append(numpy_helper.from_array(np.array(axes), f"{mean}/axes"))
        node = helper.make_node("ReduceMean", [name, f"{mean}/axes"], [mean], keepdims=0)
    else:
        node = helper.make_node("ReduceMean", [name], [mean], axes=axes, keepdims=0)
    model.graph.node.append(node)


def _dequantized(
    name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, onnx.TensorProto]
) -> str:
    """`name`, or where a DequantizeLinear of constants makes it, a float initializer of the
    same values (as ONNX Runtime computes them: `float(q - zero point) * scale`), added to the
    graph. ONNX Runtime keeps such a DequantizeLinear unfolded (for its int8 fusions), so a
    layer read through one runs as a plain float convolution, without the blocked layout
    that needs constant weights: with them, the corrected graph ran EfficientNet-Lite0 3x
    slower than the float one."""
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return name
    if not all(i in constants for i in node.input if i):
        return name
    q, scale, *zero = (numpy_helper.to_array(constants[i]) for i in node.input if i)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
    shape = [-1 if d == axis else 1 for d in range(q.ndim)] if scale.ndim else []  # per axis
    zero_point = zero[0].astype(np.int64).reshape(shape) if zero else 0
    value = (q.astype(np.int64) - zero_point).astype(np.float32) * scale.reshape(shape)
    folded = f"{name}/float"
    graph_constant = numpy_helper.from_array(value, folded)
    constants[folded] = graph_constant
    return folded
