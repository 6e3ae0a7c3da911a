"""Where int8 flows: the one analysis that planning, calibration targets and smoothing ask.

Static questions, answered from the graph and the static decisions (`Int8Flow`): which tensors
int8 can flow into, which outputs a Relu/Clip absorbs, which outputs no node reads as int8
(`unread`), which gate outputs only elementwise ops read (`gated`), and so which tensors
calibration must observe. The plan being built asks the dynamic ones (`reads_int8`,
`prune_unread`) once it knows which tensors get a Q/DQ pair; `unread` is the static shadow of
`prune_unread`, so calibration does not observe what the plan will drop.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import onnx

from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex, clip_bounds
from qdq.plan.decisions import FLOAT_OUTPUT, NOTHING_READS_INT8, Decision
from qdq.plan.rules import (
    FLOAT_OUTPUT_KERNELS,
    FLOAT_WHEN_UNREAD,
    INPUTS_ONLY,
    RULES,
    Kind,
    OpRule,
    rule_inputs,
    rules_for,
)


class Int8Flow:
    """Where int8 can flow in `index`'s graph under the static `decisions`."""

    def __init__(
        self, index: GraphIndex, decisions: Mapping[str, Decision], config: QuantConfig
    ) -> None:
        self.index, self.decisions, self.rules = index, decisions, rules_for(config)
        self.absorbed = _absorbed(index, decisions, config)
        self.unread = frozenset(_unread(index, decisions, self.rules))
        self.gated = frozenset(_gated(index, self.rules))
        self._carries: dict[str, bool] = {}

    def carries(self, tensor: str) -> bool:
        """Whether int8 can flow into `tensor` by the static decisions alone."""
        if tensor not in self._carries:
            self._carries[tensor] = self._flows_into(tensor)
        return self._carries[tensor]

    def _flows_into(self, tensor: str) -> bool:
        index = self.index
        producer = index.producer.get(tensor)
        if producer is None:
            return not index.is_constant(tensor)  # a graph input is quantized where it enters
        if not self.decisions[producer.name].quantized:
            return False
        kind = self.rules[producer.op_type].kind
        if kind is Kind.COMPUTE:
            return True
        if kind in INPUTS_ONLY:  # its output stays float in the file
            return False
        if kind in (Kind.INHERIT, Kind.ACTIVATION):
            source = producer.input[0]  # a constant one is a Gather's table, stored in 8 bits
            return index.is_constant(source) or self.carries(source)
        # elementwise or shared: int8 only if it flows into every input
        inputs = [name for name in producer.input if name and not index.is_constant(name)]
        return all(self.carries(name) for name in inputs)

    def calibration_targets(self) -> list[str]:
        """Non-constant float tensors that a quantized node reads or writes: the ones to observe.

        Left out: outputs that a Relu/Clip will absorb (they take the activation's range, and
        observing them would stop ONNX Runtime fusing Conv and Relu/Clip in the calibration
        session: 33 of EfficientNet-Lite0's 95 tensors), outputs that no node can read as int8
        (`unread`: a transformer's MatMul outputs that only float bias Adds read), and gate
        outputs that only elementwise ops read (`gated`)."""
        index = self.index
        skipped = self.absorbed.keys() | self.unread | self.gated
        targets: dict[str, None] = {}
        for node in index.nodes:
            if not self.decisions[node.name].quantized:
                continue
            rule = self.rules[node.op_type]
            names = [node.input[i] for i in rule_inputs(node, rule)]
            if rule.kind not in INPUTS_ONLY:
                names.append(node.output[0])
            if rule.kind in (Kind.INHERIT, Kind.ACTIVATION):  # a table's rows need no range
                names = [] if index.is_constant(node.input[0]) else [node.input[0], *node.output]
            if rule.kind is Kind.GATE:  # its output's grid is [0, 1]; it reads int8 if it flows
                names = []
            for name in names:
                if name in skipped or not name or index.is_constant(name):
                    continue
                if index.is_float(name):
                    targets[name] = None
        return list(targets)


def _gated(index: GraphIndex, rules: Mapping[str, OpRule]) -> list[str]:
    """Sigmoid/HardSigmoid outputs that only elementwise ops read (SiLU's, HardSwish's, a
    squeeze-excitation's Mul): they get the fixed [0, 1] grid where the gate is int8, and where
    it is float its readers are float too (they need int8 in on every input), so no range."""

    def kind(node: onnx.NodeProto) -> Kind | None:
        rule = rules.get(node.op_type)
        return rule.kind if rule else None

    return [
        node.output[0]
        for node in index.nodes
        if kind(node) is Kind.GATE
        and all(kind(c) is Kind.ELEMENTWISE for c in index.consumers.get(node.output[0], []))
    ]


