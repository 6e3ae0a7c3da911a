"""The torch copy's learned values written back into the QDQ file's own initializers: weight
codes, scales and int32 biases under the same names, shapes and dtypes, so the file keeps its
structure and ONNX Runtime fuses it as it fused the PTQ output."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qdq.onnx.graph import GraphIndex
from qdq.plan.constants import BIAS_CODE_LIMIT
from qdq.plan.saturation import pair_clipped
from qdq.qat.convert import QdqGraph
from qdq.qparams import MIN_SCALE

INT32 = np.iinfo(np.int32)


def write_back(model: onnx.ModelProto, graph: QdqGraph, pairs: bool = False) -> onnx.ModelProto:
    """A copy of `model` with `graph`'s learned weight codes, scales and biases in place of its
    initializers (same names, shapes and dtypes), so its structure is unchanged. `pairs`: the
    uniform weights' pairs of neighbours kept from saturating x86 u8s8 kernels: none adds more
    codes than 128 or than it did in `model`, PTQ's (`qdq.plan.saturation`)."""
    values: dict[str, np.ndarray] = {}
    users = _weight_users(model) if pairs else {}
    with torch.no_grad():
        scales = {
            key: g.bounded_scale().clamp_min(MIN_SCALE).double().numpy()
            for key, g in graph.grids.items()
        }
        for weight, key in graph.weight_of.items():  # low-bit codes first: biases use s_w
            if (lowbit := graph.lowbit_weight(weight)) is not None:
                codes, scale = lowbit.codes_and_scale(graph.weight_param(weight))
                values[weight], scales[key] = codes.double().numpy(), scale.double().numpy()
        for scale, key in graph.group.items():
            values[scale] = scales[key]
        for bias, where in graph.bias_of.items():
            b = graph.weight_param(bias).double().numpy()
            scale = graph.initial[where.scale].astype(np.float64)
            if where.x_scale is not None and where.w_scale is not None:
                s_x = scales[graph.group[where.x_scale]]
                # A bias too large for int32 codes raises its channel's weight scale, as PTQ does.
                needed = np.abs(b) / (s_x * BIAS_CODE_LIMIT)
                w_key = graph.group[where.w_scale]
                per_channel = scales[w_key].ndim > 0  # a per-tensor scale stays one value
                s_w = np.maximum(scales[w_key], needed if per_channel else needed.max())
                scales[w_key] = values[where.w_scale] = s_w
                scale = values[where.scale] = s_x * s_w
            values[bias] = np.clip(np.rint(b / scale), INT32.min, INT32.max)
        for weight, key in graph.weight_of.items():
            if weight in values:  # on a low-bit grid, written above
                continue
            grid, w = graph.grids[key], graph.weight_param(weight).double().numpy()
            axis = grid.axis if scales[key].ndim else None
            s = scales[key] if axis is None else np.expand_dims(scales[key], _others(w, axis))
            z = float(grid.zero_point.reshape(-1)[0])  # per tensor (a weight: 0, symmetric)
            values[weight] = np.clip(np.rint(w / s) + z, grid.qmin, grid.qmax)
            if weight in users and z == 0:
                values[weight] = pair_clipped(users[weight], values[weight], graph.initial[weight])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.name in values:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            new = values[tensor.name].astype(dtype)  # a scale repeated per channel: repeated
            new = np.broadcast_to(new, tuple(tensor.dims)) if new.size == 1 else new
            new = new.reshape(tuple(tensor.dims))
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, tensor.name))
    return out


def _weight_users(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Each integer weight's compute node: the sole reader of its DequantizeLinear."""
    index = GraphIndex(model)
    users = {}
    for node in index.nodes:
        if node.op_type == "DequantizeLinear" and index.is_constant(node.input[0]):
            user = index.sole_consumer(node.output[0])
            if user is not None:
                users[node.input[0]] = user
    return users


def _others(w: np.ndarray, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(w.ndim) if d != axis % w.ndim)
