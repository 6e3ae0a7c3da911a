"""Empirical bias correction (Nagel et al. 2019, docs/ptq.md): rounding the weights moves each
layer's expected output by `(W_q - W) E[x]`; subtracting that from the bias cancels it.

`E[x]` is the mean input sample seen in calibration, kept whole (not per channel), so that zero
padding, strides, groups and depthwise layers are handled by running the layer's own op on it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from qdq.affine import dequantize
from qdq.graph.plan import Plan
from qdq.graph.rules import RULES
from qdq.graph.structure import GraphIndex, attributes

CORRECTABLE = ("Conv", "ConvTranspose", "Gemm")


def correction_inputs(index: GraphIndex, plan_nodes: list[str]) -> list[str]:
    """The activation inputs whose mean sample bias correction needs."""
    chosen = set(plan_nodes)
    return [n.input[0] for n in index.nodes if n.name in chosen and n.op_type in CORRECTABLE]


def correct_biases(index: GraphIndex, plan: Plan, means: dict[str, np.ndarray]) -> None:
    """Store in `plan.bias_values` the corrected float bias of each quantized layer."""
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
        plan.bias_values[key] = index.constant(node.input[rule.bias]) - channel_means


def _expected_output(node: onnx.NodeProto, mean: np.ndarray, error: np.ndarray) -> np.ndarray:
    """The node's own op applied to the mean input with the weight error as weight, no bias."""
    single = helper.make_node(node.op_type, ["x", "w"], ["y"], **attributes(node))
    graph = helper.make_graph(
        [single],
        "bias_correction",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, mean.shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(error.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": mean})[0].astype(np.float64)


def correct_sequentially(
    model: onnx.ModelProto, index: GraphIndex, plan: Plan, feeds: list[dict[str, np.ndarray]]
) -> None:
    """Sequential empirical bias correction: layer by layer in graph order, set the bias so that
    the quantized network's mean output per channel equals the float network's, measured with
    every earlier layer already corrected. Catches the bias from upstream activation rounding
    and clipping too; costs one pass of the calibration subset per layer."""
    from qdq.graph.capture import session_with_outputs  # local: capture imports the planner
    from qdq.graph.qdq_pass import insert_qdq

    layers = []
    for node in index.nodes:
        rule = RULES.get(node.op_type)
        if node.op_type in CORRECTABLE and (node.name, rule.bias) in plan.biases:
            layers.append((node, (node.name, rule.bias)))
    if not layers:
        return
    names = [node.output[0] for node, _ in layers]
    reference = session_with_outputs(model, names)
    float_means = _channel_means(reference, names, feeds)
    for node, key in layers:
        session = session_with_outputs(insert_qdq(model, plan), [node.output[0]])
        shift = _channel_means(session, [node.output[0]], feeds)[node.output[0]]
        current = plan.bias_values.get(key, index.constant(node.input[key[1]]))
        plan.bias_values[key] = current - (shift - float_means[node.output[0]])


def _channel_means(session, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict:
    """Per-channel (axis 1) means of tensors `names` over all `feeds`."""
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)  # values per channel differ by tensor (spatial size)
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            sums[name] = sums[name] + value.sum(axis=tuple(d for d in range(value.ndim) if d != 1))
            counts[name] += value.size // value.shape[1]
    return {name: sums[name] / counts[name] for name in names}
