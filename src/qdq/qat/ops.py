"""ONNX ops as torch functions, named after the ops and stated as the spec states them.

`OPS` maps each op type `QdqGraph` (qdq.qat.convert) can run to a function of the node's
inputs (torch tensors; integer tensors carry shapes, as ONNX's Shape, Gather and Concat of
shapes do) and its attributes. The 67 ops cover the QDQ graphs of the PP-OCRv4 models,
EfficientNet-Lite0, the digits models and the unseen models `qdq finetune` was measured on;
an op or an attribute combination they do not cover raises `ModelError` naming it.

This module is the table; the functions live by family: `ops_conv` (convolutions, Gemm,
pools, Resize), `ops_math` (elementwise, Softmax, reductions, normalizations), `ops_shape`
(shapes and data movement), `ops_recurrent` (LSTM), over `ops_args`'s shared readers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from qdq.qat.ops_args import Attrs, Value
from qdq.qat.ops_conv import conv, conv_transpose, gemm, pool, resize
from qdq.qat.ops_math import (
    _elementwise,
    _variadic,
    batch_norm,
    clip,
    layer_norm,
    prelu,
    reduce,
    softmax,
)
from qdq.qat.ops_recurrent import lstm
from qdq.qat.ops_shape import (
    cast,
    constant_of_shape,
    depth_to_space,
    expand,
    flatten,
    gather,
    gather_elements,
    pad,
    range_,
    reshape,
    shape,
    slice_,
    space_to_depth,
    split,
    squeeze,
    unsqueeze,
)

OPS: dict[str, Callable[[Sequence[Value], Attrs], object]] = {
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": _elementwise(torch.matmul),
    "Add": _elementwise(torch.add),
    "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul),
    "Div": _elementwise(torch.div),
    "Pow": _elementwise(torch.pow),
    "Sqrt": _elementwise(torch.sqrt),
    "Erf": _elementwise(torch.erf),
    "Exp": _elementwise(torch.exp),
    "Reciprocal": _elementwise(torch.reciprocal),
    "Not": _elementwise(torch.logical_not),
    "IsNaN": _elementwise(torch.isnan),
    "And": _elementwise(torch.logical_and),
    "Or": _elementwise(torch.logical_or),
    "Greater": _elementwise(torch.gt),
    "GreaterOrEqual": _elementwise(torch.ge),
    "Less": _elementwise(torch.lt),
    "LessOrEqual": _elementwise(torch.le),
    "PRelu": prelu,
    "Tanh": _elementwise(torch.tanh),
    "Neg": _elementwise(torch.neg),
    "Abs": _elementwise(torch.abs),
    "Relu": _elementwise(torch.relu),
    "Sigmoid": _elementwise(torch.sigmoid),
    "HardSwish": _elementwise(F.hardswish),
    "Identity": _elementwise(lambda x: x),
    "Equal": _elementwise(torch.eq),
    "Where": _elementwise(torch.where),
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "Clip": clip,
    "Concat": lambda i, a: torch.cat([x for x in i if x is not None], a["axis"]),
    "Reshape": reshape,
    "Expand": expand,
    "Range": range_,
    "DepthToSpace": depth_to_space,
    "SpaceToDepth": space_to_depth,
    "LSTM": lstm,
    "Flatten": flatten,
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(reversed(range(i[0].ndim))))),
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Slice": slice_,
    "Split": split,
    "Softmax": softmax,
    "Gather": gather,
    "GatherElements": gather_elements,
    "Pad": pad,
    "Shape": shape,
    "Cast": cast,
    "ConstantOfShape": constant_of_shape,
    "MaxPool": lambda i, a: pool(i, a, "max"),
    "AveragePool": lambda i, a: pool(i, a, "average"),
    "GlobalAveragePool": lambda i, a: i[0].mean(tuple(range(2, i[0].ndim)), keepdim=True),
    "GlobalMaxPool": lambda i, a: i[0].amax(tuple(range(2, i[0].ndim)), keepdim=True),
    "Resize": resize,
    "ReduceMean": lambda i, a: reduce(i, a, torch.mean),
    "ReduceSum": lambda i, a: reduce(i, a, torch.sum),
    "ReduceMax": lambda i, a: reduce(i, a, torch.amax),
    "LayerNormalization": layer_norm,
    "BatchNormalization": batch_norm,
}
