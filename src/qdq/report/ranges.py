"""What the HTML report draws of ranges: activation histograms with each method's threshold,
and per-channel weight ranges, read from a quantized model's Q/DQ nodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.observers import KL, MSE, Histogram, Percentile
from qdq.qparams import Range

DISPLAY_BINS = 160  # bars per drawn histogram: enough to see a tail, few enough to stay light


@dataclass(frozen=True)
class ActivationView:
    """One quantized activation: its histogram over the observed range, each calibration
    method's range on it, and the range the INT8 model holds (`chosen`)."""

    tensor: str
    edges: np.ndarray  # DISPLAY_BINS + 1 bin edges
    counts: np.ndarray  # DISPLAY_BINS counts
    methods: dict[str, tuple[float, float]]  # minmax, percentile, kl, mse -> (lo, hi)
    chosen: tuple[float, float]
    sqnr_db: float | None = None

    @property
    def closest(self) -> str:
        """The method whose range is nearest the chosen one (what calibration picked)."""
        lo, hi = self.chosen
        distance = {m: abs(a - lo) + abs(b - hi) for m, (a, b) in self.methods.items()}
        return min(distance, key=distance.__getitem__)


@dataclass(frozen=True)
class WeightView:
    """One weight tensor's float range per output channel (dequantized from its int8 codes,
    so within half a step of the float weights)."""

    tensor: str
    lo: np.ndarray
    hi: np.ndarray

    @property
    def spread(self) -> float:
        """Per-tensor magnitude over the median channel's: how much per-tensor scaling would
        cost the typical channel (1 = none; MobileNet's depthwise weights reach 100s)."""
        magnitude = np.maximum(-self.lo, self.hi)
        median = float(np.median(magnitude))
        return float(magnitude.max() / median) if median > 0 else float("inf")


def activation_view(tensor: str, hist: Histogram, chosen: tuple[float, float]) -> ActivationView:
    """The histogram cut to its observed range and regrouped into DISPLAY_BINS bars, with the
    minmax, percentile (99.999), KL and MSE ranges (8 bits) of the same histogram."""
    methods = {"minmax": Range(hist.lo, hist.hi), "percentile": Percentile()(hist)}
    methods |= {"kl": KL(8)(hist), "mse": MSE(8)(hist)}
    counts, width, half = hist.counts[0], float(hist.width[0]), hist.half
    lo, hi = float(hist.lo[0]), float(hist.hi[0])
    first = half + int(np.floor(lo / width)) if width > 0 else half
    last = half + int(np.ceil(hi / width)) if width > 0 else half + 1
    first = min(max(first, 0), counts.size - 1)  # a constant tensor's lone value at an edge
    kept = counts[first : max(last, first + 1)]
    group = -(-kept.size // DISPLAY_BINS)
    grouped = np.pad(kept, (0, -kept.size % group)).reshape(-1, group).sum(axis=1)
    edges = (first - half + np.arange(grouped.size + 1) * group) * width
    return ActivationView(
        tensor=tensor,
        edges=edges,
        counts=grouped,
        methods={k: (float(r.lo[0]), float(r.hi[0])) for k, r in methods.items()},
        chosen=chosen,
    )


def quantized_activations(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """{float tensor a QuantizeLinear reads: the range its scale and zero point cover}, for the
    activations (not the constants) of a QDQ model."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        scale = constants.get(node.input[1])
        zero = constants.get(node.input[2]) if len(node.input) > 2 else np.uint8(0)
        if scale is None or zero is None or scale.size != 1:
            continue
        info = np.iinfo(zero.dtype)
        z = float(zero.ravel()[0])
        s = float(scale.ravel()[0])
        out[node.input[0]] = ((info.min - z) * s, (info.max - z) * s)
    return out


def weight_views(model: onnx.ModelProto) -> list[WeightView]:
    """Per-channel ranges of every weight the model dequantizes per axis (rank >= 2)."""
    constants = {t.name: t for t in model.graph.initializer}
    readers = {name: n for n in model.graph.node for name in n.input}
    views = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in constants:
            continue
        codes = numpy_helper.to_array(constants[node.input[0]])
        if codes.ndim < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
        reader = readers.get(node.output[0])
        if scale.size == 1 and reader is not None:  # per tensor: the reader's output channels
            axis = _output_axis(reader, codes.ndim, axis)
        zero = numpy_helper.to_array(constants[node.input[2]]) if len(node.input) > 2 else 0
        shape = [1] * codes.ndim
        shape[axis] = -1
        per_axis = shape if scale.size > 1 else [1]
        values = (codes.astype(np.float64) - np.reshape(zero, per_axis)) * scale.reshape(per_axis)
        rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        label = f"{reader.name if reader is not None else '?'} weight"
        views.append(WeightView(label, rows.min(axis=1), rows.max(axis=1)))
    return views


def _output_axis(node: onnx.NodeProto, rank: int, given: int) -> int:
    """The weight axis of `node`'s output channels: 0 for a Conv or a transB Gemm, 1 for a
    ConvTranspose, the last for a MatMul or a plain Gemm; else `given`."""
    if node.op_type == "Gemm":
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        return 0 if transposed else rank - 1
    return {"Conv": 0, "ConvTranspose": 1, "MatMul": rank - 1}.get(node.op_type, given)
