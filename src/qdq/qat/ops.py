"""ONNX ops as torch functions, named after the ops and stated as the spec states them.

`OPS` maps each op type `QdqGraph` (qdq.qat.convert) can run to a function of the node's
inputs (torch tensors; integer tensors carry shapes, as ONNX's Shape, Gather and Concat of
shapes do) and its attributes. The 74 ops cover the QDQ graphs of the PP-OCRv4 models,
EfficientNet-Lite0, the digits models, the unseen models `qdq finetune` was measured on and
PyTorch's exports of a GRU, an Einsum, GroupNorm and InstanceNorm, a causal attention mask
(Trilu), Swin's shifted windows (Mod, ScatterND) and opset 20's Gelu; an op or an attribute
combination they do not cover raises `ModelError` naming it.

This module is the table; the functions live by family: `ops_conv` (convolutions, Gemm,
pools, Resize), `ops_math` (elementwise, Softmax, reductions, normalizations), `ops_shape`
(shapes and data movement), `ops_recurrent` (LSTM, GRU), over `ops_args`'s shared readers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from qdq.qat.ops_args import Attrs, Value
from qdq.qat.ops_conv import conv, conv_transpose, gemm, pool, resize
from qdq.qat.ops_math import (
    batch_norm,
    clip,
    divide,
    einsum,
    elementwise,
    instance_norm,
    layer_norm,
    prelu,
    reduce,
    softmax,
    trilu,
    variadic,
)
from qdq.qat.ops_recurrent import dynamic_quantize_lstm, gru, lstm
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
    scatter_nd,
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
    "MatMul": elementwise(torch.matmul),
    "Add": elementwise(torch.add),
    "Sub": elementwise(torch.sub),
    "Mul": elementwise(torch.mul),
    "Div": divide,
    "Pow": elementwise(torch.pow),
    "Mod": lambda i, a: (torch.fmod if a.get("fmod", 0) else torch.remainder)(i[0], i[1]),
    "Sqrt": elementwise(torch.sqrt),
    "Erf": elementwise(torch.erf),
    "Exp": elementwise(torch.exp),
    "Reciprocal": elementwise(torch.reciprocal),
    "Not": elementwise(torch.logical_not),
    "IsNaN": elementwise(torch.isnan),
    "And": elementwise(torch.logical_and),
    "Or": elementwise(torch.logical_or),
    "Greater": elementwise(torch.gt),
    "GreaterOrEqual": elementwise(torch.ge),
    "Less": elementwise(torch.lt),
    "LessOrEqual": elementwise(torch.le),
    "PRelu": prelu,
    "Tanh": elementwise(torch.tanh),
    "Neg": elementwise(torch.neg),
    "Abs": elementwise(torch.abs),
    "Relu": elementwise(torch.relu),
    "Sigmoid": elementwise(torch.sigmoid),
    "HardSwish": elementwise(F.hardswish),
    "Gelu": lambda i, a: F.gelu(i[0], approximate=a.get("approximate", b"none").decode()),
    "Identity": elementwise(lambda x: x),
    "Equal": elementwise(torch.eq),
    "Where": elementwise(torch.where),
    "Sum": variadic(torch.add),
    "Max": variadic(torch.maximum),
    "Min": variadic(torch.minimum),
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
    "DynamicQuantizeLSTM": dynamic_quantize_lstm,
    "GRU": gru,
    "Einsum": einsum,
    "Trilu": trilu,
    "Flatten": flatten,
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(reversed(range(i[0].ndim))))),
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Slice": slice_,
    "Split": split,
    "Softmax": softmax,
    "Gather": gather,
    "GatherElements": gather_elements,
    "ScatterND": scatter_nd,
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
    "InstanceNormalization": instance_norm,
}
