"""`prepare`: a torch module with fake quantization exactly where `qdq quantize` would put Q/DQ
pairs, initialized from calibration, for the user to train with their own loop and labels.

Where the fake quantization goes is not re-derived for torch: the module is traced with
torch.fx, exported to a float ONNX graph (`qdq.qat.trace`, which links each fx node to its
tensor), and qdq's own planner decides on that graph (`qdq.plan`: the op rules, the int8-flow
analysis, Relu/Clip absorbed into their producer's range, shape ops inheriting their input's
grid, Concat inputs sharing the output's). Each tensor the plan quantizes gets a `FakeQuantize`
after its fx node (tensors that share qparams share one); each weight the plan quantizes gets
its grid on the `QuantizedLayer` that holds it. So `export` can write the same plan with the
learned scales, and the file and the module compute the same thing. Ops the plan keeps float
stay float in torch; a layer torch cannot mirror (a ConvTranspose, a weight the graph rewrote)
is kept float with a warning rather than quantized one way in torch and another in the file.

Initial ranges come from the core's observers (`make_observer(config.method,
config.activations)`) fed the detached outputs over the calibration batches; initial weight
scales from the plan (max |w| per channel, or the low-bit grid's).
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx, nn

from qdq.config import QuantConfig
from qdq.errors import ModelError, SchemeError, UsageError, expect, first_line
from qdq.lowbit import WeightGrid
from qdq.observers import make_observer
from qdq.onnx.graph import GraphIndex
from qdq.pipeline import prepare as prepare_onnx
from qdq.plan.build import Plan, build_plan
from qdq.plan.decisions import Decision, is_excluded, static_decisions
from qdq.plan.flow import Int8Flow
from qdq.plan.saturation import avoids_saturation, conv_rows
from qdq.qat.fakequant import FakeQuantize, learn_log_scale
from qdq.qat.layers import BATCHNORMS, FOLDABLE, QUANTIZABLE, QuantizedLayer
from qdq.qat.lowbit import LowBitWeight
from qdq.qat.mirror import called_module, layer_of, nodes_by_tensor, same_weight
from qdq.qat.trace import (
    as_inputs,
    check_finite_parameters,
    check_runs,
    modes,
    module_failures,
    restore_modes,
    to_onnx,
    trace,
)
from qdq.qparams import QParams, Range
from qdq.scheme import PerChannel, PerTensor

log = logging.getLogger(__name__)
# Training steps that BatchNorm keeps normalizing with batch statistics before they freeze
# (Krishnamoorthi 2018 freezes after a few epochs; 200 steps is 10 epochs of the digits set).
FREEZE_BN_AFTER = 200
NO_TORCH_TWIN = "has no torch counterpart (an intermediate of one torch op)"


@dataclass(frozen=True)
class QatState:
    """What `prepare` decided, kept in the prepared module's `meta["qdq"]` for `export`.

    Keys are fx node names: `activations` names the fake quantizer after each node, `ranges`
    the calibrated range of every tensor the plan observed (a tensor no fx node computes has
    none, and the plan keeps its nodes float again at export); `excluded` are ONNX nodes kept
    float because torch cannot mirror them; `decisions` say why each ONNX node is, or is not,
    quantized."""

    config: QuantConfig
    activations: Mapping[str, str]
    ranges: Mapping[str, Range]
    excluded: tuple[str, ...]
    decisions: Mapping[str, Decision]


def prepare(
    module: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    config: QuantConfig | None = None,
    calibration: Iterable[torch.Tensor | tuple[torch.Tensor, ...]] | None = None,
    freeze_bn_after: int = FREEZE_BN_AFTER,
) -> fx.GraphModule:
    """A copy of `module` with fake quantization where qdq's plan quantizes (STE, LSQ scales,
    BatchNorm folded), initialized on `calibration` (batches like `example_inputs`; those
    alone by default). Train it as the original; `qdq.qat.export` writes the QDQ file:
    `prepare(model, x[:1], QuantConfig(weights=INT4_WEIGHTS), x[:256].split(64))`, your loop,
    then `export(prepared, "model_int8.onnx", x[:1])`. BatchNorm statistics freeze after
    `freeze_bn_after` training steps (or at `freeze_batchnorm`).
    """
    if not isinstance(module, nn.Module):
        raise ModelError(f"prepare takes a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, fx.GraphModule) and "qdq" in module.meta:
        raise UsageError("this module was prepared already: train it, or prepare the original")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise SchemeError(f"config must be a qdq.QuantConfig, got {type(config).__name__}")
    if not (config.weights.symmetric and config.weights.signed):
        raise SchemeError(
            "prepare trains symmetric signed weight grids (zero point 0), as qdq's weight "
            "presets are; use INT8_WEIGHTS, INT4_WEIGHTS or a symmetric signed QScheme"
        )
    ignored = [name for name in ("equalize", "adaround", "data_free") if getattr(config, name)]
    ignored += ["target_sqnr"] if config.target_sqnr is not None else []
    if ignored:
        log.warning("qdq.qat.prepare ignores %s: training learns what they would set", ignored)
    expect(freeze_bn_after, numbers.Integral, "freeze_bn_after")
    if freeze_bn_after < 0:
        raise SchemeError(f"freeze_bn_after must be >= 0 steps, got {freeze_bn_after}")
    if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        # traced from the top, a lone layer is its functional call, which nothing wraps
        module = nn.Sequential(module)
    check_finite_parameters(module, "fix the module's weights before quantizing it")
    inputs = as_inputs(example_inputs)
    batches = [as_inputs(b) for b in calibration] if calibration is not None else [inputs]
    if not batches:
        raise SchemeError("calibration holds no batches; give at least one, or None")
    if torch.is_inference_mode_enabled():
        raise UsageError("call prepare outside torch.inference_mode: its tensors cannot train")
    flags = modes(module)
    try:
        duplicate = copy.deepcopy(module)
    except RuntimeError as error:  # an old-style weight_norm's computed weight, and the like
        raise ModelError(
            f"prepare copies the module, and torch cannot: {first_line(error)}"
        ) from None
    graph_module = trace(duplicate.eval())
    check_runs(graph_module, inputs, "example_inputs")
    for folded, batchnorm in _wrap_layers(graph_module, freeze_bn_after).items():
        if batchnorm in flags:  # a BatchNorm held in eval mode stays so, folded
            flags[folded] = flags[batchnorm]
    graph_module.eval()  # calibration takes no BatchNorm warm-up step
    model, labels = to_onnx(float_copy(graph_module, {}), inputs)
    model, per_channel, _ = prepare_onnx(model, config.per_channel)
    index = GraphIndex(model)
    known = {name for node in index.nodes for name in (node.name, node.op_type)}
    unknown = [
        name
        for name in config.exclude
        if name not in known and not any(is_excluded(n, (name,)) for n in index.nodes)
    ]
    if unknown:
        raise UsageError(
            f"`exclude` {unknown} names no node or op type of the exported module (its nodes "
            f"are named as torch.onnx names them, e.g. {index.nodes[0].name!r})"
        )
    nodes = nodes_by_tensor(graph_module, labels, index)
    targets = Int8Flow(index, static_decisions(index, config), config).calibration_targets()
    observed = {t: nodes[t][-1] for t in targets if t in nodes}
    ranges = _calibrate(graph_module, batches, observed, config)
    unfit = {t: NO_TORCH_TWIN for t in targets if t not in nodes}
    plan, excluded = _mirrored_plan(graph_module, index, nodes, ranges, unfit, config, per_channel)
    activations = _install(graph_module, plan, index, nodes, config)
    observed_ranges = {fx_name: ranges[t] for t, fx_name in observed.items()}
    state = QatState(config, activations, observed_ranges, excluded, plan.decisions)
    graph_module.meta["qdq"] = state
    return restore_modes(graph_module, flags)


def freeze_batchnorm(module: nn.Module) -> None:
    """End the BatchNorm warm-up of every folded layer now: statistics stop updating and
    training sees exactly the folded convolution the exported file holds."""
    for layer in module.modules():
        if isinstance(layer, QuantizedLayer):
            layer.freeze()


def float_copy(graph_module: fx.GraphModule, activations: Mapping[str, str]) -> fx.GraphModule:
    """A copy with the activation fake quantizers (`activations`, fx node -> module) removed and
    each `QuantizedLayer` a plain layer holding its quantized folded weight: the float graph
    qdq plans on, the same before training (`prepare`) and after (`export`)."""
    result = copy.deepcopy(graph_module)
    quantizers = set(activations.values())
    for node in list(result.graph.nodes):
        if node.op == "call_module" and node.target in quantizers:
            node.replace_all_uses_with(node.args[0])
            result.graph.erase_node(node)
    for name, layer in list(result.named_modules()):
        if isinstance(layer, QuantizedLayer):
            result.set_submodule(name, layer.to_float())
    for name in quantizers:
        result.delete_submodule(name)
    result.recompile()
    return result.eval()


def _wrap_layers(graph_module: fx.GraphModule, freeze_after: int) -> dict[str, str]:
    """Each Conv (with the BatchNorm that alone reads it folded in) and Linear called as a
    module becomes a `QuantizedLayer`, float until the plan gives it a grid. A module called
    more than once folds no BatchNorm, nor is a BatchNorm called more than once folded: the
    one wrapper serves every call. Returns each folded BatchNorm's new name -> its old one."""
    erased: set[fx.Node] = set()
    moved: dict[str, str] = {}
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    for node in list(graph_module.graph.nodes):
        layer = None if node in erased else called_module(graph_module, node)
        if not isinstance(layer, QUANTIZABLE):
            continue
        batchnorm, users = None, list(node.users)
        if isinstance(layer, FOLDABLE) and len(users) == 1 and calls[node.target] == 1:
            after = called_module(graph_module, users[0])
            once = after is not None and calls[users[0].target] == 1
            if isinstance(after, BATCHNORMS) and after.track_running_stats and once:
                batchnorm = after
                moved[f"{node.target}.batchnorm"] = users[0].target
                users[0].replace_all_uses_with(node)
                graph_module.graph.erase_node(users[0])
                erased.add(users[0])
                graph_module.delete_submodule(users[0].target)
        wrapped = QuantizedLayer(layer, batchnorm, freeze_after if batchnorm else 0)
        graph_module.set_submodule(node.target, wrapped)
    graph_module.recompile()
    return moved


