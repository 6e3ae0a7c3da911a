"""Empirical bias correction (Nagel et al. 2019, docs/ptq.md): rounding the weights moves each
layer's expected output by `(W_q - W) E[x]`; subtracting that from the bias cancels it.

`E[x]` is the mean input sample seen in calibration, kept whole (not per channel), so that zero
padding, strides, groups and depthwise layers are handled by running the layer's own op on it.
`correct_sequentially` then measures what the rest of the int8 network (activation rounding,
clipping, nonlinearities) does to each layer's mean, and cancels that too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import cache, lru_cache
from itertools import pairwise

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from tqdm import tqdm

from qdq.affine import dequantize
from qdq.data import Samples
from qdq.onnx.graph import GraphIndex
from qdq.onnx.sessions import Use, open_session
from qdq.passes.insert_qdq import insert_qdq
from qdq.plan.build import Plan
from qdq.plan.calibrate import budgeted
from qdq.plan.rules import RULES

CORRECTABLE = ("Conv", "ConvTranspose", "Gemm")
# The sequential correction's batches keep at most this many bytes of tensors alive between
# stretches. Its sessions allocate without an arena, so the heap's high-water mark follows the
# batch: at 16 samples (103 MB alive) the detector's peak varied by 120 MB from run to run.
LIVE_BUDGET = 32 * 2**20


def correction_inputs(index: GraphIndex, plan_nodes: list[str]) -> list[str]:
    """The activation inputs whose mean sample bias correction needs."""
    chosen = set(plan_nodes)
    return [n.input[0] for n in index.nodes if n.name in chosen and n.op_type in CORRECTABLE]


def correct_biases(index: GraphIndex, plan: Plan, means: dict[str, np.ndarray]) -> Plan:
    """`plan` with the corrected float bias of each quantized layer in its `bias_values`."""
    corrected = dict(plan.bias_values)
    for node in index.nodes:
        rule = RULES.get(node.op_type)
        key = (node.name, rule.bias) if rule and rule.bias is not None else None
        if node.op_type not in CORRECTABLE or key not in plan.biases:
            continue
        mean = means.get(node.input[0])
        if mean is None:
            continue
        weight = index.constant(node.input[rule.weight])
        qparams = plan.constants[node.name, rule.weight]
        error = dequantize(plan.codes((node.name, rule.weight), weight), qparams) - weight
        shift = _expected_output(node, mean[None].astype(np.float32), error)
        channel_means = shift.mean(axis=tuple(d for d in range(shift.ndim) if d != 1))
        corrected[key] = index.constant(node.input[rule.bias]) - channel_means
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


def correct_sequentially(
    model: onnx.ModelProto,
    index: GraphIndex,
    plan: Plan,
    samples: Samples,
    batch_size: int,
    count: int,
    progress: bool = False,
) -> Plan:
    """`plan` after sequential empirical bias correction on the first `count` samples: layer by
    layer in graph order, set the bias so that the quantized network's mean output per channel
    equals the float network's, measured with every earlier layer already corrected. Catches the
    bias from upstream activation rounding, clipping and the nonlinearities that turn noise into
    a shift. One pass, a batch at a time: both networks run a stretch of nodes per layer, and
    each quantized layer's output moves by its correction so far (a running mean over the
    batches), as its new bias will move it. Memory: one batch's live tensors, whatever `count`."""
    layers = []
    for node in index.nodes:
        rule = RULES.get(node.op_type)
        if node.op_type in CORRECTABLE and (node.name, rule.bias) in plan.biases:
            layers.append((node, (node.name, rule.bias)))
    if not layers:
        return plan
    ends = [node.name for node, _ in layers]
    reference, quantized = _Stretches(model, ends), _Stretches(insert_qdq(model, plan), ends)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        """One sample first, to size the batches by the tensors it kept alive (as calibrate)."""
        yield next(samples.batches(1))
        size = budgeted(batch_size, max(reference.peak_bytes, quantized.peak_bytes), LIVE_BUDGET)
        yield from samples.batches(size, first=1, last=count)

    corrections: list[np.ndarray | float] = [0.0] * len(layers)  # per channel, once seen
    seen = 0
    with tqdm(total=min(count, samples.count), desc="correcting biases", unit="sample",
              disable=not progress, leave=False) as bar:  # fmt: skip
        for feed in batches():
            float_means = [_mean_per_channel(output) for _, output in reference.run(feed)]
            _trim_heap()
            batch = len(next(iter(feed.values())))
            seen += batch
            for layer, output in quantized.run(feed):
                needed = _mean_per_channel(output) - float_means[layer]
                corrections[layer] += (needed - corrections[layer]) * batch / seen
                shape = (-1, *[1] * (output.ndim - 2))
                output -= corrections[layer].reshape(shape).astype(output.dtype)
            _trim_heap()
            bar.update(batch)
    corrected = dict(plan.bias_values)
    for (node, key), correction in zip(layers, corrections, strict=True):
        corrected[key] = corrected.get(key, index.constant(node.input[key[1]])) - correction
    return replace(plan, bias_values=corrected)


