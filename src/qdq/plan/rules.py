"""What quantizing each op means, as data: one rule per ONNX op type.

`kind` (a `Kind`) says how the op's output gets its qparams:
- "compute": int8 kernels exist (QLinearConv, QLinearMatMul, QGemm): its float inputs and its
  output are quantized, the output with its own calibrated range (a MatMul or Gemm output that
  nothing reads as int8 stays float: MatMulIntegerToFloat, QGemm with a float output);
- "elementwise": Add, Mul and the average pools have int8 kernels too (QLinearAdd, ...), but
  they are cheap, so they are quantized only where int8 already flows into every input and
  something reads their output as int8; elsewhere they would only add a rounding step;
- "shared": Concat: inputs and output share the output's qparams, so int8 is copied, not rescaled;
- "inherit": MaxPool, Resize, Gather and the shape ops only move or pick values: the output
  reuses the input's qparams exactly, so int8 flows through them (a Gather from a constant
  table, an embedding, stores the table int8 and its rows reuse the table's qparams);
- "activation": Relu / Clip: absorbed into the producer's range when the grid's lowest code is
  real 0 (asymmetric), else inherit;
- "gate": Sigmoid / HardSigmoid: the output lies in [0, 1] whatever the input, so it gets that
  grid without calibration; quantized only where int8 flows in and something reads it as int8
  (the Mul of a HardSwish `x * HardSigmoid(x)` or of a squeeze-excitation gate, which then runs
  as QLinearMul instead of in float between a DequantizeLinear and a QuantizeLinear).

- "inputs" and "residual" (TensorRT's rule set, `TENSORRT_RULES`): Q/DQ on the op's activation
  inputs only; its output stays float in the file and TensorRT picks its precision (it fuses
  the Q of the next layer's input). "residual" is an Add of two activations (a skip
  connection), which TensorRT fuses into the Conv before it; with a constant operand it stays
  float.

Ops with no rule stay in float. Deliberately float: Softmax and LayerNormalization (they need float
precision and ONNX Runtime's CPU has no QDQ kernel for them), and HardSwish (a cheap elementwise
op; a Q/DQ pair around it would cost more than it saves).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from qdq.config import Placement, QuantConfig
from qdq.onnx.graph import attributes


class Kind(enum.Enum):
    """How an op's output gets its qparams (the list above)."""

    COMPUTE = "compute"
    ELEMENTWISE = "elementwise"
    SHARED = "shared"
    INHERIT = "inherit"
    ACTIVATION = "activation"
    GATE = "gate"
    INPUTS = "inputs"
    RESIDUAL = "residual"


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized: which inputs, which one is a weight and along which axis."""

    kind: Kind
    inputs: tuple[int, ...] = (0,)  # inputs quantized as activations (or constants, per tensor)
    weight: int | None = None  # the constant weight input, quantized per channel
    bias: int | None = None  # the bias input, int32 with scale s_x * s_w


def _conv_axis(node: onnx.NodeProto) -> int:
    return 1 if node.op_type == "ConvTranspose" else 0


def _gemm_axis(node: onnx.NodeProto) -> int:
    attrs = attributes(node)
    return 0 if attrs.get("transB", 0) else 1


def weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of a node's weight: 0 for Conv, 1 for ConvTranspose, N for Gemm
    and MatMul."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return _conv_axis(node)
    if node.op_type == "Gemm":
        return _gemm_axis(node)
    return rank - 1  # MatMul: B is (..., K, N)


RULES: dict[str, OpRule] = {
    "Conv": OpRule(Kind.COMPUTE, weight=1, bias=2),
    "ConvTranspose": OpRule(Kind.COMPUTE, weight=1, bias=2),
    "Gemm": OpRule(Kind.COMPUTE, weight=1, bias=2),
    "MatMul": OpRule(Kind.COMPUTE, inputs=(0, 1)),
    "Add": OpRule(Kind.ELEMENTWISE, inputs=(0, 1)),
    "Mul": OpRule(Kind.ELEMENTWISE, inputs=(0, 1)),
    "AveragePool": OpRule(Kind.ELEMENTWISE),
    "GlobalAveragePool": OpRule(Kind.ELEMENTWISE),
    "Concat": OpRule(Kind.SHARED, inputs=()),  # every input, however many
    "MaxPool": OpRule(Kind.INHERIT),
    "Resize": OpRule(Kind.INHERIT),
    "Reshape": OpRule(Kind.INHERIT),
    "Transpose": OpRule(Kind.INHERIT),
    "Flatten": OpRule(Kind.INHERIT),
    "Squeeze": OpRule(Kind.INHERIT),
    "Unsqueeze": OpRule(Kind.INHERIT),
    "Slice": OpRule(Kind.INHERIT),
    "Gather": OpRule(Kind.INHERIT),  # from a constant table: int8 table, rows keep its qparams
    "Split": OpRule(Kind.INHERIT),
    "Relu": OpRule(Kind.ACTIVATION),
    "Clip": OpRule(Kind.ACTIVATION),
    "Sigmoid": OpRule(Kind.GATE),
    "HardSigmoid": OpRule(Kind.GATE),
}

# TensorRT's explicit quantization ("Q/DQ layer placement recommendations" in its developer
# guide): symmetric int8 on the inputs of the layers with int8 kernels, per-channel weights, the
# bias left float (TensorRT folds it into its own int32 bias; it has no int32 DequantizeLinear).
TENSORRT_RULES: dict[str, OpRule] = {
    "Conv": OpRule(Kind.INPUTS, weight=1),
    "ConvTranspose": OpRule(Kind.INPUTS, weight=1),
    "Gemm": OpRule(Kind.INPUTS, weight=1),
    "MatMul": OpRule(Kind.INPUTS, inputs=(0, 1)),
    "Add": OpRule(Kind.RESIDUAL, inputs=(0, 1)),
}
RULE_SETS: dict[Placement, dict[str, OpRule]] = {
    Placement.ORT: RULES,
    Placement.TENSORRT: TENSORRT_RULES,
}
# Kinds whose output gets no Q/DQ of its own: the consumer that wants int8 quantizes it.
INPUTS_ONLY = (Kind.INPUTS, Kind.RESIDUAL)


def rules_for(config: QuantConfig) -> Mapping[str, OpRule]:
    """The op rules of `config`'s placement."""
    return RULE_SETS[config.placement]


