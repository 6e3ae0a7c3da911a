"""Integer-only execution of quantized ONNX models: what an NPU would compute, bit for bit.

`run(model, feeds, requant="fixed")` runs a QOperator or QDQ model with int32 (or simulated
int16) accumulation and one of three requantizations: gemmlowp's fixed point ("fixed"), ONNX
Runtime's float32 arithmetic, bit-exact ("float"), or the ONNX definition read literally
("spec"); `Engine` keeps a prepared model for many runs, picks compiled (Numba) or NumPy
kernels, and reports float fallbacks and accumulator overflows.
"""

from qdq.engine.executor import Engine, Overflow, run

__all__ = ["Engine", "Overflow", "run"]
