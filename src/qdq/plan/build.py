"""Decide, as plain data, what gets quantized and with which qparams (before any rewriting).

Two stages. `static_decisions` needs only the graph: which ops have an int8 rule, which are
excluded, which have weights we can quantize. `build_plan` then uses the calibrated ranges:
tensors that hold masks stay float, Concats whose inputs differ too much stay float, and the
shape ops inherit their input's qparams.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from qdq.affine import quantize
from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex, attributes
from qdq.plan.calibrate import unfit_reason
from qdq.plan.constants import TABLE_MIN_SQNR_DB, plan_constants, table_qparams
from qdq.plan.flow import absorbed, absorbs, unread
from qdq.plan.rules import (
    FLOAT_BY_DESIGN,
    FLOAT_OUTPUT_KERNELS,
    FLOAT_WHEN_UNREAD,
    RULES,
    rule_inputs,
)
from qdq.qparams import QParams, Range, choose_qparams

if TYPE_CHECKING:
    from qdq.plan.budget import BudgetResult

# A shared Concat scale must leave every input at least this share of the codes (32 of 256).
CONCAT_MIN_SHARE = 1 / 8
GATE_RANGE = Range(0.0, 1.0)  # Sigmoid's and HardSigmoid's outputs, whatever their input


@dataclass
class Decision:
    """Whether one node runs in int8, and why (or why not)."""

    node: str
    op_type: str
    quantized: bool
    reason: str


@dataclass
class Plan:
    """Everything the rewrite needs: activation qparams per tensor, qparams of constant inputs
    and int32 bias scales per (node, input index), and the decision for every node."""

    activations: dict[str, QParams] = field(default_factory=dict)
    constants: dict[tuple[str, int], QParams] = field(default_factory=dict)
    biases: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    bias_values: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # corrected
    weight_codes: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # AdaRound
    budget: BudgetResult | None = None  # set when --target-sqnr was asked for

    def codes(self, key: tuple[str, int], values: np.ndarray) -> np.ndarray:
        """Integer codes of a constant input: learned ones (AdaRound) or nearest rounding."""
        learned = self.weight_codes.get(key)
        return learned if learned is not None else quantize(values, self.constants[key])

    decisions: dict[str, Decision] = field(default_factory=dict)


def kept_float(
    decisions: dict[str, Decision], names: Iterable[str], reason: str
) -> dict[str, Decision]:
    """A copy of `decisions` in which the nodes `names` stay float, for `reason`."""
    copy = {k: Decision(**vars(v)) for k, v in decisions.items()}
    for name in names:
        copy[name].quantized, copy[name].reason = False, reason
    return copy


def static_decisions(index: GraphIndex, config: QuantConfig) -> dict[str, Decision]:
    """Per node: quantizable as far as the graph alone can tell, or why not."""
    excluded = set(config.exclude)
    decisions = {}
    for node in index.nodes:
        decisions[node.name] = _static(node, index, excluded)
    return decisions


def _static(node: onnx.NodeProto, index: GraphIndex, excluded: set[str]) -> Decision:
    def floating(reason: str) -> Decision:
        return Decision(node.name, node.op_type, False, reason)

    if node.name in excluded or node.op_type in excluded:
        return floating("excluded by --exclude")
    if node.domain not in ("", "ai.onnx"):
        return floating(f"custom-domain op {node.domain}.{node.op_type} has no int8 rule")
    rule = RULES.get(node.op_type)
    if rule is None:
        return floating(FLOAT_BY_DESIGN.get(node.op_type, f"no int8 rule for {node.op_type}"))
    for i in rule_inputs(node, rule):
        name = node.input[i]
        if not index.is_float(name):
            return floating(f"input {name!r} is not float32")
        if index.is_constant(name) and (reason := unfit_reason(index.constant(name))):
            return floating(f"constant input {name!r} {reason}")
    if rule.weight is not None and not index.is_constant(node.input[rule.weight]):
        return floating(f"weight {node.input[rule.weight]!r} is not a constant")
    if node.op_type == "Gemm":
        attrs = attributes(node)
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            return floating("Gemm with transA, alpha or beta has no int8 kernel")
    if rule.kind in ("elementwise", "shared"):
        constant = next(
            (node.input[i] for i in rule_inputs(node, rule) if index.is_constant(node.input[i])),
            None,
        )
        if constant:
            return floating(
                f"constant operand {constant!r}: exact and cheap in float, where int8 would "
                "add a rounding step"
            )
    if rule.kind == "compute":
        return Decision(node.name, node.op_type, True, "int8 kernel")
    return Decision(node.name, node.op_type, True, "pending: int8 if int8 flows into it")


def build_plan(
    index: GraphIndex,
    decisions: dict[str, Decision],
    ranges: dict[str, Range],
    unfit: dict[str, str],
    config: QuantConfig,
    per_channel: bool,
) -> Plan:
    """Final decisions and qparams from the static decisions and the calibrated ranges."""
    plan = Plan(decisions={k: Decision(**vars(v)) for k, v in decisions.items()})
    ranges, unfit = dict(ranges), dict(unfit)
    for out, activation in absorbed(index, decisions, config).items():
        if out not in ranges and activation in ranges:
            ranges[out] = ranges[activation]
        elif out not in unfit and activation in unfit:
            unfit[out] = unfit[activation]
    skipped = set(unread(index, decisions))
    scheme = config.activation_scheme
    inherited: dict[str, str] = {}
    shared: dict[str, str] = {}
    wanted: dict[str, None] = {}  # tensors that get a Q/DQ pair, in graph order
    for node in index.nodes:
        decision = plan.decisions[node.name]
        if not decision.quantized:
            continue
        rule = RULES[node.op_type]
        activations = [
            node.input[i] for i in rule_inputs(node, rule) if not index.is_constant(node.input[i])
        ]
        if rule.kind == "inherit" and index.is_constant(node.input[0]):
            _table(node, index, plan, config, wanted)
            continue
        if rule.kind in ("inherit", "activation"):
            _follow(node, index, plan, config, wanted, inherited)
            continue
        if rule.kind == "gate":
            _gate(node, decision, ranges, wanted, skipped)
            continue
        outputs = [] if node.output[0] in skipped else [node.output[0]]
        if rule.kind in ("elementwise", "shared"):  # before ranges: a float gate's output has none
            cold = next((t for t in activations if t not in wanted and t not in unfit), None)
            if cold:
                _to_float(
                    decision,
                    f"input {cold!r} comes from a float op: int8 here would "
                    "only add a rounding step",
                )
                continue
        missing = [t for t in [*activations, *outputs] if t not in ranges]
        if missing:
            why = unfit.get(missing[0], "was not calibrated")
            _to_float(decision, f"tensor {missing[0]!r} {why}")
            continue
        if rule.kind in ("elementwise", "shared") and not outputs:
            _to_float(decision, NOTHING_READS_INT8)
            continue
        if rule.kind == "shared" and not _concat_fits(node, activations, ranges, decision):
            continue
        if not outputs:
            decision.reason = FLOAT_OUTPUT
        for t in [*activations, *outputs]:
            wanted[t] = None
        if rule.kind == "shared":
            for t in activations:
                shared[t] = node.output[0]
    _prune_unread(index, plan, wanted)
    for t in wanted:
        source = t
        while source in inherited:
            source = inherited[source]
        if source in plan.activations:
            plan.activations[t] = plan.activations[source]
        elif source in ranges:
            plan.activations[t] = choose_qparams(ranges[source], scheme)
    for t, output in shared.items():
        if t not in inherited and output in plan.activations:
            plan.activations[t] = plan.activations[output]
    plan_constants(index, plan, config, per_channel)
    return plan


FLOAT_OUTPUT = "int8 kernel with a float output: nothing after it reads int8"
NOTHING_READS_INT8 = "nothing after it reads int8: int8 here would only add a rounding step"


def _prune_unread(index: GraphIndex, plan: Plan, wanted: dict[str, None]) -> None:
    """Drop the Q/DQ of outputs that no consumer reads as int8, last node first.

    Quantizing such an output only adds a rounding step, and it does harm: BERT's residual
    stream carries a few channels 100x larger than the rest, and one int8 grid for the sum
    that feeds a LayerNorm spends its codes on those few (all-MiniLM-L6-v2 went from 4.8 to
    16.8 dB, docs/ptq.md). A MatMul or Gemm keeps its int8 kernel with a float output; an Add,
    Mul, pool, Concat or shape op goes float, and then its own inputs may lose their last int8
    reader (the text-direction classifier's logits pass a Flatten on their way to the Softmax:
    quantized for the Flatten's sake, they had been rounded to 8 bits)."""
    for node in reversed(index.nodes):
        decision = plan.decisions[node.name]
        outs = [o for o in node.output if o in wanted]
        if not decision.quantized or node.output[0] not in wanted:
            continue
        if any(reads_int8(c, o, plan, wanted) for o in outs for c in index.consumers.get(o, [])):
            continue
        kind = RULES[node.op_type].kind
        if node.op_type in FLOAT_OUTPUT_KERNELS:
            del wanted[node.output[0]]
            decision.reason = FLOAT_OUTPUT
        elif kind in FLOAT_WHEN_UNREAD or (
            kind == "inherit" and not index.is_constant(node.input[0])  # tables stay 8-bit
        ):
            for o in outs:
                del wanted[o]
            _to_float(decision, NOTHING_READS_INT8)


def reads_int8(
    consumer: onnx.NodeProto, tensor: str, plan: Plan, quantized: Container[str]
) -> bool:
    """Whether `consumer` reads `tensor` through its Q/DQ pair; `quantized` holds the tensors
    that have one. Any other consumer reads the float tensor itself, which is exact."""
    if not plan.decisions[consumer.name].quantized:
        return False
    rule = RULES[consumer.op_type]
    if rule.kind in ("inherit", "activation"):
        return any(o in quantized for o in consumer.output)
    return tensor in (consumer.input[i] for i in rule_inputs(consumer, rule))


def _to_float(decision: Decision, reason: str) -> None:
    decision.quantized = False
    decision.reason = reason


def _follow(
    node: onnx.NodeProto,
    index: GraphIndex,
    plan: Plan,
    config: QuantConfig,
    wanted: dict[str, None],
    inherited: dict[str, str],
) -> None:
    """Shape ops and Relu/Clip: int8 passes through when their input is quantized."""
    decision = plan.decisions[node.name]
    source = node.input[0]
    if source not in wanted:
        _to_float(decision, f"its input {source!r} is not quantized")
        return
    producer = index.producer.get(source)
    if (
        node.op_type in ("Relu", "Clip")
        and producer is not None
        and absorbs(node, producer, index, plan.decisions, config)
    ):
        del wanted[source]
        wanted[node.output[0]] = None
        decision.reason = f"absorbed into {producer.name}'s output range"
        return
    for out in node.output:
        if out and index.is_float(out):
            wanted[out] = None
            inherited[out] = source
    decision.reason = "int8 passes through (input's qparams)"


def _gate(
    node: onnx.NodeProto,
    decision: Decision,
    ranges: dict[str, Range],
    wanted: dict[str, None],
    skipped: Container[str],
) -> None:
    """Sigmoid, HardSigmoid: int8 in where it flows, the [0, 1] grid out where it is read."""
    if node.input[0] not in wanted:
        _to_float(decision, f"its input {node.input[0]!r} is not quantized")
    elif node.output[0] in skipped:
        _to_float(decision, NOTHING_READS_INT8)
    else:
        ranges[node.output[0]] = GATE_RANGE
        wanted[node.output[0]] = None
        decision.reason = "float between Q/DQ; its output on the fixed [0, 1] grid"


def _table(
    node: onnx.NodeProto,
    index: GraphIndex,
    plan: Plan,
    config: QuantConfig,
    wanted: dict[str, None],
) -> None:
    """A Gather from a constant table (an embedding): the table is stored in 8 bits, one scale,
    and the rows it picks keep those qparams, so ONNX Runtime gathers 8-bit rows and never
    dequantizes the whole table. A table whose values one grid serves badly stays float."""
    values = index.constant(node.input[0])
    qparams, sqnr = table_qparams(values, int(attributes(node).get("axis", 0)), config)
    if sqnr < TABLE_MIN_SQNR_DB:
        _to_float(
            plan.decisions[node.name],
            f"one 8-bit grid would keep table {node.input[0]!r} at {sqnr:.1f} dB "
            f"(< {TABLE_MIN_SQNR_DB})",
        )
        return
    plan.constants[node.name, 0] = qparams
    plan.activations[node.output[0]] = qparams
    wanted[node.output[0]] = None
    plan.decisions[node.name].reason = f"8-bit table ({sqnr:.1f} dB): rows gathered in 8 bits"


def _concat_fits(
    node: onnx.NodeProto, inputs: list[str], ranges: dict[str, Range], decision: Decision
) -> bool:
    """A shared scale is fine unless it would leave some input with a handful of levels."""
    out = ranges[node.output[0]]
    span = float(np.maximum(out.hi, 0) - np.minimum(out.lo, 0))
    for name in inputs:
        r = ranges[name]
        share = float(np.maximum(r.hi, 0) - np.minimum(r.lo, 0)) / span if span else 1.0
        if share < CONCAT_MIN_SHARE:
            levels = max(1, round(share * 255))
            _to_float(
                decision,
                f"inputs' ranges differ too much: one scale would leave {name!r} "
                f"about {levels} levels",
            )
            return False
    return True
