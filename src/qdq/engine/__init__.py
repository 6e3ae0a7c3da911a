"""Integer-only execution of quantized ONNX models: what an NPU would compute, bit for bit.

`run(model, feeds, requant="fixed")` runs a QOperator or QDQ model with int32 accumulation and
either gemmlowp's fixed-point requantization or ONNX's float one; `Engine` keeps a prepared
model for many runs and reports float fallbacks and accumulator overflows.
"""

from qdq.engine.executor import Engine, Overflow, run

__all__ = ["Engine", "Overflow", "run"]
