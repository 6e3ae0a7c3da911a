"""Per-layer sensitivity: how much the output SQNR gains when one layer alone runs in float."""

from __future__ import annotations

import onnx

from qdq.metrics import ErrorStats
from qdq.onnx.model import float_outputs
from qdq.onnx.sessions import Use, open_session


def layer_sensitivity(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    nodes: list[str],
    feeds: list[dict],
) -> dict[str, float]:
    """{node: output SQNR (dB) with `node` reading float activations, minus the INT8 model's}
    on `feeds`, the float outputs pooled (every output where none is float: a class index's
    error is how far apart two class numbers happen to be). The node's weights keep their int8
    rounding: the INT8 file does not hold the float weights (after folding they differ from the
    FP32 file's)."""
    names = float_outputs(reference) or [o.name for o in reference.graph.output]
    ref_session = open_session(reference, Use.CHECK)
    want = [ref_session.run(names, feed) for feed in feeds]
    base = _sqnr(open_session(quantized, Use.CHECK), names, feeds, want)
    return {
        node: _sqnr(open_session(bypassed(quantized, node), Use.CHECK), names, feeds, want) - base
        for node in nodes
    }


def bypassed(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """A copy of `model` where `node_name` reads the float tensors its input Q/DQ pairs copy,
    and its consumers read its float output instead of the output's Q/DQ copy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = out.graph.node
    producer = {o: n for n in nodes for o in n.output}
    target = next(n for n in nodes if n.name == node_name)
    for i, name in enumerate(target.input):
        dq = producer.get(name)
        q = (
            producer.get(dq.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear"
            else None
        )
        if q is not None and q.op_type == "QuantizeLinear":
            target.input[i] = q.input[0]
    copies = {
        n.output[0] for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] in target.output
    }
    graph_outputs = {o.name for o in out.graph.output}
    for dq in [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in copies]:
        float_tensor = producer[dq.input[0]].input[0]
        for consumer in nodes:
            for i, read in enumerate(consumer.input):
                if read == dq.output[0]:
                    consumer.input[i] = float_tensor
        if dq.output[0] in graph_outputs:  # a quantized output's copy, named as the output:
            dq.op_type, dq.domain = "Identity", ""  # it gives the float value instead
            del dq.input[:], dq.attribute[:]
            dq.input.append(float_tensor)
    return out


def _sqnr(session, names: list[str], feeds: list[dict], want: list[list]) -> float:
    stats = ErrorStats()
    for feed, expected in zip(feeds, want, strict=True):
        for ref, got in zip(expected, session.run(names, feed), strict=True):
            stats.update(ref, got)
    return stats.sqnr_db
