"""LSTM layers with int8 weights: ONNX Runtime's DynamicQuantizeLSTM in place of the LSTMs a
plan marks (`qdq.plan.recurrent`).

On ddddocr's captcha recognizer the bidirectional LSTM is 31% of FP32's time and 16.8 of its
54 MB; with its weights int8 the chosen plan ran at 0.54x FP32's time instead of 0.75x, at 38
dB of output SQNR instead of 51 (1.2 points fewer of 256 captchas read as FP32 reads them:
docs/ptq.md, stop 76). The weights are symmetric int8 with one scale per gate row; the op
quantizes its input and hidden state to uint8 on each call's own range.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qdq.onnx.graph import all_names, free_name, subgraph_reads

DOMAIN = "com.microsoft"
_INPUTS = 8  # X, W, R, B, sequence_lens, initial_h, initial_c, P


def quantize_lstm_weights(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Replace, in `model`, the LSTM nodes `names` by DynamicQuantizeLSTM: their W and R int8
    (symmetric, one scale per direction and gate row, transposed as the op reads them), no
    longer stored in float where nothing else reads them."""
    names = set(names)
    if not names:
        return
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    taken = all_names(graph)
    made: dict[str, list[str]] = {}  # per float W or R: its codes, scales and zero points
    for position, node in enumerate(graph.node):
        if node.name not in names:
            continue
        inputs = [*node.input, *[""] * (_INPUTS - len(node.input))]
        extra: list[str] = []
        for i, role in ((1, "W"), (2, "R")):
            if inputs[i] not in made:  # a weight several LSTMs read: stored once
                codes, scale = _symmetric_rows(numpy_helper.to_array(initializers[inputs[i]]))
                named = [
                    free_name(f"{node.name}_{role}_{k}", taken) for k in ("int8", "scale", "zp")
                ]
                zero_point = np.zeros(scale.shape, np.int8)
                arrays = (codes.transpose(0, 2, 1).copy(), scale, zero_point)
                graph.initializer.extend(map(numpy_helper.from_array, arrays, named))
                made[inputs[i]] = named
            inputs[i], *more = made[inputs[i]]
            extra += more
        new = helper.make_node(
            "DynamicQuantizeLSTM", [*inputs[:_INPUTS], *extra], list(node.output), node.name,
            domain=DOMAIN,
        )  # fmt: skip
        # the attributes as they are: an empty list (`activation_alpha=[]`, valid ONNX) has no
        # type to infer it from
        new.attribute.extend(a for a in node.attribute if a.name != "layout")
        graph.node[position].CopyFrom(new)
    read = {name for node in graph.node for name in (*node.input, *subgraph_reads(node))}
    read |= {v.name for v in (*graph.input, *graph.output)}
    kept = [t for t in graph.initializer if t.name not in made or t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _symmetric_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (directions, rows, columns) weight's int8 codes in [-127, 127] and its scales, one per
    (direction, row): the largest magnitude over 127 (1 for a row of zeros)."""
    scale = (np.abs(weight).max(axis=2) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1))  # zeros, or so small the scale underflows
    codes = np.clip(np.rint(weight / scale[..., None]), -127, 127).astype(np.int8)
    return codes, scale
