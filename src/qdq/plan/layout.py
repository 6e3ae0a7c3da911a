"""Int8 pools that ONNX Runtime's CPU layout passes would leave on a slow kernel.

ONNX Runtime runs int8 convolutions in NHWC and moves neighbouring ops into NHWC where that saves
transposes; an 8-bit MaxPool left in NCHW runs a generic kernel, 15x slower than the float one on
a 64x56x56 input (docs/ptq.md). Which pools those are depends on ONNX Runtime's own cost model,
so qdq asks it: optimize the candidate at the level sessions use by default and find the int8
pools that are still plain ONNX MaxPool nodes (an NHWC one becomes com.microsoft.NhwcMaxPool).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnxruntime as ort

from qdq.errors import ModelError
from qdq.onnx.model import ort_rewrite
from qdq.plan.build import Plan

SLOW_POOL = (
    "ONNX Runtime would run it on 8-bit codes in NCHW layout, whose generic kernel is up to 15x "
    "slower than the float one"
)


def slow_pools(plan: Plan, realize: Callable[[Plan], onnx.ModelProto]) -> list[str]:
    """The int8 MaxPool nodes of `plan` that ONNX Runtime would run on its NCHW 8-bit kernel,
    asked of the plan's quantized model, which `realize` makes (the Q/DQ rewrite)."""
    pools = [name for name, d in plan.decisions.items() if d.quantized and d.op_type == "MaxPool"]
    if not pools:
        return []
    try:
        optimized = ort_rewrite(realize(plan), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    except ModelError:  # the final check reports a model ONNX Runtime refuses, as an internal error
        return []
    plain = {n.name for n in optimized.graph.node if n.op_type == "MaxPool" and n.domain == ""}
    return [name for name in pools if name in plain]
