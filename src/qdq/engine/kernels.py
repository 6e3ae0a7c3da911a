"""One kernel per integer op, named after the op, with the spec's input names.

Each takes the run's `Context`, the node's inputs (None for an absent optional input) and its
attributes, and returns the outputs. `KERNELS` maps (domain, op type) to the kernel; the
kernels live by op family in `quantize_kernels`, `product_kernels`, `real_value_kernels` and
`code_kernels`.
"""

from __future__ import annotations

import numpy as np

from qdq.engine.code_kernels import clip, flatten, identity, max_pool, relu, reshape
from qdq.engine.context import Kernel
from qdq.engine.mlas import logistic, qlinear_add, qlinear_mul
from qdq.engine.product_kernels import (
    conv_integer,
    matmul_integer,
    matmul_integer_to_float,
    qgemm,
    qlinear_conv,
    qlinear_matmul,
)
from qdq.engine.quantize_kernels import (
    dequantize_linear_kernel,
    dynamic_quantize_linear_kernel,
    quantize_linear_kernel,
)
from qdq.engine.real_value_kernels import (
    elementwise_kernel,
    lookup_kernel,
    qlinear_average_pool,
    qlinear_concat,
    qlinear_global_average_pool,
)

MS = "com.microsoft"

KERNELS: dict[tuple[str, str], Kernel] = {
    ("", "QuantizeLinear"): quantize_linear_kernel,
    ("", "DequantizeLinear"): dequantize_linear_kernel,
    ("", "DynamicQuantizeLinear"): dynamic_quantize_linear_kernel,
    ("", "ConvInteger"): conv_integer,
    ("", "MatMulInteger"): matmul_integer,
    ("", "QLinearConv"): qlinear_conv,
    ("", "QLinearMatMul"): qlinear_matmul,
    ("", "Identity"): identity,
    (MS, "QGemm"): qgemm,
    (MS, "MatMulIntegerToFloat"): matmul_integer_to_float,
    (MS, "QLinearAdd"): elementwise_kernel(np.add, qlinear_add),
    (MS, "QLinearMul"): elementwise_kernel(np.multiply, qlinear_mul),
    (MS, "QLinearGlobalAveragePool"): qlinear_global_average_pool,
    (MS, "QLinearAveragePool"): qlinear_average_pool,
    (MS, "QLinearConcat"): qlinear_concat,
    (MS, "QLinearSigmoid"): lookup_kernel(
        lambda x, a: 1 / (1 + np.exp(-x)), lambda x, a: logistic(x)
    ),
    (MS, "QLinearLeakyRelu"): lookup_kernel(
        lambda x, a: np.where(x >= 0, x, x.dtype.type(a.get("alpha", 0.01)) * x)
    ),
}
# exact on codes: used on int inputs (a kernel returning None leaves the node to ONNX Runtime)
INTEGER_ONLY: dict[tuple[str, str], Kernel] = {
    ("", "Relu"): relu,
    ("", "Clip"): clip,
    ("", "MaxPool"): max_pool,
    ("", "Reshape"): reshape,
    ("", "Flatten"): flatten,
}
