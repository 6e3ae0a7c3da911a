"""ONNX Runtime's own fused ops back into the ONNX ops they were fused from.

A model saved after ONNX Runtime's extended optimizations (`optimized_model_filepath`) or its
transformer optimizer holds com.microsoft ops that no int8 rule knows: FusedConv and FusedGemm
(a convolution or Gemm with its activation), FusedMatMul (transposes and a scale around a
MatMul), SkipLayerNormalization (a residual sum and its LayerNorm). Kept, they stayed float:
the digits CNN saved so had 1 of its 7 nodes quantized (1.00x smaller), and an optimized
all-MiniLM-L6-v2 ran its LayerNorms in the fused kernel that `sum_before_layer_norm` keeps
ONNX Runtime from choosing (qdq.passes.fuse). Rewritten, the rules see a Conv and a Relu, a
MatMul, an Add and a LayerNormalization, and ONNX Runtime fuses the int8 graph again when it
loads the file. A node whose attributes or outputs this pass does not know exactly stays as it
was (float, and the report says why).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qdq.onnx.graph import attributes, free_name, names_in
from qdq.onnx.opset import default_opset

DOMAIN = "com.microsoft"
LAYER_NORM_OPSET = 17  # LayerNormalization joins the default domain
CLIP_INPUTS_OPSET = 11  # Clip's bounds are inputs, not attributes
# ONNX Runtime's fused activations: (op, its attributes from the fused node's parameters).
ACTIVATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Relu": ("Relu", ()),
    "Tanh": ("Tanh", ()),
    "Sigmoid": ("Sigmoid", ()),
    "LeakyRelu": ("LeakyRelu", ("alpha",)),
    "HardSigmoid": ("HardSigmoid", ("alpha", "beta")),
    "Clip": ("Clip", ("min", "max")),
}


class _Rewrite:
    """One model's rewrite: its opset, its constants, and the constants it adds."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.opset = default_opset(model)
        self.constants = {t.name: t for t in model.graph.initializer}
        self.taken = names_in(model.graph)

    def name(self, stem: str) -> str:
        """A name no tensor or node of the model has."""
        return free_name(f"{stem}_unfused", self.taken)

    def constant(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def activation(
        self, node: onnx.NodeProto, kind: str, params: list[float], x: str, y: str
    ) -> onnx.NodeProto | None:
        """The ONNX node computing `y = kind(x)` with `params`, or None for an unknown one."""
        if kind not in ACTIVATIONS or len(params) < len(ACTIVATIONS[kind][1]):
            return None
        op, names = ACTIVATIONS[kind]
        values = dict(zip(names, params, strict=False))
        label = self.name(f"{node.name}/{op}")
        if op == "Clip" and self.opset >= CLIP_INPUTS_OPSET:
            bounds = [self.constant(f"{y}_{b}", np.array(values[b], np.float32)) for b in names]
            return helper.make_node(op, [x, *bounds], [y], name=label)
        return helper.make_node(op, [x], [y], name=label, **values)


def wanted_opset(model: onnx.ModelProto) -> int | None:
    """The opset `model` needs for every SkipLayerNormalization to be unfused, where it is
    older: upgraded, a ViT-S through the transformer optimizer at opset 14 ran its int8 file
    in 70.2 ms, as its source's (71.4), instead of 81.6 with the fused kernel."""
    opset = default_opset(model)
    fused = any(
        n.domain == DOMAIN and n.op_type == "SkipLayerNormalization" for n in model.graph.node
    )
    return LAYER_NORM_OPSET if fused and opset < LAYER_NORM_OPSET else None


def unfuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Counter[str]]:
    """A copy of `model` with each of ONNX Runtime's fused ops that this pass knows written as
    the ONNX ops it stands for, and how many of each kind were (`model` itself if none)."""
    if not any(n.domain == DOMAIN and n.op_type in REWRITES for n in model.graph.node):
        return model, Counter()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rewrite, nodes, done = _Rewrite(copy), [], Counter()
    for node in copy.graph.node:
        make = REWRITES.get(node.op_type) if node.domain == DOMAIN else None
        replaced = make(rewrite, node) if make else None
        nodes.extend(replaced or [node])
        if replaced:
            done[node.op_type] += 1
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy, done


