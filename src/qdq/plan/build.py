"""The plan: the static decisions revised with the calibrated ranges, and every qparam.

Tensors that hold masks stay float, Concats whose inputs differ too much stay float, the shape
ops inherit their input's qparams, and outputs that nothing reads as int8 lose their Q/DQ
(`qdq.plan.flow`). The result is one immutable `Plan`; passes that change it return a new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from qdq.affine import quantize
from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex, attributes
from qdq.onnx.model import UNIFORM_INT8
from qdq.plan.constants import TABLE_MIN_SQNR_DB, plan_constants, table_qparams
from qdq.plan.decisions import FLOAT_OUTPUT, INT8_INPUTS, NOTHING_READS_INT8, Decision
from qdq.plan.floor import flat_floor
from qdq.plan.flow import Int8Flow, absorbs, prune_unread
from qdq.plan.rules import INPUTS_ONLY, Kind, rule_inputs
from qdq.qparams import QParams, Range, choose_qparams

# A shared Concat scale must leave every input at least this share of the codes (32 of 256).
CONCAT_MIN_SHARE = 1 / 8
GATE_RANGE = Range(0.0, 1.0)  # Sigmoid's and HardSigmoid's outputs, whatever their input
POOLS = ("AveragePool", "GlobalAveragePool")
POOL_RATIO = 128  # s_x / (s_y * window) stays under this: ONNX Runtime's pools take under 256
Key = tuple[str, int]  # (node name, input index)


@dataclass(frozen=True)
class BudgetResult:
    """What the budget kept in float, and the output SQNR before and after."""

    kept_float: tuple[str, ...]
    sqnr_before: float  # or the user metric's value
    sqnr_after: float
    target: float
    latency_ms: tuple[float, float] | None = None  # all-int8 model, budgeted model


@dataclass(frozen=True)
class Candidate:
    """One candidate plan of the accuracy-latency frontier (`qdq.plan.frontier`): which ops it
    keeps float, its score (the worst output part's SQNR in dB, at the lower quartile of the
    samples: `frontier.quartile_score`) and its latency."""

    name: str
    score: float
    latency_ms: float  # median of timed runs on one sample, 1 thread
    int8_nodes: int  # nodes that run in int8 (more: a smaller file)
    chosen: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything the rewrite needs: the decision for every node, activation qparams per
    tensor, qparams of constant inputs and int32 bias scales per (node, input index); and what
    passes after planning add: corrected biases, learned weight codes, the budget's result.
    Immutable: a pass returns a new plan (`dataclasses.replace`)."""

    decisions: Mapping[str, Decision]
    activations: Mapping[str, QParams] = field(default_factory=dict)
    constants: Mapping[Key, QParams] = field(default_factory=dict)
    biases: Mapping[Key, np.ndarray] = field(default_factory=dict)
    bias_values: Mapping[Key, np.ndarray] = field(default_factory=dict)  # corrected
    weight_codes: Mapping[Key, np.ndarray] = field(default_factory=dict)  # AdaRound
    budget: BudgetResult | None = None  # set when --target-sqnr was asked for
    frontier: tuple[Candidate, ...] = ()  # the candidate plans this one was chosen from
    float_ms: float | None = None  # the float model, timed on the frontier's feed
    grid_codes: Mapping[Key, np.ndarray] = field(default_factory=dict)  # binary, ternary, 2^k
    weights: str = UNIFORM_INT8  # the weights' grid and bits, as the file records them
    # tensors whose grid starts where their only reader (an activation) is flat, and that floor
    floors: Mapping[str, float] = field(default_factory=dict)

    def codes(self, key: Key, values: np.ndarray) -> np.ndarray:
        """Integer codes of a constant input: learned ones (AdaRound), a low-bit grid's
        (`qdq.lowbit`), or nearest rounding."""
        given = self.given_codes(key)
        return given if given is not None else quantize(values, self.constants[key])

    def given_codes(self, key: Key) -> np.ndarray | None:
        """The codes a pass set for a constant input (learned, or a low-bit grid's), if any."""
        return self.weight_codes.get(key, self.grid_codes.get(key))


@dataclass
class _Draft:
    """The working state of one `build_plan` call (never leaves it)."""

    index: GraphIndex
    config: QuantConfig
    decisions: dict[str, Decision]
    ranges: dict[str, Range]
    activations: dict[str, QParams] = field(default_factory=dict)
    constants: dict[Key, QParams] = field(default_factory=dict)
    wanted: dict[str, None] = field(default_factory=dict)  # tensors with a Q/DQ, graph order
    inherited: dict[str, str] = field(default_factory=dict)

    def to_float(self, node: onnx.NodeProto, reason: str) -> None:
        self.decisions[node.name] = self.decisions[node.name].to_float(reason)

    def because(self, node: onnx.NodeProto, reason: str) -> None:
        self.decisions[node.name] = Decision(node.name, node.op_type, True, reason)


