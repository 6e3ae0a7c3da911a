"""Per node, whether it runs in int8 and why: the static stage, which needs only the graph.

Which ops have an int8 rule, which are excluded, which have weights we can quantize. The plan
(`qdq.plan.build`) then revises these with the calibrated ranges.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

import onnx

from qdq.config import QuantConfig, WeightGrid
from qdq.onnx.graph import GraphIndex, attributes
from qdq.plan.calibrate import unfit_reason
from qdq.plan.rules import FLOAT_BY_DESIGN, INPUTS_ONLY, Kind, OpRule, rule_inputs, rules_for

PENDING = "pending: int8 if int8 flows into it"
FLOAT_OUTPUT = "int8 kernel with a float output: nothing after it reads int8"
INT8_INPUTS = "Q/DQ on its inputs; TensorRT picks its output's precision"
NOTHING_READS_INT8 = "nothing after it reads int8: int8 here would only add a rounding step"


@dataclass(frozen=True)
class Decision:
    """Whether one node runs in int8, and why (or why not). `dynamic`: a node with no Q/DQ
    around it (`quantized` False) whose weights are int8 and whose activations its kernel
    quantizes as it runs (an LSTM: `qdq.plan.recurrent`)."""

    node: str
    op_type: str
    quantized: bool
    reason: str
    dynamic: bool = False

    def to_float(self, reason: str) -> Decision:
        return replace(self, quantized=False, reason=reason, dynamic=False)


def kept_float(
    decisions: Mapping[str, Decision], names: Iterable[str], reason: str
) -> dict[str, Decision]:
    """A copy of `decisions` in which the nodes `names` stay float, for `reason`."""
    copy = dict(decisions)
    for name in names:
        copy[name] = copy[name].to_float(reason)
    return copy


# ONNX Runtime's rewrites that name the node they make `<first node>/<rewrite>`, and the op
# of that first node: `--exclude mm1` or `--exclude MatMul` reaches `mm1/MatMulAddFusion` (a
# MatMul and its bias), which the user's model does not name. Not `--exclude Add`: every
# linear layer's bias would go float with the residual sums it was meant for.
FUSED_FROM = {"MatMulAddFusion": ("MatMul",)}


def is_excluded(node: onnx.NodeProto, excluded: Collection[str]) -> bool:
    """Whether --exclude names `node`, its op type, or a node or op type it was fused from."""
    if node.name in excluded or node.op_type in excluded:
        return True
    first, _, rewrite = node.name.rpartition("/")
    fused = FUSED_FROM.get(rewrite, ())
    return bool(fused) and (first in excluded or any(op in excluded for op in fused))


def folded_exclusions(
    prepared: onnx.ModelProto, exclude: Iterable[str], known: Collection[str]
) -> list[str]:
    """Notes on --exclude names of the user's model that no node of the prepared one answers
    to: ONNX Runtime's rewrites folded them into another node (a BatchNormalization into its
    Conv), which keeps its own decision."""
    gone = [
        name
        for name in exclude
        if name not in known and not any(is_excluded(node, (name,)) for node in prepared.graph.node)
    ]
    return [
        f"--exclude {name!r}: ONNX Runtime's rewrites folded it into another node before "
        "quantization (a BatchNormalization into its Conv), so it has no decision of its own; "
        "exclude the node it went into (`qdq inspect` lists them)"
        for name in gone
    ]


def static_decisions(index: GraphIndex, config: QuantConfig) -> dict[str, Decision]:
    """Per node: quantizable as far as the graph alone can tell, or why not."""
    excluded, rules = set(config.exclude), rules_for(config)
    low_bit = config.weights.bits < 8 or config.weight_grid is not WeightGrid.UNIFORM
    return {node.name: _static(node, index, excluded, rules, low_bit) for node in index.nodes}


def _static(
    node: onnx.NodeProto,
    index: GraphIndex,
    excluded: set[str],
    rules: Mapping[str, OpRule],
    low_bit: bool,
) -> Decision:
    def floating(reason: str) -> Decision:
        return Decision(node.name, node.op_type, False, reason)

    if is_excluded(node, excluded):
        return floating("excluded by --exclude")
    constant_a = (
        node.op_type == "MatMul" and len(node.input) == 2 and index.is_constant(node.input[0])
    )
    if low_bit and constant_a and not index.is_constant(node.input[1]):
        return floating(  # its A would be an activation on 8 bits: the file would not say
            "constant first operand: low-bit weights (--weight-bits under 8, --weight-grid) are "
            "a MatMul's second operand"
        )
    if node.domain not in ("", "ai.onnx"):
        return floating(f"custom-domain op {node.domain}.{node.op_type} has no int8 rule")
    rule = rules.get(node.op_type)
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
    if rule.weight is not None and (
        reason := unfit_reason(index.constant(node.input[rule.weight]))
    ):
        return floating(f"weight {node.input[rule.weight]!r} {reason.removesuffix(' (a mask?)')}")
    if node.op_type == "Gemm":
        attrs = attributes(node)
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            return floating("Gemm with transA, alpha or beta has no int8 kernel")
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and (not index.is_constant(bias) or not _row(index.constant(bias).shape)):
            return floating(f"bias {bias!r} is no constant row, which QGemm's int32 bias needs")
    if rule.kind in (Kind.ELEMENTWISE, Kind.SHARED, Kind.RESIDUAL):
        constant = next(
            (node.input[i] for i in rule_inputs(node, rule) if index.is_constant(node.input[i])),
            None,
        )
        if constant:
            return floating(
                f"constant operand {constant!r}: exact and cheap in float, where int8 would "
                "add a rounding step"
            )
    if rule.kind is Kind.COMPUTE:
        return Decision(node.name, node.op_type, True, "int8 kernel")
    if rule.kind in INPUTS_ONLY:
        return Decision(node.name, node.op_type, True, INT8_INPUTS)
    return Decision(node.name, node.op_type, True, PENDING)


def _row(shape: tuple[int, ...]) -> bool:
    """A bias QGemm takes: one value per output column, (N,) or (1, N)."""
    return len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)
