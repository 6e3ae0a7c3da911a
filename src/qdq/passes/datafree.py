"""Data-free ranges (`qdq quantize --data-free`, Nagel et al. 2019): activation statistics from
the BatchNorm layers instead of calibration data.

A BatchNorm output is `gamma * x_hat + beta` with `x_hat` normalized, so channel c is modelled as
N(beta_c, gamma_c^2). These Gaussians are carried through the graph: ReLU by the clipped-normal
moments, Clip(0, c) as ReLU capped at c, layers without BatchNorm by linearity (means add, variances
add for independent inputs), pooling and reshapes unchanged. The range of a tensor is the union
over channels of `mean +- N_SIGMA * std` within its hard bounds; the means give the expected inputs
that analytical bias correction needs. Tensors the model cannot describe stay float.
`plan_data_free` turns them into the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import erf, sqrt

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex, attributes, clip_bounds, constant_tensors
from qdq.passes.bias_correction import correct_biases, correction_inputs
from qdq.plan.build import Plan, build_plan
from qdq.plan.decisions import static_decisions
from qdq.plan.flow import Int8Flow
from qdq.qparams import Range

N_SIGMA = 6.0  # measured on the depthwise digits model: 3 -> 7.6 dB, 4 -> 11.3, 6 -> 22.7
PASS_THROUGH = {
    "MaxPool",
    "GlobalAveragePool",
    "AveragePool",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Resize",
    "Identity",
}


@dataclass(frozen=True)
class Moments:
    """Per-channel Gaussian model of a tensor (channels on axis 1), with hard bounds."""

    mean: np.ndarray
    std: np.ndarray
    low: float = -np.inf
    high: float = np.inf

    def range(self) -> Range:
        lo = np.clip(self.mean - N_SIGMA * self.std, self.low, self.high)
        hi = np.clip(self.mean + N_SIGMA * self.std, self.low, self.high)
        return Range(float(np.min(lo)), float(np.max(hi)))


def batchnorm_moments(model: onnx.ModelProto) -> dict[str, Moments]:
    """N(beta, gamma^2) per channel for every BatchNormalization output of the original model."""
    constants = constant_tensors(model.graph)
    found = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and {node.input[1], node.input[2]} <= set(
            constants
        ):
            gamma = numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
            beta = numpy_helper.to_array(constants[node.input[2]]).astype(np.float64)
            found[node.output[0]] = Moments(beta, np.abs(gamma))
    return found


def propagate(
    index: GraphIndex, known: dict[str, Moments], input_range: tuple[float, float]
) -> dict[str, Moments]:
    """Moments of every tensor the rules can describe, in graph order."""
    lo, hi = input_range
    moments = dict(known)
    for name in index.graph_inputs:
        moments[name] = Moments(np.array((lo + hi) / 2), np.array((hi - lo) / sqrt(12)), lo, hi)
    for node in index.nodes:
        out = node.output[0]
        if out in moments or node.input[0] not in moments:
            continue
        source = moments[node.input[0]]
        derived = _derive(node, index, source, moments)
        if derived is not None:
            moments[out] = derived
    return moments


def _derive(node: onnx.NodeProto, index: GraphIndex, x: Moments, moments: dict) -> Moments | None:
    if node.op_type in PASS_THROUGH:
        return x
    if node.op_type == "Relu":
        return _relu(x)
    if node.op_type == "Clip":
        return _clip(node, index, x)
    if node.op_type in ("Conv", "Gemm", "MatMul") and index.is_constant(node.input[1]):
        return _linear(node, index, x)
    if node.op_type == "Add" and node.input[1] in moments:
        y = moments[node.input[1]]
        return Moments(x.mean + y.mean, np.sqrt(x.std**2 + y.std**2))
    return None


def _relu(x: Moments) -> Moments:
    """Moments of max(0, X) for X ~ N(mean, std^2): the clipped normal."""
    return _clipped(x, 0.0, np.inf)


def _clip(node: onnx.NodeProto, index: GraphIndex, x: Moments) -> Moments | None:
    """Clip(low, high) of X's Gaussian: the clipped normal between both bounds (a ReLU6's
    cap had only capped the mean: N(8, 3^2) got 6.0 +- 2.99 for 5.55 +- 1.06, and the bias
    correction these moments feed cost a model 3 dB); None where a bound is computed."""
    low, high = clip_bounds(node, index)
    if low is None or high is None:
        return None
    return _clipped(x, low, high)


def _clipped(x: Moments, low: float, high: float) -> Moments:
    """Moments of clip(X, low, high) for X ~ N(mean, std^2), either bound possibly infinite:
    with a, b the standardized bounds, E = mean (Phi(b) - Phi(a)) + std (phi(a) - phi(b)) +
    low Phi(a) + high (1 - Phi(b)), and E[X^2] likewise (Johnson et al.'s truncated normal
    plus the mass at each bound)."""
    std = np.maximum(x.std, 1e-12)
    mean = x.mean

    def at(bound: float, beyond: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Phi, phi and a * phi at a bound (of an infinite one: its limit, `beyond`)."""
        if not np.isfinite(bound):
            zeros = np.zeros_like(mean)
            return zeros + beyond, zeros, zeros
        a = (bound - mean) / std
        pdf = np.exp(-0.5 * a**2) / sqrt(2 * np.pi)
        return 0.5 * (1 + np.vectorize(erf)(a / sqrt(2))), pdf, a * pdf

    (cdf_a, pdf_a, apdf_a), (cdf_b, pdf_b, apdf_b) = at(low, 0.0), at(high, 1.0)
    inside = cdf_b - cdf_a
    lo, hi = (v if np.isfinite(v) else 0.0 for v in (low, high))  # times a mass of 0
    first = mean * inside + std * (pdf_a - pdf_b) + lo * cdf_a + hi * (1 - cdf_b)
    second = (
        (mean**2 + std**2) * inside
        + 2 * mean * std * (pdf_a - pdf_b)
        + std**2 * (apdf_a - apdf_b)
        + lo**2 * cdf_a
        + hi**2 * (1 - cdf_b)
    )
    std_out = np.sqrt(np.maximum(second - first**2, 0.0))
    return Moments(first, std_out, max(x.low, low), min(x.high, high))