class _Capture(fx.Interpreter):
    """Runs the graph, feeding each observed node's output to its observer."""

    def __init__(self, graph_module: fx.GraphModule, observers: dict) -> None:
        super().__init__(graph_module)
        self.observers = observers

    def run_node(self, node: fx.Node) -> object:
        out = super().run_node(node)
        if node.name in self.observers and isinstance(out, torch.Tensor):
            self.observers[node.name].update(out.detach().float().cpu().numpy())
        return out


def _calibrate(
    graph_module: fx.GraphModule,
    batches: list[tuple[torch.Tensor, ...]],
    nodes: Mapping[str, str],
    config: QuantConfig,
) -> dict[str, Range]:
    """Range per tensor, observed at fx node `nodes[tensor]` over the batches in eval mode by
    the core's observers (the config's method on the activations' grid)."""
    observers = {
        fx_name: make_observer(config.method, config.activations) for fx_name in nodes.values()
    }
    capture = _Capture(graph_module, observers)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            with module_failures(f"calibration batch {i}"):
                capture.run(*batch)
    return {t: observers[fx_name].compute() for t, fx_name in nodes.items()}


def _mirrored_plan(
    graph_module: fx.GraphModule,
    index: GraphIndex,
    nodes: Mapping[str, list[str]],
    ranges: Mapping[str, Range],
    unfit: Mapping[str, str],
    config: QuantConfig,
    per_channel: bool,
) -> tuple[Plan, tuple[str, ...]]:
    """qdq's plan, with the nodes torch cannot mirror excluded (and a warning naming them)."""
    excluded: dict[str, str] = {}
    while True:
        chosen = replace(config, exclude=(*config.exclude, *excluded))
        decisions = static_decisions(index, chosen)
        plan = build_plan(index, decisions, ranges, unfit, chosen, per_channel)
        unmirrored = _unmirrored(graph_module, plan, index, nodes)
        if not unmirrored:
            # the decisions give torch's reason, not "excluded by --exclude"
            decisions = {
                n: d.to_float(f"qdq.qat keeps it float: {excluded[n]}") if n in excluded else d
                for n, d in plan.decisions.items()
            }
            return replace(plan, decisions=decisions), tuple(excluded)
        for name, why in unmirrored.items():
            log.warning("qdq.qat keeps %s float: %s", name, why)
        excluded.update(unmirrored)


