"""No codes where a tensor's only reader is flat: the floor of a grid that an activation reads.

A tensor that only an elementwise function reads (SiLU, HardSwish, GELU in its tanh or erf
form, written out or as one op, after shape ops and a per-channel bias) needs no codes where
that function has gone flat: below some value every input gives nearly the same output (not so
a function that stops rising, a Sigmoid: TOP). The function is sampled once per tensor with
ONNX Runtime (the graph's own nodes on a grid of inputs, every channel's constants at once),
and a grid `[lo, hi]` starts at the highest `floor` below which the function is monotonic in
every channel and within half a code of its value at `floor`, a code in the function's units
being a code of the grid `[floor, hi]` times its slope where it keeps rising (1 for SiLU, GELU,
HardSwish): clamping there moves the output by less than rounding does, and never clips a dip
(GELU's and SiLU's minimum). Where it is exactly flat just below that (HardSwish under -beta /
alpha), the grid starts a code under the flat part's edge instead: the tensor's values near the
edge are many, and clamped there they would all move the same way (the test model's HardSwish
output: 38.2 dB, against 37.1 with the floor a code up its slope).

Magika's convolution, read by a GELU before a GlobalMaxPool, had 124 of its 255 codes below 0,
0.83 apart, where GELU moves by 0.17 in all; now it has 2, 0.35 apart (docs/ptq.md).
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import onnx
from onnx import helper

from qdq.onnx.graph import GraphIndex
from qdq.onnx.sessions import open_session

log = logging.getLogger(__name__)
# Ops that apply one function per element (their constants broadcast per channel at most).
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Pow", "Tanh", "Erf", "Exp", "Sigmoid",
    "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "Elu", "Selu",
})  # fmt: skip
# Ops that only move values: between the tensor and its function they change nothing.
MOVES = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Transpose"})
# How far clamping may move the function, in codes (the module's docstring). Half a code, as
# the SiLU floor of stops 32-33 had it, measured on the bench. A quarter of a code of the
# function's output range (a stricter floor) moved ddddocr's detector from 0.900 to 0.875 score
# IoU on draw 0, though the test models' SiLU and GELU outputs gained 0.1-0.7 dB with it.
CLAMP = 0.5
MAX_NODES = 32  # a region larger than any activation's written-out form is not one
# The sampled inputs: 0 and, geometrically, 1e-3 to 1e4 either side (0.8% apart: a floor is
# at most that much of itself too low).
_SIDE = np.geomspace(1e-3, 1e4, 2048)
GRID = np.concatenate([-_SIDE[::-1], [0.0], _SIDE])
# Samples times channels past which a function is not sampled: a bias Add over a transformer's
# 1536 hidden units before its GELU, 6.3M values and seconds per tensor (Magika's 512: 2.1M).
MAX_VALUES = 1 << 22
# Steps against the direction smaller than this, relative to the function's largest value (at
# least 1), are noise: ONNX Runtime's Sigmoid is off by up to 1e-6 near 0, and SiLU's product
# with x by x times that. Larger, they would let a floor into a dip: SiLU's, with a tolerance
# of 1/20 of a code, had one at -0.96 on YOLOv8n, above its minimum at -1.28.
NOISE = 1e-5
EXACT = 1e-6  # relative to the function's largest value: exactly flat (HardSwish's 0)
# A function whose slope far above 0 (at 1e4) is under this share of its steepest on the grid
# stops rising (Sigmoid, Tanh, HardSigmoid): its input is a score's logit or a gate's, mostly in
# the flat part, where a floor would move most of the tensor the same way. Left out untested:
# NudeNet's class logits ([-21.6, 1.4], floored at -5.7, a score of 0.003) scored the same.
TOP = 0.5


def flat_floor(index: GraphIndex, tensor: str, lo: float, hi: float, steps: int) -> float | None:
    """Where a grid `[lo, hi]` of `steps` codes for `tensor` can start (the module's rule),
    when an elementwise function alone reads it and is flat enough above `lo`; else None."""
    if not lo < 0 < hi:
        return None
    curve = _curve(index, tensor)
    if curve is None:
        return None
    codes = np.clip(np.linspace(lo, hi, steps + 1), GRID[0], GRID[-1])
    right = np.clip(np.searchsorted(GRID, codes), 1, len(GRID) - 1)
    share = ((codes - GRID[right - 1]) / (GRID[right] - GRID[right - 1]))[:, None]
    at_codes = curve[right - 1] * (1 - share) + curve[right] * share
    largest = float(np.abs(at_codes).max())
    # its slope far above 0, where it keeps rising (1 for a swish or a GELU), against its
    # steepest on the grid: a code in its units is this slope times a code of the input's
    rising = np.abs(curve[-1] - curve[-2]).min() / (GRID[-1] - GRID[-2])
    if rising < TOP * np.abs(np.diff(at_codes, axis=0)).max() * steps / (hi - lo):
        return None  # it stops rising: a score's or a gate's squashing function
    allowed = CLAMP * rising * (hi - GRID) / steps  # per sample, for a grid starting there
    noise = NOISE * max(1.0, largest)
    # monotonic from GRID's lowest sample up to each, in every channel, within the noise
    up = np.all(np.maximum.accumulate(curve) - curve <= noise, axis=1)
    down = np.all(curve - np.minimum.accumulate(curve) <= noise, axis=1)
    monotonic = np.logical_and.accumulate(up) | np.logical_and.accumulate(down)
    spread = np.max(np.abs(curve - curve[0]), axis=1)
    fits = np.flatnonzero(monotonic & (spread <= allowed) & (GRID <= 0))
    if not len(fits):
        return None
    floor = float(GRID[fits[-1]])
    code = (hi - floor) / steps
    exact = np.flatnonzero(monotonic & (spread <= EXACT * largest) & (GRID <= 0))
    if len(exact) and GRID[exact[-1]] >= floor - 2 * code:  # flat a code or two below: under it
        floor = float(GRID[exact[-1]]) - code
    return floor if floor > lo else None


def _curve(index: GraphIndex, tensor: str) -> np.ndarray | None:
    """The function that alone reads `tensor`, sampled on GRID: one row per sample, one column
    per channel of its constants and per output it reaches; None where no such function does.
    Sampled once per graph (a plan is built many times: per range method, per candidate)."""
    curves = _CURVES.setdefault(index, {})
    if tensor not in curves:
        curves[tensor] = _sampled(index, tensor)
    return curves[tensor]


_CURVES: weakref.WeakKeyDictionary[GraphIndex, dict[str, np.ndarray | None]] = (
    weakref.WeakKeyDictionary()
)


def _sampled(index: GraphIndex, tensor: str) -> np.ndarray | None:
    """`_curve`, computed: past the ops that only move `tensor`'s values, the elementwise
    region that reads it, run on GRID; None where there is none, or it cannot run alone."""
    head = tensor
    while (node := index.sole_consumer(head)) is not None and node.op_type in MOVES:
        if not all(index.is_constant(name) for name in node.input[1:] if name):
            return None
        head = node.output[0]
    region = _region(index, head)
    if region is None:
        return None
    nodes, exits = region
    constants = {i: index.initializers[i] for n in nodes for i in n.input if index.is_constant(i)}
    channels = max((int(np.prod(c.dims)) for c in constants.values()), default=1)
    if len(GRID) * channels * len(exits) > MAX_VALUES:
        log.info("no floor for %s: %d channels to sample", tensor, channels)
        return None
    try:
        values = _sample(index, head, nodes, exits, list(constants.values()))
    except Exception as error:  # ONNX Runtime's errors share no base: no floor, then
        log.info("no floor for %s: %s", tensor, error)
        return None
    return values if np.all(np.isfinite(values)) else None


def _region(index: GraphIndex, head: str) -> tuple[list[onnx.NodeProto], list[str]] | None:
    """The elementwise nodes that read only `head`, constants and each other, reached from
    `head`, and the tensors of theirs that others read: None if `head` itself is read
    elsewhere, or no node, or too many. Taken in waves, each reading only earlier ones, so the
    nodes come out in an order ONNX Runtime can run."""
    inside, taken, nodes, queue = {head}, set(), [], [head]
    while queue:
        ready = {}
        for name in queue:
            for node in index.consumers.get(name, []):
                inputs = [i for i in node.input if i and not index.is_constant(i)]
                if node.op_type in ELEMENTWISE and set(inputs) <= inside and id(node) not in taken:
                    ready[id(node)] = node
        taken.update(ready)
        nodes += ready.values()
        queue = [o for n in ready.values() for o in n.output if o]
        inside.update(queue)
        if len(nodes) > MAX_NODES:
            return None
    read_outside = {
        name
        for name in inside
        if name in index.graph_outputs
        or any(id(reader) not in taken for reader in index.consumers.get(name, []))
    }
    if not nodes or head in read_outside:
        return None
    return nodes, sorted(read_outside)


def _sample(
    index: GraphIndex,
    head: str,
    nodes: list[onnx.NodeProto],
    exits: list[str],
    constants: list[onnx.TensorProto],
) -> np.ndarray:
    """`nodes` run by ONNX Runtime with GRID as `head`, shaped to broadcast ahead of every
    constant's axes, each exit flattened to one row per sample."""
    shape = [len(GRID), *[1] * max((len(c.dims) for c in constants), default=0)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "floor",
        [value(head, onnx.TensorProto.FLOAT, shape)],
        [value(name, onnx.TensorProto.FLOAT, None) for name in exits],
        constants,
    )
    model = helper.make_model(graph, opset_imports=index.opsets)
    model.ir_version = index.ir_version
    session = open_session(model, threads=1)
    got = session.run(exits, {head: GRID.astype(np.float32).reshape(shape)})
    return np.concatenate([g.reshape(len(GRID), -1) for g in got], axis=1)
