"""Move activation outliers into the next layer's weights (SmoothQuant, Xiao et al. 2023).

A transformer's FFN hidden state (after GELU) has a few channels far larger than the rest, and
one int8 grid per tensor leaves the others a handful of codes. For a MatMul `X W`, dividing
channel i of X by s_i and multiplying row i of W by s_i is the same function; with
`s_i = max|X_i|^a / max|W_i|^(1 - a)` the activation's channels come closer together at the cost
of the weights' (their scales are per output column, so a row scaled up costs precision in
every column). No single `a` suits every layer (docs/ptq.md), so each layer picks its own: every
candidate, and no smoothing at all, is scored by that layer's int8 output error on calibration
rows, and the best one wins.

Only where a float op makes X and only MatMuls with constant weights read it: the division then
folds into a LayerNorm's scale and shift, or else is one float Mul before the MatMuls. An int8
kernel's output would lose its int8 flow to that Mul.
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
from qdq.onnx.graph import GraphIndex
from qdq.onnx.sessions import fails_on_data, session_with_outputs
from qdq.plan.calibrate import budgeted
from qdq.plan.constants import weight_qparams
from qdq.plan.decisions import static_decisions
from qdq.plan.flow import Int8Flow
from qdq.qparams import Range, choose_qparams

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SAMPLES = 128  # leading calibration samples whose channel maxima set s
ROWS = 1024  # rows of X per site, spread over those samples, that score the candidates


@dataclass(frozen=True)
class Site:
    """A tensor X that float op `producer` makes and only the MatMuls `readers` read."""

    tensor: str
    producer: onnx.NodeProto
    readers: tuple[onnx.NodeProto, ...]


def find_sites(flow: Int8Flow) -> list[Site]:
    """Every X that a float op makes and that only int8 MatMuls with constant 2-D weights read."""
    index, decisions = flow.index, flow.decisions
    sites: list[Site] = []
    for tensor, readers in index.consumers.items():
        producer = index.producer.get(tensor)
        if producer is None or flow.carries(tensor):
            continue
        if (
            all(
                r.op_type == "MatMul"
                and decisions[r.name].quantized
                and r.input[0] == tensor
                and index.is_constant(r.input[1])
                and len(index.initializers[r.input[1]].dims) == 2
                for r in readers
            )
            and tensor not in index.graph_outputs
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
        weights = [index.constant(r.input[1]).astype(np.float32) for r in site.readers]
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
    used = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)
    return model, chosen


def _statistics(
    model: onnx.ModelProto, sites: list[Site], samples: Samples, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per site: each channel's largest |x| over the leading samples, and up to ROWS rows (copied
    out, so no batch outlives its turn; batches sized like calibration's)."""
    names = [site.tensor for site in sites]
    session = session_with_outputs(model, names)
    count = min(samples.count, SAMPLES)
    maxima: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def take(feed: dict[str, np.ndarray]) -> int:
        """Fold one batch in; returns the bytes it captured."""
        batch = len(next(iter(feed.values())))
        with fails_on_data("the float model on the calibration samples"):
            values = session.run(names, feed)
        for name, value in zip(names, values, strict=True):
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
    rows: np.ndarray, maxima: np.ndarray, weights: list[np.ndarray], config: QuantConfig
) -> tuple[float, np.ndarray] | None:
    """(a, s) of the candidate with the least int8 error summed over the readers, or None when
    leaving X as it is does best."""
    exact = [rows @ w for w in weights]
    weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    best_error, best = _error(rows, weights, exact, config), None
    usable = (maxima > 0) & (weight_max > 0)
    for alpha in ALPHAS:
        scale = np.ones_like(maxima)
        scale[usable] = maxima[usable] ** alpha / weight_max[usable] ** (1 - alpha)
        scale = scale.astype(np.float32)
        error = _error(rows / scale, [w * scale[:, None] for w in weights], exact, config)
        if error < best_error:
            best_error, best = error, (alpha, scale)
    return best


def _error(
    rows: np.ndarray, weights: list[np.ndarray], exact: list[np.ndarray], config: QuantConfig
) -> float:
    """Squared error of the int8 products (X per tensor, W per column) against the exact ones."""
    x = fake_quantize(rows, choose_qparams(Range(rows.min(), rows.max()), config.activations))
    total = 0.0
    for w, want in zip(weights, exact, strict=True):
        got = x @ fake_quantize(w, weight_qparams(w, 1, config))
        total += float(np.sum((got - want) ** 2, dtype=np.float64))
    return total


def _apply(
    model: onnx.ModelProto, index: GraphIndex, site: Site, scale: np.ndarray
) -> list[onnx.NodeProto]:
    """Multiply the readers' weight rows by `scale` and divide X by it: in a LayerNorm's own
    scale and shift, or else by a new Mul, returned for the caller to place."""
    for reader in site.readers:
        weight = index.constant(reader.input[1]) * scale[:, None]
        reader.input[1] = _new_constant(model, f"{reader.name}_smoothed_w", weight)
    producer = site.producer
    if producer.op_type == "LayerNormalization" and all(
        index.is_constant(name) for name in producer.input[1:] if name
    ):
        for i, name in enumerate(producer.input[1:], start=1):
            if name:
                value = index.constant(name) / scale
                producer.input[i] = _new_constant(model, f"{producer.name}_smoothed_{i}", value)
        return []
    inverse = _new_constant(model, f"{site.tensor}_smoothing", 1 / scale)
    mul = helper.make_node(
        "Mul", [site.tensor, inverse], [f"{site.tensor}_smoothed"], name=f"{site.tensor}_smooth"
    )
    for reader in site.readers:
        reader.input[0] = mul.output[0]
    typed = next((v for v in model.graph.value_info if v.name == site.tensor), None)
    if typed is not None:  # the smoothed tensor has X's type and shape
        model.graph.value_info.append(typed)
        model.graph.value_info[-1].name = mul.output[0]
    return [mul]


def _new_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return name