def build_plan(
    index: GraphIndex,
    decisions: Mapping[str, Decision],
    ranges: Mapping[str, Range],
    unfit: Mapping[str, str],
    config: QuantConfig,
    per_channel: bool,
    peaks: Mapping[str, np.ndarray] | None = None,
) -> Plan:
    """Final decisions and qparams from the static decisions and the calibrated ranges;
    `peaks`: the largest sample of int8 layers' inputs, for pair-safe weights."""
    flow = Int8Flow(index, decisions, config)
    draft = _Draft(index, config, dict(decisions), dict(ranges))
    unfit = dict(unfit)
    for out, activation in flow.absorbed.items():
        if out not in draft.ranges and activation in draft.ranges:
            draft.ranges[out] = draft.ranges[activation]
        elif out not in unfit and activation in unfit:
            unfit[out] = unfit[activation]
    steps = config.activations.qmax - config.activations.qmin
    floors: dict[str, float] = {}
    for out, fitted in list(draft.ranges.items()):  # no codes where the only reader is flat
        if fitted.lo.ndim:  # per-channel activation ranges
            continue
        floor = flat_floor(index, out, float(fitted.lo), float(fitted.hi), steps)
        if floor is not None:
            draft.ranges[out] = Range(floor, fitted.hi)
            floors[out] = floor
    shared: dict[str, str] = {}
    for node in index.nodes:
        if not draft.decisions[node.name].quantized:
            continue
        rule = flow.rules[node.op_type]
        activations = [
            node.input[i] for i in rule_inputs(node, rule) if not index.is_constant(node.input[i])
        ]
        if rule.kind is Kind.INHERIT and index.is_constant(node.input[0]):
            _table(node, draft)
            continue
        if rule.kind in (Kind.INHERIT, Kind.ACTIVATION):
            _follow(node, draft)
            continue
        if rule.kind is Kind.GATE:
            _gate(node, draft, flow.unread)
            continue
        unread = node.output[0] in flow.unread or rule.kind in INPUTS_ONLY
        outputs = [] if unread else [node.output[0]]
        if rule.kind in (Kind.ELEMENTWISE, Kind.SHARED):  # before ranges: a float gate's has none
            cold = next((t for t in activations if t not in draft.wanted and t not in unfit), None)
            if cold:
                draft.to_float(
                    node,
                    f"input {cold!r} comes from a float op: int8 here would "
                    "only add a rounding step",
                )
                continue
        missing = [t for t in [*activations, *outputs] if t not in draft.ranges]
        if missing:
            why = unfit.get(missing[0], "was not calibrated")
            draft.to_float(node, f"tensor {missing[0]!r} {why}")
            continue
        if rule.kind in (Kind.ELEMENTWISE, Kind.SHARED) and not outputs:
            draft.to_float(node, NOTHING_READS_INT8)
            continue
        if rule.kind is Kind.SHARED and (crowded := _crowded(node, activations, draft.ranges)):
            draft.to_float(node, crowded)
            continue
        if not outputs:
            draft.because(node, INT8_INPUTS if rule.kind in INPUTS_ONLY else FLOAT_OUTPUT)
        for t in [*activations, *outputs]:
            draft.wanted[t] = None
        if rule.kind is Kind.SHARED:
            for t in activations:
                shared[t] = node.output[0]
    prune_unread(index, draft.decisions, draft.wanted, flow.rules)
    for node in index.nodes:
        if node.op_type in POOLS and draft.decisions[node.name].quantized:
            _pool_reach(node, draft)
    chosen = draft.activations
    floored = {}  # a floored tensor, and what inherits its grid (a Reshape before the reader)
    for t in draft.wanted:
        source = t
        while source in draft.inherited:
            source = draft.inherited[source]
        if source in chosen:
            chosen[t] = chosen[source]
        elif source in draft.ranges:
            chosen[t] = choose_qparams(draft.ranges[source], config.activations)
        if source in floors:
            floored[t] = floors[source]
    # a Concat's inputs take its grid, except a Relu's or Clip's output absorbed into its
    # producer where that grid does not start at 0: ONNX Runtime would keep the activation,
    # and the producer would run float (QLinearConcat requantizes an input of its own grid)
    absorbed = set(flow.absorbed.values())
    lowest = config.activations.qmin
    for t, output in shared.items():
        if t in draft.inherited or output not in chosen:
            continue
        if t in absorbed and not np.all(chosen[output].zero_point == lowest):
            continue
        chosen[t] = chosen[output]
    constants, biases, codes = plan_constants(
        index, draft.decisions, chosen, config, per_channel, peaks
    )
    constants = {**draft.constants, **constants}
    weights = config.weight_record
    return Plan(
        draft.decisions,
        chosen,
        constants,
        biases,
        grid_codes=codes,
        weights=weights,
        floors={t: f for t, f in floored.items() if t in chosen},
    )


