"""What `qdq compare` checks before it measures: that the two models pair up, which labels the
data holds and that they are classes of the first output, and FP32's outputs on the leading
samples (read once, for the class count and the outputs' parts)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from qdq.arrayfile import open_npz
from qdq.data import Samples, model_inputs
from qdq.errors import DataError, ModelError
from qdq.metrics import looks_like_scores
from qdq.onnx.sessions import fails_on_data, open_session, run_named

# The names of the float outputs, and FP32's values of them on each leading feed.
LeadingOutputs = tuple[list[str], list[list[np.ndarray]]]


def check_same_inputs(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """The models take the same inputs, and the quantized one has every float output."""
    want = [s.describe() for s in model_inputs(reference)]
    got = [s.describe() for s in model_inputs(quantized)]
    if want != got:
        raise ModelError(
            f"the models take different inputs (float: {want}; quantized: {got}); compare a "
            "model with its own quantized version"
        )
    theirs = {o.name: o for o in quantized.graph.output}
    missing = sorted({o.name for o in reference.graph.output} - theirs.keys())
    if missing:
        raise ModelError(
            f"the quantized model lacks the float model's outputs {missing}; compare a model "
            "with its own quantized version"
        )
    for output in reference.graph.output:  # fixed sizes that differ: another model's output
        other = theirs[output.name]
        if {_kind(output), _kind(other)} == {"f", "i"}:  # codes against values
            raise ModelError(
                f"output {output.name!r} is {_kind_name(output)} in the float model and "
                f"{_kind_name(other)} in the other; compare a model with its own quantized "
                "version, whose outputs keep their types"
            )
        want, got = _dims(output), _dims(other)
        if len(want) == len(got) and any(a != b for a, b in zip(want, got, strict=True) if a and b):
            raise ModelError(
                f"output {output.name!r} is {want} in the float model and {got} in the other; "
                "compare a model with its own quantized version"
            )


def _kind(value: onnx.ValueInfoProto) -> str:
    """'f' for a float tensor (of any width), 'i' for an integer one, '' for anything else."""
    elem = value.type.tensor_type.elem_type
    if not elem:
        return ""
    kind = onnx.helper.tensor_dtype_to_np_dtype(elem).kind
    return "f" if kind == "f" else "i" if kind in "iu" else ""


def _kind_name(value: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """The declared sizes of an output (None: free or named), or [] when it has no shape."""
    if not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value or None for d in value.type.tensor_type.shape.dim]


def leading_outputs(reference: onnx.ModelProto, samples: Samples, count: int) -> LeadingOutputs:
    """FP32's float outputs on the first `count` samples, feed by feed (float16 and float64
    ones as float32: their parts and readings are found as `qdq quantize` finds them)."""
    session = open_session(reference)
    floats = ("tensor(float)", "tensor(float16)", "tensor(double)")
    names = [o.name for o in session.get_outputs() if o.type in floats]
    with fails_on_data("the float model on the data"):
        outputs = [
            [o.astype(np.float32, copy=False) for o in run_named(session, names, feed)]
            for feed in samples.batches(count, last=count)
        ]
    return names, outputs


def read_labels(
    data: str | os.PathLike[str], key: str | None, samples: Samples
) -> np.ndarray | None:
    """The labels of the picked samples, when `data` is an .npz holding a `key` array of one
    integer class per sample."""
    if not key or Path(data).suffix != ".npz" or key in {s.name for s in samples.inputs}:
        return None  # an input named `label` is the model's, not labels
    members = open_npz(data)
    if key not in members:
        return None
    labels = members[key]
    counts = {m.count for name, m in members.items() if name != key}
    if labels.dtype.kind not in "iu" or len(labels.shape) != 1 or counts != {labels.count}:
        raise DataError(
            f"{data}: {key!r} holds {labels.dtype}{list(labels.shape)} for "
            f"{sorted(counts)} samples; give one integer class index per sample"
        )
    return labels.read(samples.order)


def check_classes(
    truth: np.ndarray | None, reference: onnx.ModelProto, key: str | None, leading: LeadingOutputs
) -> None:
    """Labels must be classes of the first output (its axis 1; where the graph leaves it
    symbolic, as FP32 gives it on the leading samples): labels beyond it had scored 0%
    accuracy without a word."""
    output = reference.graph.output[0]
    names, outputs = leading
    if truth is None or len(truth) == 0 or output.name not in names or not outputs:
        return
    # FP32's own first output (float16, float64 and undeclared shapes alike), as compare
    # scores it: the declared float32 rank-2 shape alone had let other labels score 0%
    first = outputs[0][names.index(output.name)]
    classes = first.shape[1] if looks_like_scores(first) else 0  # not a TopK's int64 indices
    if not 2 <= classes <= 100_000:  # accuracy is for class scores only
        return
    low, high = int(truth.min()), int(truth.max())
    if low < 0 or high >= classes:
        raise DataError(
            f"the {key!r} labels run from {low} to {high}, but the first output has {classes} "
            f"classes (0..{classes - 1}); give labels of its classes, or drop the array"
        )