def _linear(node: onnx.NodeProto, index: GraphIndex, x: Moments) -> Moments | None:
    """Means through the weights; variances through the squared weights (independent inputs).
    None where X's channels are not the layer's input channels (a Flatten of H x W > 1
    positions per channel, which a Gemm reads as C x H x W features, is spread to them)."""
    w = index.constant(node.input[1]).astype(np.float64)
    bias = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
    if node.op_type == "Conv":
        group = attributes(node).get("group", 1)
        m, cg = w.shape[:2]
        if x.mean.size not in (1, group * cg) or w.ndim < 3:
            return None
        channels = (np.arange(m) // (m // group))[:, None] * cg + np.arange(cg)[None, :]
        mean_in = np.broadcast_to(x.mean, (group * cg,))[channels]
        var_in = np.broadcast_to(x.std**2, (group * cg,))[channels]
        window = tuple(range(2, w.ndim))
        mean = (w.sum(axis=window) * mean_in).sum(axis=1)
        var = ((w**2).sum(axis=window) * var_in).sum(axis=1)
        return Moments(mean + bias, np.sqrt(var))
    if node.op_type == "Gemm":
        attrs = attributes(node)
        if attrs.get("transA", 0) or (np.ndim(bias) > 1 and np.shape(bias)[0] != 1):
            return None  # X's rows are not its features, or C varies along the batch
        w = w.T if attrs.get("transB", 0) else w
        w = w * attrs.get("alpha", 1.0)  # y = alpha * X W + beta * C
        bias = np.reshape(bias, -1) * attrs.get("beta", 1.0)
    if w.ndim != 2:
        return None
    rows = w.shape[0]
    mean, std = (a.reshape(-1) for a in np.broadcast_arrays(x.mean, x.std))
    if mean.size not in (1, rows):
        flatten = index.producer.get(node.input[0])
        spread = flatten is not None and flatten.op_type == "Flatten"
        if not (spread and attributes(flatten).get("axis", 1) == 1 and rows % mean.size == 0):
            return None
        mean, std = np.repeat(mean, rows // mean.size), np.repeat(std, rows // mean.size)
    mean_out = np.broadcast_to(mean, (rows,)) @ w
    var = np.broadcast_to(std**2, (rows,)) @ (w**2)
    return Moments(mean_out + bias, np.sqrt(var))


def mean_samples(index: GraphIndex, moments: dict[str, Moments], names: list[str]) -> dict:
    """Expected input samples (per-channel means spread over the static spatial shape) for
    analytical bias correction; tensors without a known shape, or whose channels the moments
    do not match, are left out."""
    samples = {}
    for name in names:
        shape = index.shape.get(name)
        if name not in moments or not shape or any(d is None for d in shape[1:]):
            continue
        per_channel = moments[name].mean.reshape(-1)
        if per_channel.size not in (1, shape[1]):  # a flattened C x H x W: C-major features
            if len(shape) != 2 or shape[1] % per_channel.size:
                continue
            per_channel = np.repeat(per_channel, shape[1] // per_channel.size)
        per_channel = np.broadcast_to(per_channel, (shape[1],))
        spread = per_channel.reshape((-1,) + (1,) * (len(shape) - 2))
        samples[name] = np.broadcast_to(spread, shape[1:]).astype(np.float64)
    return samples


def plan_data_free(
    model: onnx.ModelProto, config: QuantConfig, per_channel: bool, moments: dict[str, Moments]
) -> Plan:
    """The plan from BatchNorm statistics alone: ranges and expected inputs (for analytical
    bias correction) propagated through the graph from `config.input_range`."""
    index = GraphIndex(model)
    decisions = static_decisions(index, config)
    everything = propagate(index, moments, config.input_range)
    ranges, unfit = {}, {}
    for name in Int8Flow(index, decisions, config).calibration_targets():
        if name in everything:
            ranges[name] = everything[name].range()
        else:
            unfit[name] = "has no statistics without data (no BatchNorm or input upstream)"
    plan = build_plan(index, decisions, ranges, unfit, config, per_channel)
    if config.bias_correction:
        quantizable = [name for name, d in decisions.items() if d.quantized]
        expected = mean_samples(index, everything, correction_inputs(index, quantizable))
        plan = correct_biases(index, plan, expected)
    return plan