def _pool_reach(node: onnx.NodeProto, draft: _Draft) -> None:
    """An averaging pool's output range wide enough for ONNX Runtime's int8 kernel, which
    takes s_x / (s_y * window) under 256 only (a mean near 0 on every sample: "parameter out
    of computation range"); a window of unknown size counts as 1, which asks more."""
    x, y = node.input[0], node.output[0]
    if x not in draft.ranges or y not in draft.ranges or y not in draft.wanted:
        return
    if node.op_type == "AveragePool":
        window = int(np.prod(attributes(node).get("kernel_shape", [1])))
    else:
        shape = draft.index.shape.get(x, ())[2:]
        window = int(np.prod(shape)) if shape and None not in shape else 1
    x_scale = choose_qparams(draft.ranges[x], draft.config.activations).scale
    steps = draft.config.activations.qmax - draft.config.activations.qmin
    least = float(np.max(x_scale)) / (POOL_RATIO * window) * steps  # the output's least span
    lo, hi = float(np.min(draft.ranges[y].lo)), float(np.max(draft.ranges[y].hi))
    if hi - lo < least:
        middle = (lo + hi) / 2
        draft.ranges[y] = Range(middle - least / 2, middle + least / 2)


def _follow(node: onnx.NodeProto, draft: _Draft) -> None:
    """Shape ops and Relu/Clip: int8 passes through when their input is quantized."""
    index, source = draft.index, node.input[0]
    if source not in draft.wanted:
        draft.to_float(node, f"its input {source!r} is not quantized")
        return
    producer = index.producer.get(source)
    if (
        node.op_type in ("Relu", "Clip")
        and producer is not None
        and absorbs(node, producer, index, draft.decisions, draft.config)
    ):
        del draft.wanted[source]
        draft.wanted[node.output[0]] = None
        draft.because(node, f"absorbed into {producer.name}'s output range")
        return
    for out in node.output:
        if out and index.is_float(out):
            draft.wanted[out] = None
            draft.inherited[out] = source
    draft.because(node, "int8 passes through (input's qparams)")


def _gate(node: onnx.NodeProto, draft: _Draft, unread: frozenset[str]) -> None:
    """Sigmoid, HardSigmoid: int8 in where it flows, the [0, 1] grid out where it is read."""
    if node.input[0] not in draft.wanted:
        draft.to_float(node, f"its input {node.input[0]!r} is not quantized")
    elif node.output[0] in unread:
        draft.to_float(node, NOTHING_READS_INT8)
    else:
        draft.ranges[node.output[0]] = GATE_RANGE
        draft.wanted[node.output[0]] = None
        draft.because(node, "float between Q/DQ; its output on the fixed [0, 1] grid")


def _table(node: onnx.NodeProto, draft: _Draft) -> None:
    """A Gather from a constant table (an embedding): the table is stored in 8 bits, one scale,
    and the rows it picks keep those qparams, so ONNX Runtime gathers 8-bit rows and never
    dequantizes the whole table. A table whose values one grid serves badly stays float."""
    table, axis = node.input[0], int(attributes(node).get("axis", 0))
    grid = draft.config.activations
    qparams, sqnr = draft.index.derived(
        ("table", table, axis, grid), lambda: table_qparams(draft.index.constant(table), axis, grid)
    )
    if sqnr < TABLE_MIN_SQNR_DB:
        draft.to_float(
            node,
            f"one 8-bit grid would keep table {table!r} at {sqnr:.1f} dB (< {TABLE_MIN_SQNR_DB})",
        )
        return
    draft.constants[node.name, 0] = qparams
    draft.activations[node.output[0]] = qparams
    draft.wanted[node.output[0]] = None
    draft.because(node, f"8-bit table ({sqnr:.1f} dB): rows gathered in 8 bits")


def _crowded(node: onnx.NodeProto, inputs: list[str], ranges: Mapping[str, Range]) -> str | None:
    """Why a shared scale would not do (it would leave some input a handful of levels), or
    None when it does."""
    out = ranges[node.output[0]]
    span = float(np.maximum(out.hi, 0) - np.minimum(out.lo, 0))
    for name in inputs:
        r = ranges[name]
        share = float(np.maximum(r.hi, 0) - np.minimum(r.lo, 0)) / span if span else 1.0
        if share < CONCAT_MIN_SHARE:
            levels = max(1, round(share * 255))
            return (
                f"inputs' ranges differ too much: one scale would leave {name!r} "
                f"about {levels} levels"
            )
    return None
