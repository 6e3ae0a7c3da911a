"""Move activation outliers into the next layer's weights (SmoothQuant, Xiao et al. 2023).

A transformer's FFN hidden state (after GELU) has a few channels far larger than the rest, and
one int8 grid per tensor leaves the others a handful of codes. For a MatMul `X W`, dividing
channel i of X by s_i and multiplying row i of W by s_i is the same function; with
`s_i = max|X_i|^a / max|W_i|^(1 - a)` the activation's channels come closer together at the cost
of the weights' (their scales are per output column, so a row scaled up costs precision in
every column). No single `a` suits every layer (docs/ptq.md), so each layer picks its own: every
candidate, and no smoothing at all, is scored by that layer's int8 output error on calibration
rows, and the best one wins.

A convolution is the same sum over its input channels at every tap, so its input is smoothed the
same way (channel i of X divided by s_i, W[:, i] multiplied by it): Magika's convolution reads a
LayerNorm's output whose channels' maxima run from 13 to 39, and PP-OCR's read float residual
sums and gates (docs/ptq.md measures both). Depthwise and grouped convolutions are left alone
(a channel there feeds one group only), and so is an input of one channel (nothing to even out).

Only where a float op makes X and only MatMuls or only Convs with constant weights read it: the
division then folds into a LayerNorm's scale and shift (MatMuls, whose channels are the
LayerNorm's last axis), or else is one float Mul before the readers. An int8 kernel's output
would lose its int8 flow to that Mul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qdq.affine import fake_quantize
from qdq.config import QuantConfig
from qdq.data import Samples
from qdq.onnx.graph import (
    SMOOTHING_MUL,
    GraphIndex,
    attributes,
    computing,
    drop_unread_initializers,
)
from qdq.onnx.sessions import Use, fails_on_data, open_session
from qdq.plan.calibrate import budgeted
from qdq.plan.constants import weight_qparams
from qdq.plan.decisions import static_decisions
from qdq.plan.flow import Int8Flow
from qdq.qparams import Range, choose_qparams

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SAMPLES = 128  # leading calibration samples whose channel maxima set s
ROWS = 1024  # rows of X per site, spread over those samples, that score the candidates
COLUMNS = 4096  # a reader's products scored per row, spread over its outputs (and a Conv's taps)


@dataclass(frozen=True)
class Site:
    """A tensor X that float op `producer` makes and only the MatMuls or only the Convs
    `readers` read."""

    tensor: str
    producer: onnx.NodeProto
    readers: tuple[onnx.NodeProto, ...]

    @property
    def conv(self) -> bool:
        return self.readers[0].op_type == "Conv"

    @property
    def axis(self) -> int:
        """X's channel axis: a MatMul sums over the last, a Conv over axis 1."""
        return 1 if self.conv else -1

    def weight(self, value: np.ndarray) -> Weight:
        """A reader's weight, its axis of X's channels: 1 in a Conv's (O, C, k...), 0 in a
        MatMul's (C, O)."""
        return Weight(value, 1 if self.conv else 0)