FLOAT_BY_DESIGN = {
    "Softmax": "needs float precision; ONNX Runtime has no CPU QDQ kernel for it",
    "LayerNormalization": "needs float precision; ONNX Runtime has no CPU QDQ kernel for it",
    "HardSwish": "a cheap elementwise op: Q/DQ around it would cost more than it saves",
    "If": "stays an If; `qdq quantize` quantizes inside the branch where every calibration "
    "sample takes the same one (`qdq.passes.branches`)",
    "LSTM": "no Q/DQ form; `qdq quantize` may give it int8 weights, where ONNX Runtime's "
    "DynamicQuantizeLSTM pays (`qdq.plan.recurrent`)",
}

# Int8 kernels that ONNX Runtime also runs with a float output (MatMulIntegerToFloat, QGemm).
FLOAT_OUTPUT_KERNELS = ("MatMul", "Gemm")
# Kinds whose node goes float when nothing reads its output as int8 (its Q/DQ would only round).
FLOAT_WHEN_UNREAD = (Kind.ELEMENTWISE, Kind.SHARED, Kind.GATE)


def rule_inputs(node: onnx.NodeProto, rule: OpRule) -> list[int]:
    """Indices of the inputs a rule quantizes (all of them for Concat)."""
    indices = range(len(node.input)) if rule.kind is Kind.SHARED else rule.inputs
    return [i for i in indices if i < len(node.input) and node.input[i]]
