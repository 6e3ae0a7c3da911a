"""The float tensors a model's decisions are read from, judged where it outputs none.

A classifier exported with its ArgMax (a label), a scikit-learn pipeline (a label and a ZipMap
of probabilities), a segmenter that outputs its class map, a mask thresholded in the graph: no
float32 output, so nothing for the method choice, the rounding and correction checks, the
candidate plans or the report to compare with FP32's. They had run blind: percentile, no
checks, every candidate "inf dB", so `--prefer balanced` took the fastest whatever it cost.
The scores those outputs are decided from are float tensors inside the graph (ArgMax's input,
ZipMap's, a Greater's), so planning exposes them as extra outputs, judges them as it judges
any float output, and the written file has only the model's own outputs again (`hidden`).
"""

from __future__ import annotations

import onnx

from qdq.onnx.graph import GraphIndex


def decided_from(model: onnx.ModelProto) -> list[str]:
    """The float32 tensors, not constants, that `model`'s outputs are computed from through
    ops on other types only (ArgMax -> Cast -> a label): none where it has a float32 output."""
    index = GraphIndex(model)
    outputs = [o.name for o in model.graph.output]
    if any(index.is_float(name) for name in outputs):
        return []
    found: list[str] = []
    pending, seen = list(outputs), set(outputs)
    while pending:
        node = index.producer.get(pending.pop())
        if node is None:
            continue
        for name in node.input:
            if not name or name in seen or index.is_constant(name):
                continue
            seen.add(name)
            if index.is_float(name):
                found.append(name)
            else:
                pending.append(name)
    return found


def exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` it computes, with the type and
    shape its value_info gives them (none known: ONNX Runtime's own inference types them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    made = {name for node in graph.node for name in node.output}
    known = {v.name: v for v in graph.value_info}
    for name in names:
        if name in made:
            graph.output.append(known.get(name, onnx.ValueInfoProto(name=name)))
    return copy


def hidden(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` (in place) without the outputs `names`."""
    kept = [o for o in model.graph.output if o.name not in names]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return model