def _unmirrored(
    graph_module: fx.GraphModule,
    plan: Plan,
    index: GraphIndex,
    nodes: Mapping[str, list[str]],
) -> dict[str, str]:
    """ONNX nodes the plan quantizes that torch cannot fake-quantize the same way, and why."""
    found: dict[str, str] = {}
    for tensor in plan.activations:
        producer = index.producer.get(tensor)
        if tensor not in nodes and producer is not None:
            found[producer.name] = f"its output {tensor!r} {NO_TORCH_TWIN}"
    for name, i in plan.constants:
        node = next(n for n in index.nodes if n.name == name)
        layer = layer_of(graph_module, node, nodes, index)
        if layer is None:
            found[name] = (
                "no torch Conv1d/2d/3d or Linear module computes its output alone (a "
                "functional call, or a BatchNorm called more than once, which the export "
                "folds in and qdq cannot)"
            )
        elif not same_weight(index.constant(node.input[i]), layer, node):
            found[name] = "its ONNX weight is not the layer's (the graph was rewritten)"
    return found


def _install(
    graph_module: fx.GraphModule,
    plan: Plan,
    index: GraphIndex,
    nodes: Mapping[str, list[str]],
    config: QuantConfig,
) -> dict[str, str]:
    """Fake quantizers after the planned tensors' fx nodes (one per shared grid) and grids on
    the planned weights; returns fx node -> activation quantizer name."""
    fx_nodes = {n.name: n for n in graph_module.graph.nodes}
    shared: dict[int, str] = {}
    activations: dict[str, str] = {}
    for tensor, qparams in plan.activations.items():
        if id(qparams) not in shared:
            shared[id(qparams)] = f"activation_quantizer_{len(shared)}"
            learn = not config.activations.power_of_two_scale
            quantizer = FakeQuantize.from_qparams(qparams, None, learn, per_sample=True)
            graph_module.add_submodule(shared[id(qparams)], learn_log_scale(quantizer))
        for fx_name in nodes[tensor]:
            node = fx_nodes[fx_name]
            with graph_module.graph.inserting_after(node):
                quantized = graph_module.graph.call_module(shared[id(qparams)], (node,))
            node.replace_all_uses_with(quantized, delete_user_cb=lambda u, q=quantized: u is not q)
            activations[fx_name] = shared[id(qparams)]
    for (name, _), qparams in plan.constants.items():
        node = next(n for n in index.nodes if n.name == name)
        layer = layer_of(graph_module, node, nodes, index)
        layer.weight_quantizer = _weight_quantizer(qparams, config, layer.layer)
    graph_module.recompile()
    return activations