def _unread(
    index: GraphIndex, decisions: Mapping[str, Decision], rules: Mapping[str, OpRule]
) -> list[str]:
    """Outputs of int8 MatMul/Gemm and elementwise ops that every reader takes in float, as far
    as the graph alone tells: `prune_unread` would drop their Q/DQ, so they need no range."""
    found = []
    for node in index.nodes:
        if not decisions[node.name].quantized:
            continue
        kind = rules[node.op_type].kind
        if node.op_type not in FLOAT_OUTPUT_KERNELS and kind not in FLOAT_WHEN_UNREAD:
            continue
        out = node.output[0]
        if not any(decisions[c.name].quantized for c in index.consumers.get(out, [])):
            found.append(out)
    return found


def _absorbed(
    index: GraphIndex, decisions: Mapping[str, Decision], config: QuantConfig
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
    decisions: Mapping[str, Decision],
    config: QuantConfig,
) -> bool:
    """Whether Relu/Clip `node` can be dropped into its quantized producer's output grid: the
    grid's lowest code is real 0, so the Q after the activation clamps exactly as it does, and
    ONNX Runtime then drops the activation and fuses producer and Q (docs/ptq.md)."""
    return (
        not config.activations.symmetric
        and _clamps_at_zero(node, index)
        and decisions[producer.name].quantized
        and rules_for(config)[producer.op_type].kind in (Kind.COMPUTE, Kind.ELEMENTWISE)
        and index.sole_consumer(node.input[0]) is not None
    )


def _clamps_at_zero(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A Relu, or a Clip from 0 whose upper bound is constant or absent: ONNX Runtime drops a
    Clip into its QuantizeLinear only with constant bounds (a computed max kept the Clip, and
    its Conv ran float)."""
    if node.op_type == "Relu":
        return True
    low, high = clip_bounds(node, index)
    return low == 0.0 and high is not None


def reads_int8(
    consumer: onnx.NodeProto,
    tensor: str,
    decisions: Mapping[str, Decision],
    quantized: Container[str],
    rules: Mapping[str, OpRule] = RULES,
) -> bool:
    """Whether `consumer` reads `tensor` through its Q/DQ pair; `quantized` holds the tensors
    that have one. Any other consumer reads the float tensor itself, which is exact. (Every
    op of `TENSORRT_RULES` quantizes the same inputs as in `RULES`, so the default serves the
    rewrite under either placement.)"""
    if not decisions[consumer.name].quantized:
        return False
    rule = rules[consumer.op_type]
    if rule.kind in (Kind.INHERIT, Kind.ACTIVATION):
        return any(o in quantized for o in consumer.output)
    return tensor in (consumer.input[i] for i in rule_inputs(consumer, rule))


def prune_unread(
    index: GraphIndex,
    decisions: dict[str, Decision],
    wanted: dict[str, None],
    rules: Mapping[str, OpRule] = RULES,
) -> None:
    """Drop, from a plan being built, the Q/DQ of outputs that no consumer reads as int8, last
    node first; updates its working `decisions` and `wanted` (tensors that get a Q/DQ pair).

    Quantizing such an output only adds a rounding step, and it does harm: BERT's residual
    stream carries a few channels 100x larger than the rest, and one int8 grid for the sum
    that feeds a LayerNorm spends its codes on those few (all-MiniLM-L6-v2 went from 4.8 to
    16.8 dB, docs/ptq.md). A MatMul or Gemm keeps its int8 kernel with a float output; an Add,
    Mul, pool, Concat or shape op goes float, and then its own inputs may lose their last int8
    reader (the text-direction classifier's logits pass a Flatten on their way to the Softmax:
    quantized for the Flatten's sake, they had been rounded to 8 bits)."""
    for node in reversed(index.nodes):
        decision = decisions[node.name]
        outs = [o for o in node.output if o in wanted]
        if not decision.quantized or node.output[0] not in wanted:
            continue
        if any(
            reads_int8(c, o, decisions, wanted, rules)
            for o in outs
            for c in index.consumers.get(o, [])
        ):
            continue
        kind = rules[node.op_type].kind
        if node.op_type in FLOAT_OUTPUT_KERNELS:
            del wanted[node.output[0]]
            decisions[node.name] = Decision(node.name, node.op_type, True, FLOAT_OUTPUT)
        elif kind in FLOAT_WHEN_UNREAD or (
            kind is Kind.INHERIT and not index.is_constant(node.input[0])  # tables stay 8-bit
        ):
            for o in outs:
                del wanted[o]
            decisions[node.name] = decision.to_float(NOTHING_READS_INT8)
