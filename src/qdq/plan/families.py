"""The families of ops the frontier's candidate plans keep float (`qdq.plan.frontier`), and the
graph facts that name some of them: grouped convolutions, products of two activations, the
first and last layers, and the layers whose outputs a Log compresses; and the layers every
candidate keeps float, those whose logits a Softmax turns into an expected value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import onnx

from qdq.onnx.graph import GraphIndex, attributes, is_smoothing, subgraph_reads
from qdq.plan.decisions import Decision
from qdq.plan.rules import RULES, Kind

CONV = frozenset({"Conv", "ConvTranspose"})
LINEAR = frozenset({"MatMul", "Gemm"})
COMPUTE = CONV | LINEAR
# Ops that only move values: a Softmax's probabilities reach their expectation through these.
MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
# Ops that only pass int8 between compute layers: the "compute only" candidate keeps them float.
CHEAP = frozenset(
    op for op, rule in RULES.items() if rule.kind in (Kind.ELEMENTWISE, Kind.SHARED, Kind.GATE)
)


@dataclass(frozen=True)
class Families:
    """Node names of a model that some candidates keep float: `grouped` (`grouped_convs`),
    `attention` (`activation_matmuls`), `first` (`first_layers`), `last` (`last_layers`),
    `logged` (`before_log`); and `decoded` (`before_expectation`), which every candidate
    keeps float."""

    grouped: frozenset[str] = frozenset()
    attention: frozenset[str] = frozenset()
    first: frozenset[str] = frozenset()
    last: frozenset[str] = frozenset()
    logged: frozenset[str] = frozenset()
    decoded: frozenset[str] = frozenset()

    @classmethod
    def of(cls, model: onnx.ModelProto) -> Families:
        return cls(
            grouped_convs(model),
            activation_matmuls(model),
            first_layers(model),
            last_layers(model),
            before_log(model),
            before_expectation(model),
        )


NO_FAMILIES = Families()  # a model's graph unknown: the candidates that need none of them


def variants(
    decisions: Mapping[str, Decision], families: Families = NO_FAMILIES
) -> dict[str, frozenset[str]]:
    """Per candidate, the nodes it keeps float beyond `decisions` (graph order). "ends float"
    keeps every first and every last layer float (`first_layers`, `last_layers`) and every
    layer a Log compresses (`before_log`), or, where that would leave no int8 compute layer
    (openWakeWord's mel front end: two STFT convolutions and a filter bank), the first and the
    last in graph order."""
    int8 = {name: d.op_type for name, d in decisions.items() if d.quantized}
    compute = [name for name, op in int8.items() if op in COMPUTE]
    kinds = {"compute only": CHEAP, "Conv only": LINEAR, "MatMul only": CONV}
    out = {"all int8": frozenset()}
    out |= {k: frozenset(n for n, op in int8.items() if op in ops) for k, ops in kinds.items()}
    ends = {*compute[:1], *compute[-1:]}
    every = (families.first | families.last | families.logged).intersection(compute) | ends
    if len(compute) > len(every):  # else the first and last in graph order: some int8 left
        ends = every
    out["ends float"] = frozenset(ends) if len(compute) > len(ends) else frozenset()
    depthwise = families.grouped.intersection(int8)
    if depthwise:
        out["ends and depthwise float"] = depthwise | out["ends float"]
    products = families.attention.intersection(int8)
    if products:
        out["attention float"] = products
        out["linear layers only"] = products | out["MatMul only"]
    return out


def first_layers(model: onnx.ModelProto) -> frozenset[str]:
    """The compute layers of `model` that no other compute layer feeds, directly or through
    other ops: every layer that reads the model's inputs first. Keeping only one of them float
    keeps the tensor they share on its int8 grid for the others: DNSMOS's two STFT
    convolutions (real and imaginary part) read one waveform, and with only the first float the
    other rounded both the waveform and its spectrum before a Log (clips whose scores stay
    within 0.1 of FP32's: 6.8% over three draws, 98.4% with both float, at the same speed;
    docs/unseen.md)."""
    return _unfed(model.graph.node, _reads, lambda node: node.output)  # topological order


def last_layers(model: onnx.ModelProto) -> frozenset[str]:
    """The compute layers of `model` that feed no other compute layer: each head of a detector
    that writes its outputs through several (PP-PicoDet's layout model, four heads: IoU of
    the scores that fire with FP32's 0.671 on 256 pages over three draws with only the last in
    graph order float, 0.696 with all four; docs/unseen.md)."""
    return _unfed(reversed(model.graph.node), lambda node: node.output, _reads)


def before_log(model: onnx.ModelProto) -> frozenset[str]:
    """The compute layers of `model` whose outputs reach a Log through no other compute layer:
    a spectrum's front end before its log compression, where the Log turns the rounding of
    quiet bins into errors as large as those of loud ones. basic-pitch's constant-Q transform
    is 18 convolutions, two of them first layers (synthetic tones, 16 samples: output SQNR
    6.5-9.7 dB with the other 16 int8, 19.1-26.1 dB with them float; docs/unseen.md)."""
    return _feeding(model, [node.input[0] for node in model.graph.node if node.op_type == "Log"])


def before_expectation(model: onnx.ModelProto) -> frozenset[str]:
    """The compute layers of `model` that weigh a Softmax's probabilities by a constant
    (reshaped on the way at most): an expected value over bins, as YOLOv8's head decodes each
    side of a box from 16 logits (its distribution focal loss); and the compute layers whose
    outputs reach such a Softmax through no other compute layer. Rounding the logits, the
    probabilities or the expected bin (0-15, on an 8-bit grid: steps of 1.9 pixels at a stride
    of 32) to 8 bits moves the decoded side by pixels, where the rest of the network costs a
    fraction of one (captcha-recognizer's slider segmenter, docs/unseen.md). The walk is by
    node, so the class-score layers that a head joins to the box logits before splitting them
    are among them."""
    index = GraphIndex(model)
    found: set[str] = set()
    logits = []
    for node in model.graph.node:
        if node.op_type == "Softmax" and (weighing := _weighing(index, node.output[0])):
            found |= weighing
            logits.append(node.input[0])
    return frozenset(found) | _feeding(model, logits)


def _weighing(index: GraphIndex, tensor: str) -> set[str]:
    """The compute layers that multiply `tensor` (through MOVES and SmoothQuant's Muls at most)
    by a constant."""
    wanted, seen, found = [tensor], set(), set()
    while wanted:
        current = wanted.pop()
        for reader in index.consumers.get(current, []):
            if reader.name in seen:
                continue
            seen.add(reader.name)
            if reader.op_type in COMPUTE:  # the weight on either side of a MatMul
                if any(index.is_constant(i) for i in reader.input[:2] if i != current):
                    found.add(reader.name)
            elif reader.op_type in MOVES or is_smoothing(reader):
                wanted.extend(reader.output)
    return found


def _feeding(model: onnx.ModelProto, tensors: list[str]) -> frozenset[str]:
    """The compute layers of `model` whose outputs reach one of `tensors` through no other
    compute layer."""
    producer = {name: node for node in model.graph.node for name in node.output if name}
    found: set[str] = set()
    wanted, seen = list(tensors), set()
    while wanted:
        node = producer.get(name := wanted.pop())
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type in COMPUTE:
            found.add(node.name)
        else:
            wanted.extend(_reads(node))
    return frozenset(found)


def _unfed(
    nodes: Iterable[onnx.NodeProto],
    upstream: Callable[[onnx.NodeProto], Iterable[str]],
    downstream: Callable[[onnx.NodeProto], Iterable[str]],
) -> frozenset[str]:
    """The compute layers among `nodes` that no compute layer reaches through their `upstream`
    tensors: `nodes` in graph order with `upstream` what a node reads (the first layers), or
    reversed with `upstream` what it writes (the last)."""
    reached: set[str] = set()  # tensors a compute layer reaches ("", an input left out: none)
    found = []
    for node in nodes:
        fed = any(name in reached for name in upstream(node) if name)
        if node.op_type in COMPUTE and not fed:
            found.append(node.name)
        if fed or node.op_type in COMPUTE:
            reached.update(name for name in downstream(node) if name)
    return frozenset(found)


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors `node` reads, those its subgraphs read from outside included (not "", an
    optional input left out, which is no tensor: a Resize's roi)."""
    return [name for name in (*node.input, *subgraph_reads(node)) if name]


def grouped_convs(model: onnx.ModelProto) -> frozenset[str]:
    """The convolutions of `model` whose `group` is above 1 (depthwise ones among them)."""
    return frozenset(
        node.name
        for node in model.graph.node
        if node.op_type == "Conv" and attributes(node).get("group", 1) > 1
    )


def activation_matmuls(model: onnx.ModelProto) -> frozenset[str]:
    """The MatMuls of `model` (prepared: constants folded into initializers) with no constant
    input: products of two activations, as in attention, not a layer's input times its weight.
    A weight that reaches its MatMul through another op only adds a candidate, measured."""
    index = GraphIndex(model)
    return frozenset(
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and not any(index.is_constant(i) for i in node.input)
    )
