"""A float16 model's insides widened to float32, its inputs and outputs kept float16.

qdq's rules quantize float32 tensors, and ONNX Runtime's CPU provider runs most float16 ops by
casting to float32 around them: it inserts those casts when it loads the model, so each weight
reached its Conv or MatMul through a Cast, was no constant to quantize, and a float16 digits CNN
came out with 0 of its 19 nodes quantized and a larger file. Widened first, the model quantizes
as its float32 source does. A Cast after each float16 input keeps the data the user calibrates
with; the outputs are planned and checked as float32 (every check compares float32 outputs)
and narrowed back to float16 in the written file (`narrowed`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdq.errors import ModelError
from qdq.onnx.graph import free_name, names_in, subgraphs

HALF, FLOAT = TensorProto.FLOAT16, TensorProto.FLOAT


def widen(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` whose float16 constants, casts and tensors are float32, and how many
    constants were widened; `model` itself if it has none. One with subgraphs (an If's or a
    Loop's) is refused: their float16 insides would stay, and ONNX Runtime's rewrite of the
    rest then wrote a model it could not load again."""
    graph = model.graph
    values = (*graph.input, *graph.output, *graph.value_info)
    half = any(t.data_type == HALF for t in graph.initializer)
    half = half or any(v.type.tensor_type.elem_type == HALF for v in values)
    if not half:
        return model, 0
    if any(next(subgraphs(node), None) for node in graph.node):
        raise ModelError(
            "a float16 model with If, Loop or Scan subgraphs: qdq quantizes float16 models "
            "widened to float32 and does not widen subgraphs; export the model in float32"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    widened = 0
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == HALF:
            graph.initializer[i].CopyFrom(_wide(tensor))
            widened += 1
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in ("to", "dtype") and attribute.i == HALF:  # Cast, EyeLike, ...
                attribute.i = FLOAT
            elif attribute.HasField("t") and attribute.t.data_type == HALF:  # Constant, ...
                attribute.t.CopyFrom(_wide(attribute.t))
                widened += 1
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == HALF:
            value.type.tensor_type.elem_type = FLOAT
    _kept_half(graph)
    return copy, widened


def _wide(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _kept_half(graph: onnx.GraphProto) -> None:
    """A Cast to float32 after each float16 input, and each float16 output that a node computes
    float32 (an input returned as it is stays float16)."""
    nodes = list(graph.node)
    taken = names_in(graph)
    first: list[onnx.NodeProto] = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == HALF:
            wide = free_name(f"{value.name}_float32", taken)
            for node in nodes:
                node.input[:] = [wide if n == value.name else n for n in node.input]
            first.append(helper.make_node("Cast", [value.name], [wide], to=FLOAT, name=wide))
    inputs = {value.name for value in graph.input}
    for value in graph.output:
        if value.type.tensor_type.elem_type == HALF and value.name not in inputs:
            value.type.tensor_type.elem_type = FLOAT
    del graph.node[:]
    graph.node.extend(first + nodes)


def narrowed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` (in place) with its outputs `names` cast back to float16: the source's own (an
    input returned as it is was never widened)."""
    if not names:
        return model
    graph = model.graph
    taken = names_in(graph)
    inputs = {value.name for value in graph.input}
    for value in graph.output:
        if value.name not in names or value.name in inputs:
            continue
        wide = free_name(f"{value.name}_float32", taken)
        for node in graph.node:
            node.output[:] = [wide if n == value.name else n for n in node.output]
            node.input[:] = [wide if n == value.name else n for n in node.input]
        for tensor in graph.initializer:  # a constant returned as it is: no node makes it
            if tensor.name == value.name:
                tensor.name = wide
        graph.node.append(helper.make_node("Cast", [wide], [value.name], to=HALF, name=wide))
        value.type.tensor_type.elem_type = HALF
    return model
