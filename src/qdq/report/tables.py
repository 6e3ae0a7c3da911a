"""Calibration tables for runtimes that take ranges, not a QDQ model: TensorRT and ncnn.

Both want symmetric int8, so each Q/DQ pair of a model qdq wrote gives the symmetric range
amax = max(|lo|, |hi|) of the real interval its grid spans (docs/tables.md):

    lo = (qmin - zero_point) * scale,  hi = (qmax - zero_point) * scale

with int8 [qmin, qmax] = [-127, 127] (the grid TensorRT and ncnn quantize to) where the zero
point is 0, [-128, 127] where it is not (an asymmetric grid uses its lowest code), and uint8
[0, 255]. A symmetric int8 scale thus passes unchanged: amax / 127 = scale. uint8 over [0, 5.1]
(scale 0.02, zero point 0) gives amax 5.1: TensorRT's scale 5.1 / 127 = 0.040157, ncnn's
127 / 5.1 = 24.902.

- TensorRT's calibration cache (what `IInt8Calibrator::writeCalibrationCache` writes and
  `readCalibrationCache` reads): a header `TRT-<version>-EntropyCalibration2`, then one line
  `tensor: <scale as the big-endian hex of its float32 bits>` per tensor, scale = amax / 127,
  names as in the float ONNX graph.
- ncnn's int8 table (what `ncnn2table` writes and `ncnn2int8` reads): per quantized layer a line
  `<layer>_param_0 s_1 ... s_n` of weight scales per output channel (per group for a depthwise
  convolution) and a line `<layer> s` for its input blob, scale = 127 / amax.
"""

from __future__ import annotations

import enum
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qdq.arrayfile import check_regular
from qdq.errors import DataError, ModelError, choice
from qdq.lowbit import WeightGrid
from qdq.onnx.graph import GraphIndex, attributes, is_smoothing, subgraphs
from qdq.onnx.model import METADATA_KEY, UNIFORM_INT8, WEIGHTS_KEY, load_model
from qdq.outputs import check_output, staged

TENSORRT_HEADER = "TRT-8601-EntropyCalibration2"  # TensorRT 8.6.1's entropy calibrator v2
GRIDS = {np.dtype(np.int8): (-127, 127), np.dtype(np.uint8): (0, 255)}
# The ONNX ops whose weights ncnn quantizes (Convolution, ConvolutionDepthWise, InnerProduct).
NCNN_LAYERS = {
    "Conv": ("Convolution", "ConvolutionDepthWise"),
    "Gemm": ("InnerProduct",),
    "MatMul": ("InnerProduct",),
}
WINOGRAD_WEIGHT_LEVELS = 31  # ncnn2table: 3x3 stride-1 convs get 6-bit weights (int8 Winograd)


class TableFormat(enum.StrEnum):
    """The calibration-table formats qdq writes."""

    TENSORRT = "tensorrt"
    NCNN = "ncnn"


@dataclass(frozen=True)
class Layer:
    """A quantized Conv/Gemm/MatMul as ncnn sees it: its input and its weights' ranges."""

    node: str
    input: str  # the float name of the activation it reads
    weight_amax: np.ndarray  # per output channel (per group for a grouped convolution)
    winograd: bool  # a 3x3 stride-1 convolution, which ncnn runs with 6-bit weights


@dataclass(frozen=True)
class Ranges:
    """The symmetric ranges of a quantized model: amax per activation and per layer's weights."""

    activations: Mapping[str, float]
    layers: tuple[Layer, ...]
    weights: str = UNIFORM_INT8  # the weights' grid and bits (WEIGHTS_KEY; older files: this)