class _Stretches:
    """A model cut after each of some nodes into stretches that run one after another, each a
    session of its own, so that a caller can change a node's output before the rest reads it.
    Only the tensors that later stretches read are kept (memory: one batch's live tensors)."""

    def __init__(self, model: onnx.ModelProto, ends: list[str]) -> None:
        nodes = list(model.graph.node)
        positions = {node.name: i for i, node in enumerate(nodes)}
        bounds = [0, *(positions[name] + 1 for name in ends)]
        self.last_read = {name: i for i, node in enumerate(nodes) for name in _reads(node)}
        self.parts = [nodes[a:b] for a, b in pairwise(bounds)]
        self.ends = bounds[1:]
        self.model = model
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.peak_bytes = 0  # the most bytes of kept tensors so far
        self.sessions: list[tuple] = []  # (session, its inputs, its kept outputs) per stretch

    def run(self, feed: dict[str, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """Run `feed` through every stretch, yielding `(i, output)` of the node that ends
        stretch `i`; the caller may change `output` in place before the next stretch reads it."""
        values = dict(feed)
        for i, end in enumerate(self.ends):
            if len(self.sessions) == i:
                self.sessions.append(self._session(i, values))
            session, inputs, outputs = self.sessions[i]
            results = session.run(outputs, {name: values[name] for name in inputs})
            values = {k: v for k, v in values.items() if self.last_read.get(k, -1) >= end}
            values.update(zip(outputs, results, strict=True))
            self.peak_bytes = max(self.peak_bytes, sum(v.nbytes for v in values.values()))
            yield i, values[self.parts[i][-1].output[0]]

    def _session(self, i: int, values: dict[str, np.ndarray]) -> tuple:
        """Stretch `i`'s session, its inputs (of those in `values`) and its kept outputs."""
        part, end = self.parts[i], self.ends[i]
        reads = list(dict.fromkeys(name for node in part for name in _reads(node)))
        inputs = [name for name in reads if name in values]
        outputs = [o for n in part for o in n.output if self.last_read.get(o, -1) >= end]
        outputs = list(dict.fromkeys([*outputs, part[-1].output[0]]))
        graph = helper.make_graph(
            part,
            f"stretch{i}",
            [_value_info(name, values[name]) for name in inputs],
            [onnx.ValueInfoProto(name=name) for name in outputs],
            [self.initializers[name] for name in reads if name in self.initializers],
        )
        model = helper.make_model(
            graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version
        )
        return open_session(model, Use.STRETCH), inputs, outputs


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _trim_heap() -> None:
    """Hand the heap's freed pages back to the OS. The stretch sessions allocate without an
    arena, and glibc's heap, fragmented by their different sizes, grew batch after batch (the
    PP-OCRv4 detector's peak: 803 MB with 32 samples, 921 MB with 512; trimmed, flat)."""
    if trim := _malloc_trim():
        trim(0)


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors `node` reads, those its subgraphs read from outside included."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in (
            [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
        ):
            names.extend(name for inner in graph.node for name in _reads(inner))
    return names


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    """A graph input of `value`'s element type, shape left open."""
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), None)


def _mean_per_channel(value: np.ndarray) -> np.ndarray:
    """The per-channel (axis 1) mean of `value`, accumulated in float64."""
    return value.mean(axis=tuple(d for d in range(value.ndim) if d != 1), dtype=np.float64)