def _weight_quantizer(qparams: QParams, config: QuantConfig, layer: nn.Module) -> nn.Module:
    """The planned weight grid on the torch weight, whose output channels are axis 0; its
    codes kept pair-safe where PTQ's are (`qdq.plan.saturation`), so that training sees what
    the int8 kernels will compute."""
    per_channel = isinstance(qparams.scheme.granularity, PerChannel)
    if config.weight_grid is not WeightGrid.UNIFORM:
        scheme = replace(config.weights, granularity=PerChannel(0) if per_channel else PerTensor())
        return LowBitWeight(config.weight_grid, scheme)
    learn = not config.weights.power_of_two_scale
    quantizer = FakeQuantize.from_qparams(qparams, 0 if per_channel else None, learn)
    if avoids_saturation(config) and not qparams.zero_point.any():
        quantizer.pairs = _summation_order(layer)
    return learn_log_scale(quantizer)


def _summation_order(layer: nn.Module) -> np.ndarray | None:
    """The flat indices of `layer`'s weight in the int8 kernel's summation order, as
    (output channels, terms): a Linear's (out, in) as it is (Gemm with transB), a
    convolution's as `conv_rows` orders the ONNX Conv's."""
    indices = np.arange(layer.weight.numel()).reshape(tuple(layer.weight.shape))
    if isinstance(layer, nn.Linear):
        return indices
    return conv_rows(indices, layer.groups)