def _fused_conv(rewrite: _Rewrite, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """FusedConv(X, W, B?, Z?): activation(Conv(X, W, B) + Z)."""
    attrs = attributes(node)
    kind = _text(attrs.pop("activation", b""))
    params = list(attrs.pop("activation_params", []))
    z = node.input[3] if len(node.input) > 3 else ""
    inputs = list(node.input[:3])
    while inputs and not inputs[-1]:  # FusedConv(X, W, "", Z): a Conv without bias
        inputs.pop()
    return _with_activation(rewrite, node, "Conv", inputs, attrs, kind, params, z)


def _fused_gemm(rewrite: _Rewrite, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """FusedGemm(A, B, C?): activation(Gemm(A, B, C)), its parameters as attributes."""
    attrs = attributes(node)
    kind = _text(attrs.pop("activation", b""))
    named = ("activation_alpha", "activation_beta", "activation_gamma")
    params = [attrs.pop(n) for n in named if n in attrs]
    # ONNX Runtime fuses no Clip into a Gemm, so which parameter is which bound is not known
    if kind == "Clip" or any(n.startswith("activation") for n in attrs):
        return None
    return _with_activation(rewrite, node, "Gemm", node.input, attrs, kind, params, "")


def _with_activation(
    rewrite: _Rewrite,
    node: onnx.NodeProto,
    op: str,
    inputs: list[str],
    attrs: dict,
    kind: str,
    params: list[float],
    summand: str,
) -> list[onnx.NodeProto] | None:
    """`op` on `inputs`, then `+ summand` and the activation `kind` where there are, writing the
    fused node's output; None where the activation is not one this pass knows."""
    if len(node.output) != 1:
        return None
    y = node.output[0]
    steps = [y] if not kind and not summand else [rewrite.name(f"{y}_{op}")]
    nodes = [helper.make_node(op, list(inputs), [steps[-1]], name=node.name, **attrs)]
    if summand:
        steps.append(y if not kind else rewrite.name(f"{y}_sum"))
        label = rewrite.name(f"{node.name}/Add")
        nodes.append(helper.make_node("Add", [steps[-2], summand], [steps[-1]], name=label))
    if kind:
        activation = rewrite.activation(node, kind, params, steps[-1], y)
        if activation is None:
            return None
        nodes.append(activation)
    return nodes


def _fused_matmul(rewrite: _Rewrite, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """FusedMatMul(A, B): alpha * A' B' (' a transpose of the last two axes where asked), for a
    constant B when it is transposed; a batched transpose stays fused."""
    attrs = attributes(node)
    alpha = float(attrs.get("alpha", 1.0))
    if attrs.get("transA", 0) or attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        return None
    a, b = node.input[0], node.input[1]
    if attrs.get("transB", 0):
        if b not in rewrite.constants or len(rewrite.constants[b].dims) < 2:
            return None
        b = rewrite.constant(b, np.swapaxes(numpy_helper.to_array(rewrite.constants[b]), -1, -2))
    y = node.output[0]
    if alpha == 1.0:
        return [helper.make_node("MatMul", [a, b], [y], name=node.name)]
    product = rewrite.name(f"{y}_product")
    scale = rewrite.constant(f"{y}_alpha", np.array(alpha, np.float32))
    return [
        helper.make_node("MatMul", [a, b], [product], name=node.name),
        helper.make_node("Mul", [product, scale], [y], name=rewrite.name(f"{node.name}/Mul")),
    ]


def _skip_layer_norm(rewrite: _Rewrite, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """SkipLayerNormalization(input, skip, gamma, beta?, bias?): LayerNormalization over the last
    axis of input + bias + skip (that sum is its fourth output). Its mean and inverse deviation
    outputs have no ONNX op to come from here: a node that names them stays fused."""
    outputs = list(node.output) + [""] * (4 - len(node.output))
    if rewrite.opset < LAYER_NORM_OPSET or outputs[1] or outputs[2]:
        return None
    x, skip, gamma = node.input[:3]
    beta = node.input[3] if len(node.input) > 3 else ""
    bias = node.input[4] if len(node.input) > 4 else ""
    epsilon = float(attributes(node).get("epsilon", 1e-12))
    total = outputs[3] or rewrite.name(f"{outputs[0]}_sum")
    nodes = []
    if bias:
        biased = rewrite.name(f"{outputs[0]}_biased")
        nodes.append(
            helper.make_node("Add", [x, bias], [biased], name=rewrite.name(f"{node.name}/bias"))
        )
        x = biased
    nodes.append(helper.make_node("Add", [x, skip], [total], name=rewrite.name(f"{node.name}/Add")))
    normalized = [total, gamma, beta] if beta else [total, gamma]
    nodes.append(
        helper.make_node(
            "LayerNormalization", normalized, [outputs[0]], name=node.name, axis=-1, epsilon=epsilon
        )
    )
    return nodes


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


REWRITES: dict[str, Callable[[_Rewrite, onnx.NodeProto], list[onnx.NodeProto] | None]] = {
    "FusedConv": _fused_conv,
    "FusedGemm": _fused_gemm,
    "FusedMatMul": _fused_matmul,
    "SkipLayerNormalization": _skip_layer_norm,
}


def split_summed_gemms(model: onnx.ModelProto) -> int:
    """In place: each Gemm ONNX Runtime's MatMulAddFusion made of a MatMul and an Add of a
    computed tensor (a residual sum, `x @ W + x`) written back as the two, and how many were.
    QGemm's bias must be a constant, so such a Gemm stayed float where the MatMul alone runs
    int8 (a 2-D residual MLP kept its second layer float; the 3-D one, unfused, did not)."""
    constants = {t.name for t in model.graph.initializer}
    typed = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    taken = names_in(model.graph)
    nodes, split = [], 0
    for node in model.graph.node:
        first, _, rewrite = node.name.rpartition("/")
        attrs = attributes(node)
        plain = all(attrs.get(k, 1.0) == 1.0 for k in ("alpha", "beta")) and not (
            attrs.get("transA", 0) or attrs.get("transB", 0)
        )
        summand = node.input[2] if len(node.input) > 2 else ""
        fused = node.op_type == "Gemm" and rewrite == "MatMulAddFusion" and plain
        if not fused or not summand or summand in constants:  # QGemm takes a constant bias
            nodes.append(node)
            continue
        product = free_name(f"{node.output[0]}_product", taken)
        if node.output[0] in typed:  # the product has the sum's type and shape: (M, N)
            info = model.graph.value_info.add()
            info.CopyFrom(typed[node.output[0]])
            info.name = product
        nodes += [
            helper.make_node("MatMul", node.input[:2], [product], name=free_name(first, taken)),
            helper.make_node(
                "Add", [product, summand], [node.output[0]], name=free_name(f"{first}/Add", taken)
            ),
        ]
        split += 1
    if split:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return split