@dataclass(frozen=True)
class Weight:
    """A reader's constant weight, with the axis of X's channels in it (0 for a MatMul's (C, O),
    1 for a Conv's (O, C, k...)); the other leading axis holds the outputs."""

    value: np.ndarray
    axis: int

    def rows(self, value: np.ndarray | None = None) -> np.ndarray:
        """(C, everything else): X's rows times this are the products the reader sums."""
        value = self.value if value is None else value
        return np.moveaxis(value, self.axis, 0).reshape(value.shape[self.axis], -1)

    def scored(self, value: np.ndarray | None = None) -> np.ndarray:
        """`rows`, at most COLUMNS of them spread evenly: the products the error is taken on
        (Silero's STFT, a Conv of 258 x 256 taps, would make 66048 per row of X)."""
        rows = self.rows(value)
        return rows[:, :: -(-rows.shape[1] // COLUMNS)]

    def scaled(self, scale: np.ndarray) -> np.ndarray:
        shape = [1] * self.value.ndim
        shape[self.axis] = -1
        return self.value * scale.reshape(shape)

    def quantized_scored(self, value: np.ndarray, config: QuantConfig) -> np.ndarray:
        """`scored` of `value` on the weight grid, one scale per output (as the plan puts it)."""
        return self.scored(fake_quantize(value, weight_qparams(value, 1 - self.axis, config)))


def _reads_channels(reader: onnx.NodeProto, tensor: str, index: GraphIndex) -> bool:
    """An int8-able MatMul or ungrouped Conv that reads `tensor` as X, with a constant weight."""
    if reader.input[0] != tensor or len(reader.input) < 2 or not index.is_constant(reader.input[1]):
        return False
    dims = index.initializers[reader.input[1]].dims
    if reader.op_type == "MatMul":  # (C, O); one channel has nothing to even out
        return len(dims) == 2 and dims[0] > 1
    if reader.op_type != "Conv" or len(dims) < 3:
        return False
    return attributes(reader).get("group", 1) == 1 and dims[1] > 1


def find_sites(flow: Int8Flow) -> list[Site]:
    """Every X that a float op makes and that only int8 MatMuls with constant 2-D weights, or
    only int8 ungrouped Convs with constant weights, read."""
    index, decisions = flow.index, flow.decisions
    sites: list[Site] = []
    for tensor, readers in index.consumers.items():
        producer = index.producer.get(tensor)
        if producer is None or flow.carries(tensor) or tensor in index.graph_outputs:
            continue
        if (
            len({r.op_type for r in readers}) == 1
            and all(decisions[r.name].quantized for r in readers)
            and all(_reads_channels(r, tensor, index) for r in readers)
        ):
            sites.append(Site(tensor, producer, tuple(readers)))
    return sites


def smooth(
    model: onnx.ModelProto, samples: Samples, config: QuantConfig
) -> tuple[onnx.ModelProto, dict[str, float]]:
    """A copy of `model` with outliers moved into the weights wherever that lowers the layer's
    int8 error, and the smoothed tensors with the exponent `a` each chose."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model, index = copy, GraphIndex(copy)
    sites = find_sites(Int8Flow(index, static_decisions(index, config), config))
    if not sites:
        return model, {}
    maxima, rows = _statistics(model, sites, samples, config.batch_size)
    chosen: dict[str, float] = {}
    muls: list[onnx.NodeProto] = []
    for site in sites:
        if not np.isfinite(maxima[site.tensor]).all():  # a mask or sentinel: left to the plan
            continue
        weights = [site.weight(index.constant(r.input[1]).astype(np.float32)) for r in site.readers]
        best = _best_scale(rows[site.tensor], maxima[site.tensor], weights, config)
        if best is None:
            continue
        alpha, scale = best
        muls.extend(_apply(model, index, site, scale))
        chosen[site.tensor] = alpha
    if muls:  # each just before the first node that reads it (node edits above stay live)
        nodes = list(model.graph.node)
        for mul in muls:
            nodes.insert(next(i for i, n in enumerate(nodes) if mul.output[0] in n.input), mul)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    drop_unread_initializers(model)
    return model, chosen


def _statistics(
    model: onnx.ModelProto, sites: list[Site], samples: Samples, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per site: each channel's largest |x| over the leading samples, and up to ROWS rows (copied
    out, so no batch outlives its turn; batches sized like calibration's). Only the nodes the
    sites are computed from run: a site near the input costs a fraction of a forward pass."""
    names = [site.tensor for site in sites]
    axes = {site.tensor: site.axis for site in sites}
    session = open_session(computing(model, names), Use.CALIBRATION)  # the sites' ancestors only
    count = min(samples.count, SAMPLES)
    maxima: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def take(feed: dict[str, np.ndarray]) -> int:
        """Fold one batch in; returns the bytes it captured."""
        batch = samples.held_in(feed)
        with fails_on_data("the float model on the calibration samples"):
            values = session.run(names, feed)
        for name, value in zip(names, values, strict=True):
            value = np.moveaxis(value, axes[name], -1)
            flat = value.reshape(-1, value.shape[-1])
            peak = np.abs(flat).max(axis=0)
            maxima[name] = np.maximum(maxima.get(name, peak), peak)
            stride = max(1, math.ceil(flat.shape[0] / batch * count / ROWS))
            kept[name].append(flat[::stride].copy())
        return sum(v.nbytes for v in values)

    per_sample = take(next(samples.batches(1)))
    batch_size = budgeted(batch_size, per_sample)
    for feed in samples.batches(batch_size, first=1, last=count):
        take(feed)
    rows = {name: np.concatenate(kept[name])[:ROWS] for name in names}
    return maxima, rows


def _best_scale(
    rows: np.ndarray, maxima: np.ndarray, weights: list[Weight], config: QuantConfig
) -> tuple[float, np.ndarray] | None:
    """(a, s) of the candidate with the least int8 error summed over the readers, or None when
    leaving X as it is does best."""
    exact = [rows @ w.scored() for w in weights]
    weight_max = np.max([np.abs(w.rows()).max(axis=1) for w in weights], axis=0)
    plain = [w.value for w in weights]
    best_error, best = _error(rows, weights, plain, exact, config), None
    usable = (maxima > 0) & (weight_max > 0)
    for alpha in ALPHAS:
        scale = np.ones_like(maxima)
        scale[usable] = maxima[usable] ** alpha / weight_max[usable] ** (1 - alpha)
        scale = scale.astype(np.float32)
        scaled = [w.scaled(scale) for w in weights]
        error = _error(rows / scale, weights, scaled, exact, config)
        if error < best_error:
            best_error, best = error, (alpha, scale)
    return best


def _error(
    rows: np.ndarray,
    weights: list[Weight],
    values: list[np.ndarray],
    exact: list[np.ndarray],
    config: QuantConfig,
) -> float:
    """Squared error of the int8 products (X per tensor, each weight `values` per output)
    against the exact ones: for a Conv, of each tap's products, which its output sums."""
    x = fake_quantize(rows, choose_qparams(Range(rows.min(), rows.max()), config.activations))
    total = 0.0
    for weight, value, want in zip(weights, values, exact, strict=True):
        got = x @ weight.quantized_scored(value, config)
        total += float(np.sum((got - want) ** 2, dtype=np.float64))
    return total


def _apply(
    model: onnx.ModelProto, index: GraphIndex, site: Site, scale: np.ndarray
) -> list[onnx.NodeProto]:
    """Multiply the readers' weights along X's channels by `scale` and divide X by it: in a
    LayerNorm's or a BatchNorm's own scale and shift, or else by a new Mul, returned for the
    caller to place."""
    # X / s broadcasts along X's channels: (C, 1, 1) against a Conv's (N, C, H, W)
    spatial = index.constant(site.readers[0].input[1]).ndim - 2 if site.conv else 0
    for reader in site.readers:
        weight = site.weight(index.constant(reader.input[1])).scaled(scale)
        reader.input[1] = _new_constant(model, f"{reader.name}_smoothed_w", weight)
    producer = site.producer
    if (
        not site.conv
        and producer.op_type == "LayerNormalization"
        and all(index.is_constant(name) for name in producer.input[1:] if name)
    ):
        for i, name in enumerate(producer.input[1:], start=1):
            if name:
                value = index.constant(name) / scale
                producer.input[i] = _new_constant(model, f"{producer.name}_smoothed_{i}", value)
        return []
    if site.conv and _divided_in_batch_norm(model, index, site, scale):
        return []
    divisor = (1 / scale).reshape((-1,) + (1,) * spatial)
    inverse = _new_constant(model, f"{site.tensor}_smoothing", divisor)
    mul = helper.make_node(
        "Mul",
        [site.tensor, inverse],
        [f"{site.tensor}_smoothed"],
        name=f"{site.tensor}{SMOOTHING_MUL}",
    )
    for reader in site.readers:
        reader.input[0] = mul.output[0]
    typed = next((v for v in model.graph.value_info if v.name == site.tensor), None)
    if typed is not None:  # the smoothed tensor has X's type and shape
        model.graph.value_info.append(typed)
        model.graph.value_info[-1].name = mul.output[0]
    return [mul]


def _divided_in_batch_norm(
    model: onnx.ModelProto, index: GraphIndex, site: Site, scale: np.ndarray
) -> bool:
    """Divide X by `scale` in the BatchNormalization that makes it, directly or through a Relu
    (relu(y) / s = relu(y / s) for s > 0): its scale and shift over s. DenseNet's BatchNorm ->
    ReLU -> Conv after each concatenation, which no Conv before it can take, had a float Mul
    before every such Conv (61 of them: 1.10x its time without)."""
    node = site.producer
    if node.op_type == "Relu":
        node = index.producer.get(node.input[0])
        if node is None or index.sole_consumer(node.output[0]) is not site.producer:
            return False
    if (
        node.op_type != "BatchNormalization"
        or len([o for o in node.output if o]) != 1
        or not all(index.is_constant(name) for name in node.input[1:3])
        or not (np.isfinite(scale).all() and (scale > 0).all())
    ):
        return False
    for i in (1, 2):  # y = scale * (x - mean) / sqrt(var + eps) + shift
        value = index.constant(node.input[i]) / scale
        node.input[i] = _new_constant(model, f"{node.name}_smoothed_{i}", value)
    return True


def _new_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return name
