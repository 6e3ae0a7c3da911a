"""ONNX Runtime's own values of a checkpoint's file, carried into the torch copy.

`qdq finetune` runs, at each step, the file the current values would write (ONNX Runtime,
its fused int8 kernels). `expose_codes` makes every activation QuantizeLinear's output one of
that file's outputs, and `QdqGraph.forward(feeds, known)` takes those codes, dequantized, as its
values there, with the fake-quantized path's gradient. The copy's float ops then cannot drift
from ONNX Runtime's: each quantized activation restarts from the file's codes. Where torch and
ONNX Runtime round a float op apart (PP-OCRv4's recognizer with its depthwise convolutions
float: the copy's output 24.9 dB from the file's, 138.8 dB when carried, docs/finetune.md), a
fine-tuned copy would otherwise train a model that ONNX Runtime does not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper


@dataclass(frozen=True)
class FileRun:
    """ONNX Runtime's session of a checkpoint's file, and the grid of each activation code it
    returns beside the outputs (`expose_codes`)."""

    session: ort.InferenceSession
    grids: dict[str, tuple[np.ndarray, np.ndarray, int]]


def expose_codes(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Makes every activation QuantizeLinear's output one of `model`'s outputs (in place), and
    returns each one's scale, zero point and axis. ONNX Runtime still fuses the same groups (a
    fused group's QuantizeLinear output is its int8 output), so these are the file's codes."""
    init = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    grids = {}
    for node in model.graph.node:
        q = node.input
        if node.op_type != "QuantizeLinear" or q[0] in init or node.output[0] in outputs:
            continue
        if q[1] not in init or len(q) < 3 or q[2] not in init:
            continue  # a grid computed in the graph: the torch copy keeps its own value
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale, zero = (numpy_helper.to_array(init[name]) for name in q[1:3])
        grids[node.output[0]] = (scale, zero, axis)
        model.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    return grids


def dequantized(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> torch.Tensor:
    """DequantizeLinear of ONNX Runtime's `codes`, in float32 as ONNX Runtime computes it."""
    if scale.ndim == 1:
        shape = [1] * codes.ndim
        shape[axis % codes.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    centred = codes.astype(np.int32) - zero.astype(np.int32)
    return torch.from_numpy(centred.astype(np.float32) * scale.astype(np.float32))
