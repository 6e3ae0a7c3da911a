"""A torch module as a torch.fx graph and as a float ONNX graph, with the link between them:
which ONNX tensor each fx node's output became.

The link is what lets `prepare` put fake quantization exactly where qdq's plan puts Q/DQ pairs
on the ONNX graph, and `export` give those pairs the learned scales. It is made by exporting
with a marker after every fx node: an op of a private domain that the TorchScript exporter
writes as a node holding the fx node's name, removed again once its input tensor is read off.
The legacy TorchScript exporter (`dynamo=False`, still in torch 2.13) is used because it turns
custom autograd functions into such nodes and names tensors stably; it folds constants, so the
graph qdq plans is the plain one `qdq quantize` would see for the same network.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import onnx
import torch
from torch import fx, nn

from qdq.errors import DataError, ModelError, QdqError, first_line

MARK_DOMAIN = "qdq.mark"
OPSET = 17


class _Mark(torch.autograd.Function):
    """Identity that exports as `qdq.mark::Mark(x, label=<fx node name>)`."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, label: str) -> torch.Tensor:
        return x.clone()  # not `x`: an in-place op after it (ReLU(inplace=True)) must not edit it

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None

    @staticmethod
    def symbolic(g: object, x: object, label: str) -> object:
        out = g.op(f"{MARK_DOMAIN}::Mark", x, label_s=label)
        out.setType(x.type())  # keep the shape, which later symbolics may need
        return out


def mark(x: object, label: str) -> object:
    """`x`, marked with `label` while an ONNX export runs (non-tensors pass unmarked)."""
    if isinstance(x, torch.Tensor) and torch.onnx.is_in_onnx_export():
        return _Mark.apply(x, label)
    return x


def trace(module: nn.Module) -> fx.GraphModule:
    """`module` as a torch.fx GraphModule (sharing its submodules: trace a copy)."""
    try:
        return fx.symbolic_trace(module)
    except Exception as error:  # torch.fx raises many types on untraceable Python
        raise ModelError(
            f"torch.fx cannot trace {type(module).__name__} ({str(error).splitlines()[0]}); "
            "keep data-dependent control flow inside a leaf module or make forward traceable"
        ) from None


def modes(module: nn.Module) -> dict[str, bool]:
    """Each submodule's train/eval flag by name: a user may hold a BatchNorm or a Dropout in
    eval mode inside a model that trains."""
    return {name: sub.training for name, sub in module.named_modules()}


def restore_modes(module: nn.Module, flags: dict[str, bool]) -> nn.Module:
    """`module` with the flags `modes` read set again, parents first (a module that replaced
    one, such as a `QuantizedLayer`, takes its flag); returns it."""
    for name, sub in module.named_modules():
        if name in flags:
            sub.train(flags[name])
    return module


def as_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple of float tensors, or a DataError naming what is wrong."""
    inputs = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise DataError(f"example input {i} is a {type(x).__name__}; give torch tensors")
        if x.dtype != torch.float32 or x.ndim == 0:
            raise DataError(
                f"example input {i} is {x.dtype} of shape {tuple(x.shape)}; give float32 "
                "tensors with a leading batch axis (x.float())"
            )
    return tuple(inputs)


def check_finite_parameters(module: nn.Module, fix: str) -> None:
    """A ModelError naming the parameters that hold NaN or Inf and the buffers that hold NaN
    (a causal mask's -inf is a buffer's purpose), and the `fix`."""
    bad = [name for name, t in module.named_parameters() if not torch.isfinite(t).all()]
    bad += [name for name, t in module.named_buffers() if t.is_floating_point() and t.isnan().any()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ModelError(f"{', '.join(bad[:5])}{more} hold NaN or Inf; {fix}")


@contextmanager
def module_failures(what: str) -> Iterator[None]:
    """Turn the user's module failing on `what` (inputs of another shape, a float16 module)
    into a DataError with torch's reason; qdq's own errors pass unchanged."""
    try:
        yield
    except QdqError:
        raise
    except Exception as error:  # any failure of the user's module on these inputs
        raise DataError(
            f"the module fails on {what}: {first_line(error)}; give inputs of the shapes it "
            "takes, and a float32 module (module.float())"
        ) from error


def check_runs(module: nn.Module, inputs: Sequence[torch.Tensor], what: str) -> None:
    """Run `module` on `inputs` once, without gradients, under `module_failures`."""
    with module_failures(what), torch.no_grad():
        module(*inputs)


def to_onnx(
    graph_module: fx.GraphModule, example_inputs: Sequence[torch.Tensor]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The float ONNX graph of `graph_module` (opset 17, batch axis dynamic) and, per fx node
    whose output is a tensor of it, that tensor's name."""
    marked = _marked(graph_module)
    inputs = [n.target for n in graph_module.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        outputs = graph_module(*example_inputs)
    names = list(_leaves(outputs, "output" if isinstance(outputs, torch.Tensor) else ""))
    if len(set(names)) < len(names) or set(names) & set(inputs):  # keys that clash: numbered
        names = [f"output_{i}" for i in range(len(names))]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        try:
            torch.onnx.export(
                marked, tuple(example_inputs), buffer, input_names=inputs, output_names=names,
                dynamic_axes={n: {0: "N"} for n in [*inputs, *names]}, opset_version=OPSET,
                dynamo=False, custom_opsets={MARK_DOMAIN: 1},
                training=torch.onnx.TrainingMode.EVAL,
            )  # fmt: skip
        except Exception as error:  # the exporter raises many types
            raise ModelError(
                f"torch.onnx cannot export the module ({str(error).splitlines()[0]}); qdq.qat "
                "needs modules the TorchScript exporter handles"
            ) from None
    model = onnx.load_from_string(buffer.getvalue())
    return model, _unmark(model)


def _leaves(value: object, name: str) -> Iterator[str]:
    """A name per tensor of a module's output, in the order torch.onnx flattens it: a dict's
    keys, a tuple's or list's places (`output_0`, `output_1_0`, ...)."""
    if isinstance(value, torch.Tensor):
        yield name
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{name}_{key}" if name else str(key))
    elif isinstance(value, tuple | list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{name or 'output'}_{i}")


def _marked(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of `graph_module` with `mark(value, node name)` after every value node."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph_module.graph.nodes:
        copy = graph.node_copy(node, lambda n: env[n])
        if node.op in ("placeholder", "call_module", "call_function", "call_method"):
            copy = graph.call_function(mark, (copy, node.name))
        env[node] = copy
    return fx.GraphModule(graph_module, graph)


def _unmark(model: onnx.ModelProto) -> dict[str, str]:
    """Remove the Mark nodes from `model` in place; returns fx node name -> tensor name. A mark
    whose output is a graph output hands that name to the tensor it marked."""
    graph = model.graph
    marks = [n for n in graph.node if n.domain == MARK_DOMAIN]
    alias = {n.output[0]: n.input[0] for n in marks}

    def root(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    final = {root(o.name): o.name for o in graph.output if o.name in alias}

    def resolve(name: str) -> str:
        return final.get(root(name), root(name))

    labels = {n.attribute[0].s.decode(): resolve(n.output[0]) for n in marks}
    kept = [n for n in graph.node if n.domain != MARK_DOMAIN]
    for node in kept:
        node.input[:] = [resolve(name) if name else name for name in node.input]
        node.output[:] = [final.get(name, name) for name in node.output]
    del graph.node[:]
    graph.node.extend(kept)
    values = [v for v in graph.value_info if v.name not in alias]
    del graph.value_info[:]
    graph.value_info.extend(values)
    opsets = [o for o in model.opset_import if o.domain != MARK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return labels