def symmetric_amax(scale: np.ndarray, zero_point: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """max(|lo|, |hi|) of the real interval a scale and zero point span (the module's docstring).

    >>> round(float(symmetric_amax(np.float32(0.02), np.uint8(0), np.dtype(np.uint8))), 6)
    5.1
    """
    qmin, qmax = GRIDS[np.dtype(dtype)]
    scale = np.asarray(scale, np.float64)
    zero_point = np.asarray(zero_point, np.float64)
    if np.dtype(dtype) == np.int8:  # an asymmetric int8 grid uses its lowest code too
        qmin = np.where(zero_point != 0, qmin - 1, qmin)
    return np.maximum(np.abs(qmin - zero_point), np.abs(qmax - zero_point)) * scale


def read_ranges(model: onnx.ModelProto) -> Ranges:
    """The symmetric ranges of a model that qdq quantized, from its Q/DQ pairs."""
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ModelError(
            f"the model has no {METADATA_KEY!r} metadata, so qdq did not write it; "
            "quantize the float model with `qdq quantize` first"
        )
    try:
        copies = json.loads(props[METADATA_KEY])  # float name -> dequantized copy
    except ValueError:
        copies = None
    if any(n.op_type == "If" and _has_qdq(n) for n in model.graph.node):
        raise ModelError(
            "the model's quantized layers sit inside If branches (qdq quantized the branch its "
            "calibration samples took), which calibration tables have no place for; quantize "
            "the branch's network as a model of its own to export its tables"
        )
    index = GraphIndex(model)
    if any(is_smoothing(n) for n in index.nodes):
        raise ModelError(
            "the model was smoothed (SmoothQuant divided tensors and moved the factors into "
            "weights), so its ranges are not the float model's, which a runtime calibrates "
            "with the table; quantize it again with --no-smoothing (`--table` does so itself)"
        )
    made = {n.output[0] for n in index.nodes if n.op_type == "DequantizeLinear"}
    if not isinstance(copies, dict) or not all(
        isinstance(name, str) and isinstance(copy, str) and copy in made
        for name, copy in copies.items()
    ):
        raise ModelError(
            f"the model's {METADATA_KEY!r} metadata does not match its Q/DQ pairs (a QOperator "
            "file, or one edited since); export tables from the QDQ file `qdq quantize` writes "
            "by default"
        )
    activations = {name: _amax(index, index.producer[copy]) for name, copy in copies.items()}
    floats = {copy: name for name, copy in copies.items()}
    layers = tuple(
        _layer(index, node, dq, floats[node.input[0]])
        for node in index.nodes
        if node.op_type in NCNN_LAYERS
        and node.input[0] in floats
        and (dq := _weight_dq(index, node)) is not None
    )
    weights = props.get(WEIGHTS_KEY, UNIFORM_INT8)
    grids = "|".join(g.value for g in WeightGrid)
    if not re.fullmatch(f"({grids}):[2-8]", weights):
        raise ModelError(
            f"the model's {WEIGHTS_KEY!r} metadata {weights!r:.40} is no GRID:BITS qdq writes "
            "(e.g. uniform:8); export tables from the file `qdq quantize` wrote"
        )
    return Ranges({k: float(v) for k, v in activations.items()}, layers, weights)


def _has_qdq(node: onnx.NodeProto) -> bool:
    """Whether a DequantizeLinear sits in `node`'s subgraphs, at any depth."""
    return any(
        inner.op_type == "DequantizeLinear" or _has_qdq(inner)
        for graph in subgraphs(node)
        for inner in graph.node
    )


def _amax(index: GraphIndex, dq: onnx.NodeProto) -> np.ndarray:
    """The symmetric range of a DequantizeLinear's grid (its zero point's dtype: int8, uint8)."""
    zero_point = index.constant(dq.input[2])
    return symmetric_amax(index.constant(dq.input[1]), zero_point, zero_point.dtype)


def _weight_dq(index: GraphIndex, node: onnx.NodeProto) -> onnx.NodeProto | None:
    dq = index.producer.get(node.input[1]) if len(node.input) > 1 else None
    if dq is None or dq.op_type != "DequantizeLinear" or not index.is_constant(dq.input[0]):
        return None
    return dq


def _layer(index: GraphIndex, node: onnx.NodeProto, dq: onnx.NodeProto, source: str) -> Layer:
    """One output channel per row of ncnn's weights: axis 0 of a Conv or a transB Gemm's
    weight, the last axis of a MatMul's or a plain Gemm's."""
    weights = index.constant(dq.input[0])
    attrs = attributes(node)
    axis = 0 if node.op_type == "Conv" or attrs.get("transB", 0) else weights.ndim - 1
    amax = _amax(index, dq) * np.ones(weights.shape[axis])
    group = int(attrs.get("group", 1))
    if group > 1:  # ncnn's ConvolutionDepthWise keeps one weight scale per group
        amax = amax.reshape(group, -1).max(axis=1)
    winograd = (
        node.op_type == "Conv"
        and group == 1
        and tuple(attrs.get("kernel_shape", weights.shape[2:])) == (3, 3)
        and all(s == 1 for s in attrs.get("strides", [1, 1]))
        and all(d == 1 for d in attrs.get("dilations", [1, 1]))
    )
    return Layer(node.name, source, amax, winograd)


def tensorrt_cache(ranges: Ranges, header: str = TENSORRT_HEADER) -> str:
    """TensorRT's calibration cache: `name: hex` lines, scale = amax / 127.

    >>> tensorrt_cache(Ranges({"x": 127.0}, ()))
    'TRT-8601-EntropyCalibration2\\nx: 3f800000\\n'
    """
    lines = [header]
    for name, amax in ranges.activations.items():
        bits = struct.unpack(">I", struct.pack(">f", amax / 127))[0]
        lines.append(f"{name}: {bits:08x}")
    return "\n".join(lines) + "\n"


def parse_tensorrt_cache(text: str) -> dict[str, float]:
    """Scale per tensor of a TensorRT calibration cache (the header line is skipped)."""
    scales = {}
    for number, line in enumerate(text.splitlines()[1:], start=2):
        name, sep, value = line.rpartition(": ")
        try:
            scales[name] = struct.unpack(">f", bytes.fromhex(value.strip()))[0]
        except (ValueError, struct.error):
            sep = ""
        if not sep:
            raise ModelError(
                f"line {number} of the calibration cache is not `name: <8 hex digits>`: {line!r}"
            )
    return scales


def ncnn_table(ranges: Ranges, names: Mapping[str, str] | None = None) -> str:
    """ncnn's int8 table: per layer, weight scales per output channel then the input's scale.

    `names` maps ONNX node names to ncnn layer names (`ncnn_layer_names`); by default the node
    names, as onnx2ncnn names its layers. Scales are 127 / amax (31 / amax for the weights of a
    3x3 stride-1 convolution, which ncnn runs as int8 Winograd with 6-bit weights)."""
    if not ranges.layers:
        raise ModelError(
            "the model has no quantized Conv, Gemm or MatMul, the layers an ncnn table names; "
            "there is no table to write (a TensorRT cache holds its activations' ranges)"
        )
    if ranges.weights != UNIFORM_INT8:
        grid, bits = ranges.weights.split(":")
        raise ModelError(
            f"the model's weights are {grid} {bits}-bit, but ncnn's int8 layers quantize their "
            "float weights to 8-bit uniform codes themselves, so no ncnn table carries them; "
            "quantize with the default 8-bit uniform weights for ncnn"
        )
    names = names or {}
    weights, inputs = [], []
    for layer in ranges.layers:
        name = names.get(layer.node, layer.node)
        levels = WINOGRAD_WEIGHT_LEVELS if layer.winograd else 127
        scales = "".join(f"{s:f} " for s in _inverse(levels, layer.weight_amax))
        weights.append(f"{name}_param_0 {scales}")  # "%f " per scale, as ncnn2table writes
        inputs.append(f"{name} {_inverse(127, np.float64(ranges.activations[layer.input])):f} ")
    return "\n".join(weights + inputs) + "\n"


def _inverse(levels: int, amax: np.ndarray) -> np.ndarray:
    """levels / amax, and 0 where amax is 0 (ncnn's `scale == 0` means: leave it as it is)."""
    amax = np.asarray(amax, np.float64)
    return np.divide(levels, amax, out=np.zeros_like(amax), where=amax > 0)


def parse_ncnn_table(text: str) -> dict[str, np.ndarray]:
    """Scales per key (`layer_param_0` or `layer`) of an ncnn int8 table."""
    table = {}
    for number, line in enumerate(text.splitlines(), start=1):
        key, *values = line.split()
        try:
            table[key] = np.array([float(v) for v in values], np.float32)
        except ValueError:
            raise ModelError(
                f"line {number} of the ncnn table is not `name s...`: {line!r}"
            ) from None
    return table


def ncnn_layer_names(param: str, ranges: Ranges) -> dict[str, str]:
    """ONNX node name -> ncnn layer name, from the `.param` file ncnn's converter (pnnx or
    onnx2ncnn) wrote for the same ONNX model: its quantizable layers, in order, matched to the
    quantized nodes, each checked by its number of weight scales."""
    found = []
    for number, line in enumerate(param.splitlines()[2:], start=3):
        kind, *rest = line.split() or [""]
        if kind in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
            if not rest:
                raise ModelError(f"line {number} of the ncnn .param names no layer: {line!r}")
            found.append((kind, rest[0], _num_output(line, kind, number)))
    if len(found) != len(ranges.layers):
        raise ModelError(
            f"the ncnn .param holds {len(found)} Convolution/InnerProduct layers but the model "
            f"{len(ranges.layers)} quantized Conv/Gemm/MatMul; convert the float model that "
            "was quantized, with every such layer quantized"
        )
    names = {}
    for (kind, name, outputs), layer in zip(found, ranges.layers, strict=True):
        if outputs != len(layer.weight_amax):
            raise ModelError(
                f"ncnn layer {name} ({kind}, {outputs} outputs) does not match node "
                f"{layer.node} ({len(layer.weight_amax)} channels); convert the same model"
            )
        names[layer.node] = name
    return names


def _num_output(line: str, kind: str, number: int) -> int:
    """ncnn's param id 0 (num_output), or 7 (group) for a depthwise convolution, of the layer
    on line `number`."""
    params = dict(p.split("=", 1) for p in line.split() if "=" in p)
    value = params.get("7" if kind == "ConvolutionDepthWise" else "0", "0")
    try:
        return int(value)
    except ValueError:
        raise ModelError(
            f"line {number} of the ncnn .param gives {kind} a channel count of {value!r}, not "
            "an integer; give the .param ncnn's converter wrote"
        ) from None


def export_table(
    model: onnx.ModelProto, table_format: TableFormat | str, ncnn_param: str | None = None
) -> str:
    """The calibration table of a model qdq quantized, in `table_format`."""
    ranges = read_ranges(model)
    if choice(TableFormat, table_format, "table format") is TableFormat.TENSORRT:
        return tensorrt_cache(ranges)
    names = ncnn_layer_names(ncnn_param, ranges) if ncnn_param is not None else None
    return ncnn_table(ranges, names)


def write_table(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    table_format: TableFormat | str,
    ncnn_param: str | os.PathLike[str] | None = None,
    flag: str = "-o",
) -> Path:
    """Write the calibration table of the quantized model at `model_path` to `output`
    (atomically, after checking the path); `ncnn_param` names ncnn's layers."""
    target = check_output(output, [model_path, ncnn_param], flag)
    if ncnn_param is not None:  # a FIFO would block, a folder fail in bare words
        check_regular(Path(ncnn_param), "the ncnn .param file its converter wrote")
    try:
        param = Path(ncnn_param).read_text() if ncnn_param is not None else None
    except UnicodeDecodeError:
        raise DataError(f"{ncnn_param} is not a text ncnn .param file") from None
    text = export_table(load_model(model_path), table_format, param)
    with staged(target) as temporary:
        temporary.write_text(text)
    return target
