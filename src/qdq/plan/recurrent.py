"""Which LSTMs may run with int8 weights (ONNX Runtime's DynamicQuantizeLSTM, written by
`qdq.passes.recurrent`), and the decisions that say so.

ONNX has no QDQ form of an LSTM that ONNX Runtime fuses, so a static plan leaves it float; its
contrib op `com.microsoft.DynamicQuantizeLSTM` takes int8 weights and quantizes the input and
the hidden state as it runs, on each call's own range, so calibration has nothing to fix for
it. Whether that pays is measured like any other candidate plan (`qdq.plan.frontier`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from qdq.config import Placement, QuantConfig, WeightGrid
from qdq.onnx.graph import GraphIndex, attributes
from qdq.plan.calibrate import unfit_reason
from qdq.plan.decisions import Decision
from qdq.plan.saturation import avoids_saturation

RUNTIME_INT8 = (
    "int8 weights; its input and hidden state quantized as it runs (ONNX Runtime's "
    "DynamicQuantizeLSTM)"
)


def runtime_int8_lstms(index: GraphIndex, config: QuantConfig) -> list[str]:
    """The LSTM nodes DynamicQuantizeLSTM can run, but those `config` excludes by name or op
    type: standard domain, float32 constant W and R of rank 3, sequence-first layout (the
    contrib op has no `layout`). None where `config`'s weights must avoid saturating (the op's
    u8s8 products pair up as a convolution's do, on inputs whose ranges qdq never sees), go on
    a grid other than uniform int8, or are placed for TensorRT (the op is ONNX Runtime's)."""
    uniform = config.weights.bits == 8 and config.weight_grid is WeightGrid.UNIFORM
    if avoids_saturation(config) or not uniform or config.placement is not Placement.ORT:
        return []
    return [
        node.name
        for node in index.nodes
        if node.op_type == "LSTM"
        and not {node.name, "LSTM"} & set(config.exclude)
        and node.domain in ("", "ai.onnx")
        and not attributes(node).get("layout", 0)
        and all(_float_weight(index, node.input[i]) for i in (1, 2))
    ]


def _float_weight(index: GraphIndex, name: str) -> bool:
    """A constant float32 weight of rank 3 with finite values of a usable size."""
    if not (index.is_constant(name) and index.is_float(name)):
        return False
    return len(index.initializers[name].dims) == 3 and not unfit_reason(index.constant(name))


def with_runtime_int8(
    decisions: Mapping[str, Decision], names: Iterable[str]
) -> dict[str, Decision]:
    """A copy of `decisions` in which the LSTM nodes `names` run with int8 weights."""
    copy = dict(decisions)
    for name in names:
        copy[name] = Decision(name, copy[name].op_type, False, RUNTIME_INT8, dynamic=True)
    return copy
