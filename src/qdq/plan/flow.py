"""Which tensors calibration must observe, and which take another tensor's range instead.

Every observed tensor costs twice: ONNX Runtime must keep it as an extra output (and may not fuse
across it), and its observer must histogram it. An output that its Relu/Clip absorbs takes the
activation's range, and an output that no node can read as int8 needs none (docs/ptq.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex, clip_bounds
from qdq.plan.rules import FLOAT_OUTPUT_KERNELS, FLOAT_WHEN_UNREAD, RULES, rule_inputs

if TYPE_CHECKING:
    from qdq.plan.build import Decision


def calibration_targets(
    index: GraphIndex, decisions: dict[str, Decision], config: QuantConfig
) -> list[str]:
    """Non-constant float tensors that a quantized node reads or writes: the ones to observe.

    Left out: outputs that a Relu/Clip will absorb (they take the activation's range, and
    observing them would stop ONNX Runtime fusing Conv and Relu/Clip in the calibration session:
    33 of EfficientNet-Lite0's 95 tensors), outputs that no node can read as int8 (their Q/DQ
    would be pruned: a transformer's MatMul outputs that only float bias Adds read), and gate
    outputs that only elementwise ops read (`gated`)."""
    skipped = {**absorbed(index, decisions, config), **dict.fromkeys(unread(index, decisions))}
    skipped |= dict.fromkeys(gated(index))
    targets: dict[str, None] = {}
    for node in index.nodes:
        if not decisions[node.name].quantized:
            continue
        rule = RULES[node.op_type]
        names = [node.input[i] for i in rule_inputs(node, rule)] + [node.output[0]]
        if rule.kind in ("inherit", "activation"):  # a constant table's rows need no range
            names = [] if index.is_constant(node.input[0]) else [node.input[0], *node.output]
        if rule.kind == "gate":  # its output's grid is [0, 1]; it reads int8 only if it flows
            names = []
        for name in names:
            if name in skipped or not name or index.is_constant(name):
                continue
            if index.is_float(name):
                targets[name] = None
    return list(targets)


def gated(index: GraphIndex) -> list[str]:
    """Sigmoid/HardSigmoid outputs that only elementwise ops read (SiLU's, HardSwish's, a
    squeeze-excitation's Mul): they get the fixed [0, 1] grid where the gate is int8, and where
    it is float its readers are float too (they need int8 in on every input), so no range."""

    def kind(node: onnx.NodeProto) -> str | None:
        rule = RULES.get(node.op_type)
        return rule.kind if rule else None

    return [
        node.output[0]
        for node in index.nodes
        if kind(node) == "gate"
        and all(kind(c) == "elementwise" for c in index.consumers.get(node.output[0], []))
    ]


def unread(index: GraphIndex, decisions: dict[str, Decision]) -> list[str]:
    """Outputs of int8 MatMul/Gemm and elementwise ops that every reader takes in float, as far
    as the graph alone tells: `plan._prune_unread` would drop their Q/DQ, so they need no range."""
    found = []
    for node in index.nodes:
        if not decisions[node.name].quantized:
            continue
        kind = RULES[node.op_type].kind
        if node.op_type not in FLOAT_OUTPUT_KERNELS and kind not in FLOAT_WHEN_UNREAD:
            continue
        out = node.output[0]
        if not any(decisions[c.name].quantized for c in index.consumers.get(out, [])):
            found.append(out)
    return found


def absorbed(
    index: GraphIndex, decisions: dict[str, Decision], config: QuantConfig
) -> dict[str, str]:
    """Outputs whose Relu/Clip will be absorbed into the producer's range, each mapped to the
    activation's output, whose range it takes."""
    found = {}
    for node in index.nodes:
        producer = index.producer.get(node.input[0]) if node.input else None
        if (
            node.op_type in ("Relu", "Clip")
            and decisions[node.name].quantized
            and producer is not None
            and absorbs(node, producer, index, decisions, config)
        ):
            found[node.input[0]] = node.output[0]
    return found


def absorbs(
    node: onnx.NodeProto,
    producer: onnx.NodeProto,
    index: GraphIndex,
    decisions: dict[str, Decision],
    config: QuantConfig,
) -> bool:
    """Whether Relu/Clip `node` can be dropped into its quantized producer's output grid: the
    grid's lowest code is real 0, so the Q after the activation clamps exactly as it does, and
    ONNX Runtime then drops the activation and fuses producer and Q (docs/ptq.md)."""
    return (
        not config.symmetric_activations
        and _clamps_at_zero(node, index)
        and decisions[producer.name].quantized
        and RULES[producer.op_type].kind in ("compute", "elementwise")
        and index.sole_consumer(node.input[0]) is not None
    )


def _clamps_at_zero(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type == "Relu":
        return True
    return clip_bounds(node, index)[0] == 0.0
