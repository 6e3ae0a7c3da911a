"""`export`: a prepared (and trained) module as the QDQ ONNX file `qdq quantize` writes.

The file is not emitted from torch's fake-quant ops; it is qdq's own rewrite
(`qdq.passes.insert_qdq`) of the module's float graph, with a `Plan` whose qparams are the
learned ones. Three reasons: the format is exactly qdq's by construction (int8 weight codes
behind DequantizeLinear, int32 biases with scale s_x * s_w, one Q/DQ pair per planned
activation, the same names and metadata), so ONNX Runtime fuses it into QLinearConv,
QLinearMatMul, QGemm, ... as it fuses PTQ output; the placement is the one `prepare` mirrored
in torch, decided once by one planner; and the torch graph stays free of export-only code.
The float graph holds the BatchNorm-folded weights on their grids; the plan then carries the
exact codes torch used (uniform or low-bit), so rounding is not redone.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx, nn

from qdq.config import Placement
from qdq.errors import ModelError, UsageError
from qdq.onnx.graph import GraphIndex
from qdq.onnx.model import save_model
from qdq.onnx.repair import check_model
from qdq.onnx.sessions import Use, open_session
from qdq.outputs import check_output
from qdq.passes.fuse import sum_before_layer_norm
from qdq.passes.insert_qdq import insert_qdq
from qdq.pipeline import prepare as prepare_onnx
from qdq.plan.build import Plan, build_plan
from qdq.plan.decisions import static_decisions
from qdq.qat.fakequant import FakeQuantize
from qdq.qat.layers import QuantizedLayer
from qdq.qat.lowbit import LowBitWeight
from qdq.qat.mirror import layer_of, nodes_by_tensor, onnx_layout
from qdq.qat.prepare import QatState, float_copy
from qdq.qat.trace import (
    as_inputs,
    check_finite_parameters,
    check_runs,
    modes,
    restore_modes,
    to_onnx,
)
from qdq.qparams import MIN_SCALE, QParams, Range


def export(
    module: fx.GraphModule,
    path: str | os.PathLike[str],
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
) -> Path:
    """Write `module` (from `qdq.qat.prepare`) to `path` as a QDQ ONNX model with its learned
    scales and weight codes (batch axis dynamic); returns the path. The BatchNorms are folded
    with their running statistics, as the module computes in eval mode."""
    state = _state(module)
    inputs = as_inputs(example_inputs)
    check_finite_parameters(
        module, "training diverged: lower the learning rate, or export an earlier checkpoint"
    )
    target = check_output(path, [])
    flags = modes(module)
    try:
        check_runs(module.eval(), inputs, "example_inputs")
        model = _quantized(module, state, inputs)
    finally:
        restore_modes(module, flags)
    save_model(model, target)
    return target


def _state(module: object) -> QatState:
    state = getattr(module, "meta", {}).get("qdq") if isinstance(module, fx.GraphModule) else None
    if not isinstance(state, QatState):
        raise UsageError(
            f"export takes the module that qdq.qat.prepare returned, got {type(module).__name__}"
        )
    return state


def _quantized(
    module: fx.GraphModule, state: QatState, inputs: tuple[torch.Tensor, ...]
) -> onnx.ModelProto:
    config = replace(state.config, exclude=(*state.config.exclude, *state.excluded))
    model, labels = to_onnx(float_copy(module, state.activations), inputs)
    model, per_channel, _ = prepare_onnx(model, config.per_channel)
    index = GraphIndex(model)
    nodes = nodes_by_tensor(module, labels, index)
    learned = {
        labels[fx_name]: _activation_qparams(module.get_submodule(name), state)
        for fx_name, name in state.activations.items()
        if fx_name in labels
    }
    ranges = {labels[n]: r for n, r in state.ranges.items() if n in labels}
    ranges.update({t: _covered(q) for t, q in learned.items()})
    plan = build_plan(index, static_decisions(index, config), ranges, {}, config, per_channel)
    if set(plan.activations) != set(learned) or not state.activations.keys() <= labels.keys():
        raise ModelError(
            "the module's graph no longer matches the one prepare planned (tensors "
            f"{sorted(set(plan.activations) ^ set(learned))[:3]} differ); export the module "
            "prepare returned without changing its structure"
        )
    plan = _learned_plan(plan, module, index, nodes, learned)
    quantized = insert_qdq(model, plan)
    if config.placement is Placement.ORT:
        quantized, _ = sum_before_layer_norm(quantized)
    check_model(quantized)
    open_session(quantized, Use.CHECK)
    return quantized


def _activation_qparams(quantizer: nn.Module, state: QatState) -> QParams:
    """A fake quantizer's learned grid as qdq's QParams."""
    scale = quantizer.scale.detach().clamp_min(MIN_SCALE).cpu().numpy()
    zero_point = quantizer.zero_point.detach().cpu().numpy().astype(np.int64)
    return QParams(scale, zero_point, state.config.activations)


def _covered(qparams: QParams) -> Range:
    """The real interval a grid covers: [(qmin - z) s, (qmax - z) s]."""
    s, z = qparams.scale.astype(np.float64), qparams.zero_point.astype(np.float64)
    return Range((qparams.scheme.qmin - z) * s, (qparams.scheme.qmax - z) * s)


def _learned_plan(
    plan: Plan,
    module: fx.GraphModule,
    index: GraphIndex,
    nodes: dict[str, list[str]],
    learned: dict[str, QParams],
) -> Plan:
    """`plan` with the learned activation grids, each weight's learned scale and the codes
    torch computed, and bias scales s_x * s_w from those."""
    constants, codes, biases = dict(plan.constants), {}, dict(plan.biases)
    for key, planned in plan.constants.items():
        node = next(n for n in index.nodes if n.name == key[0])
        values, scale = _weight_codes(layer_of(module, node, nodes, index))
        codes[key] = onnx_layout(node, values)
        constants[key] = QParams(scale, np.zeros(scale.shape, np.int64), planned.scheme)
        # its own bias, or the Add after a MatMul that ONNX Runtime fuses into a QGemm
        add = index.sole_consumer(node.output[0])
        owners = {key[0], add.name} if add is not None and node.op_type == "MatMul" else {key[0]}
        for bias_key in plan.biases:
            if bias_key[0] in owners:
                x_scale = learned[node.input[0]].scale.astype(np.float64)
                biases[bias_key] = (x_scale * constants[key].scale).astype(np.float32)
    return replace(
        plan,
        activations=learned,
        constants=constants,
        biases=biases,
        weight_codes=codes,
        grid_codes={},
    )


def _weight_codes(layer: QuantizedLayer) -> tuple[np.ndarray, np.ndarray]:
    """The integer codes (int8) and float32 scales of a layer's quantized folded weight, as
    its forward pass computes them."""
    w = layer.folded()[0].detach()
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        if isinstance(quantizer, LowBitWeight):
            codes, scale = quantizer.codes_and_scale(w)
        elif isinstance(quantizer, FakeQuantize):
            codes, scale = quantizer.codes(w), quantizer.scale.clamp_min(MIN_SCALE)
        else:
            raise ModelError(f"layer {layer.layer} has no weight grid; it was planned float")
    return codes.cpu().numpy().astype(np.int8), scale.float().cpu().numpy()
