"""Read-only index of an ONNX graph (producers, consumers, constants, float tensors), and the
graph helpers the passes share: names, order, subgraphs, copies."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

T = TypeVar("T")
# The name suffix of the Mul that SmoothQuant (qdq.passes.smooth) puts before a tensor's readers
# to divide it by s: the planner's latency cache reads such a Mul's output as its input.
SMOOTHING_MUL = "_smooth"


class GraphIndex:
    """Who produces and who consumes each tensor, which tensors are constant, which are float."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opsets, self.ir_version = list(model.opset_import), model.ir_version
        self.nodes = list(graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in reads(node):
                if name:
                    self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input if v.name not in self.initializers}
        self.graph_outputs = {v.name for v in graph.output}
        self.elem_type: dict[str, int] = {}
        self.shape: dict[str, tuple[int | None, ...]] = {}  # from shape inference, None = symbolic
        for value in (*graph.input, *graph.value_info, *graph.output):
            tensor = value.type.tensor_type
            self.elem_type[value.name] = tensor.elem_type
            if tensor.HasField("shape"):
                dims = tensor.shape.dim
                self.shape[value.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in dims
                )
        for tensor in graph.initializer:
            self.elem_type[tensor.name] = tensor.data_type
        self._derived: dict[Hashable, object] = {}

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def is_float(self, name: str) -> bool:
        return self.elem_type.get(name) == onnx.TensorProto.FLOAT

    def constant(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def derived(self, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()`, once per `key` for this index: a plan is rebuilt for every candidate
        (range method, float layers), and what it derives from the constants alone need not
        be (MiniLM's embedding table's grid: 0.25 s a rebuild, 11 rebuilds)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]  # type: ignore[return-value]

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node reading `name`, if exactly one does and it is not a graph output."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.graph_outputs else None


def is_smoothing(node: onnx.NodeProto) -> bool:
    """Whether `node` is a Mul SmoothQuant put before a tensor's readers (X / s): the graphs of
    one model smoothed on two calibration draws differ by these alone."""
    return node.op_type == "Mul" and node.name.endswith(SMOOTHING_MUL) and len(node.input) == 2


def names_in(graph: onnx.GraphProto) -> set[str]:
    """Every name `graph` gives a tensor or a node: what a new one must not repeat."""
    names = {name for node in graph.node for name in (*node.input, *node.output, node.name)}
    names |= {v.name for v in (*graph.input, *graph.output)}
    return names | {t.name for t in graph.initializer}


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in `graph` and the graphs inside its nodes."""
    names = names_in(graph) | {v.name for v in graph.value_info}
    for node in graph.node:
        for inner in subgraphs(node):
            names |= all_names(inner)
    return names


def in_order(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each comes after the producers of what it reads (an If after
    those of the tensors its branches read), otherwise as given."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    done: list[bool] = [False] * len(nodes)
    order: list[onnx.NodeProto] = []

    def visit(i: int) -> None:
        stack = [(i, iter(sorted({*nodes[i].input, *subgraph_reads(nodes[i])})))]
        done[i] = True
        while stack:
            j, reads = stack[-1]
            k = next((producer[n] for n in reads if n in producer and not done[producer[n]]), None)
            if k is None:
                stack.pop()
                order.append(nodes[j])
            else:
                done[k] = True
                stack.append((k, iter(sorted({*nodes[k].input, *subgraph_reads(nodes[k])}))))

    for i in range(len(nodes)):
        if not done[i]:
            visit(i)
    return order


def computing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` cut down to the nodes that compute `names`, which are its outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    kept = ancestors(graph, names)
    read = {name for node in kept for name in (*node.input, *subgraph_reads(node))}
    initializers = [t for t in graph.initializer if t.name in read]
    graph.ClearField("node")
    graph.node.extend(kept)
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    graph.ClearField("output")
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    return probe


def ancestors(graph: onnx.GraphProto, names: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes of `graph` that `names` are computed from, in the graph's order."""
    needed, kept = set(names), []
    for node in reversed(graph.node):
        if needed & set(node.output):
            kept.append(node)
            needed |= {*node.input, *subgraph_reads(node)}
    return kept[::-1]


def free_name(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem` with the first counter that makes it a name not in `taken`; added to
    `taken`."""
    name, i = stem, 0
    while name in taken:
        i += 1
        name = f"{stem}{i}"
    taken.add(name)
    return name


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as plain Python values, by name."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs in `node`'s attributes: a Loop's body, an If's branches."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The names `node`'s subgraphs read from outside themselves: an outer initializer they
    use is an input of the node that ONNX does not list."""
    return {name for graph in subgraphs(node) for name in outer_reads(graph)}


def reads(node: onnx.NodeProto) -> tuple[str, ...]:
    """The tensors `node` reads: its inputs, then those its subgraphs (an If's branches, a
    Loop's body) read from outside without listing them. A pass that rescales a tensor, or
    drops a constant, must see those readers too."""
    return (*node.input, *sorted(subgraph_reads(node) - set(node.input)))


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The names a subgraph (an If's branch, a Loop's body) reads from outside itself."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {out for inner in graph.node for out in inner.output}
    reads = {n for inner in graph.node for n in (*inner.input, *subgraph_reads(inner)) if n}
    return reads - defined


def drop_unread_initializers(model: onnx.ModelProto) -> None:
    """Removes the initializers no node reads and the graph does not return: a constant
    that is also a model output (a detector's anchors) stays."""
    kept = {name for node in model.graph.node for name in reads(node)}
    kept |= {value.name for value in model.graph.output}
    for tensor in [t for t in model.graph.initializer if t.name not in kept]:
        model.graph.initializer.remove(tensor)


def rename(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """`node`'s inputs and outputs renamed as `renames` says, and the names its subgraphs
    read from outside (and return as they are)."""
    node.input[:] = [renames.get(name, name) for name in node.input]
    node.output[:] = [renames.get(name, name) for name in node.output]
    for graph in subgraphs(node):
        for inner in graph.node:
            rename(inner, renames)
        for info in graph.output:
            info.name = renames.get(info.name, info.name)


def clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float | None, float | None]:
    """(low, high) of a Clip, from its attributes (opset < 11) or constant inputs; a missing bound
    is infinite, one given by a non-constant input is None."""
    attrs = attributes(node)
    bounds: list[float | None] = [float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))]
    for i in (0, 1):
        name = node.input[i + 1] if len(node.input) > i + 1 else ""
        if name:
            bounds[i] = float(index.constant(name)) if index.is_constant(name) else None
    return bounds[0], bounds[1]


def copied_except(model: onnx.ModelProto, *skipped: str) -> onnx.ModelProto:
    """A copy of `model` without the graph fields `skipped` ("initializer", "node"): a model
    rebuilt from its source need not copy weights it drops or replaces (ddddocr's 33 MB Gemm
    weight, for each of ~50 sessions and each candidate plan)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, {"graph"})
    _copy_fields(model.graph, out.graph, set(skipped))
    return out


def _copy_fields(
    source: onnx.ModelProto | onnx.GraphProto,
    target: onnx.ModelProto | onnx.GraphProto,
    skipped: set[str],
) -> None:
    """Each field set in `source` but those `skipped` onto the empty `target`."""
    for field, value in source.ListFields():
        if field.name in skipped:
            continue
        if hasattr(value, "ListFields"):  # a message
            getattr(target, field.name).CopyFrom(value)
        elif isinstance(value, str | bytes | int | float):
            setattr(target, field.name, value)
        else:  # a repeated field
            getattr(target, field.name).extend(value)


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's constants by name: its initializers and its Constant nodes of a tensor
    `value` (not of `value_ints`, `value_float`, ...)."""
    found = {t.name: t for t in graph.initializer}
    found |= {n.output[0]: n.attribute[0].t for n in graph.node if _tensor_constant(n)}
    return found


def _tensor_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes become initializers, so that weights are found in one place."""
    graph = model.graph
    kept = []
    for node in graph.node:
        if _tensor_constant(node):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def dequantized_constants(model: onnx.ModelProto) -> int:
    """Each DequantizeLinear of constants (a weight-only quantized model's weights) folded
    into the float initializer it computes, in place, so that its readers have constant
    weights to quantize again; how many. ONNX Runtime's constant folding keeps them, and qdq
    had left every such layer float. Blocked scales (`block_size`) stay as they are, and so
    does a model with a QuantizeLinear: its activations are quantized already, and new pairs
    beside theirs would quantize them twice."""
    graph = model.graph
    if any(node.op_type == "QuantizeLinear" for node in graph.node):
        return 0
    constants = {t.name: t for t in graph.initializer}
    kept, folded = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if (
            node.op_type != "DequantizeLinear"
            or node.domain not in ("", "ai.onnx")
            or not all(name in constants for name in inputs)
            or attributes(node).get("block_size")
        ):
            kept.append(node)
            continue
        codes, scale, *zero = (numpy_helper.to_array(constants[name]) for name in inputs)
        point = zero[0].astype(np.int64) if zero else np.int64(0)
        if scale.ndim == 1:  # one scale (and zero point) per slice along `axis`
            axis = attributes(node).get("axis", 1) % codes.ndim
            shape = [-1 if i == axis else 1 for i in range(codes.ndim)]
            scale, point = scale.reshape(shape), point.reshape(shape if point.ndim else ())
        values = (codes.astype(np.int64) - point).astype(scale.dtype) * scale
        tensor = numpy_helper.from_array(values, node.output[0])
        graph.initializer.append(tensor)
        constants[tensor.name] = tensor
        folded += 1
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def hoisted_duplicates(model: onnx.ModelProto, least_bytes: int = 1024) -> int:
    """Each initializer of a subgraph (an If's branch, a Loop's body) that holds the same
    values as another, read from one copy in the main graph instead (subgraphs read outer
    names); returns how many copies went. ONNX Runtime's constant folding gives each branch
    its own copy of a weight it reshapes (Silero VAD's LSTM weights: 6 copies of 2 x 256 kB
    in the file for 2 in the source)."""
    graph = model.graph
    main = {_content(t): t.name for t in graph.initializer if len(t.raw_data) >= least_bytes}
    inner: dict[tuple, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = defaultdict(list)
    for node in graph.node:
        for sub in subgraphs(node):
            for owner, tensor in _initializers_within(sub):
                if len(tensor.raw_data) >= least_bytes:
                    inner[_content(tensor)].append((owner, tensor))
    taken = all_names(graph)
    moved = 0
    for content, copies in inner.items():
        if content not in main and len(copies) < 2:
            continue
        if content not in main:
            shared = onnx.TensorProto()
            shared.CopyFrom(copies[0][1])
            shared.name = main[content] = free_name(copies[0][1].name, taken)
            graph.initializer.append(shared)
        for owner, tensor in copies:
            for node in owner.node:
                rename(node, {tensor.name: main[content]})
            for output in owner.output:  # a branch that returns the weight itself
                output.name = main[content] if output.name == tensor.name else output.name
            owner.initializer.remove(tensor)
            moved += 1
    return moved


def _content(tensor: onnx.TensorProto) -> tuple:
    return tensor.data_type, tuple(tensor.dims), tensor.raw_data


def _initializers_within(
    graph: onnx.GraphProto,
) -> Iterator[tuple[onnx.GraphProto, onnx.TensorProto]]:
    """(graph, initializer) for `graph` and every graph nested in its nodes."""
    for tensor in graph.initializer:
        yield graph, tensor
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _initializers_within(sub)
