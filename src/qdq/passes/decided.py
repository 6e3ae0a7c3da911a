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
from onnx import TensorProto, helper

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
                if name in index.producer:  # an input read as it is: nothing computed to judge
                    found.append(name)
            else:
                pending.append(name)
    return found


def exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` it computes, typed as its
    value_info types them (float32 where it does not). Such an output may have no shape, which
    ONNX's checker refuses and ONNX Runtime takes: only the file written (`hidden`) is checked.
    `model` itself where there are none."""
    if not names:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    made = {name for node in graph.node for name in node.output}
    known = {v.name: v for v in graph.value_info}
    for name in names:
        if name in made:
            typed = known.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            graph.output.append(typed)
    return copy


def hidden(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` without the outputs `names` (`model` itself if it has none of them)."""
    if not any(o.name in names for o in model.graph.output):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [o for o in copy.graph.output if o.name not in names]
    del copy.graph.output[:]
    copy.graph.output.extend(kept)
    return copy
