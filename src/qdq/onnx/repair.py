"""Models that ONNX Runtime runs but ONNX's own tools stop at, made acceptable to them: nodes out
of topological order (ONNX Runtime sorts them itself; ONNX's checker refuses them), node
outputs that ONNX's shape inference cannot type (after a custom-domain op), and graph inputs
and outputs that declare no shape (the checker wants one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
from onnx import helper

from qdq.onnx.graph import subgraph_reads
from qdq.onnx.sessions import Use, open_session


def in_order(model: onnx.ModelProto) -> bool:
    """Sort `model`'s nodes in place so that each comes after the nodes it reads, moving only
    those that must move; whether any did. A graph with a cycle or a read of a name that nothing
    defines is left as it is (ONNX's checker then says which). ONNX Runtime's own float16
    converter (`convert_float_to_float16(keep_io_types=True)`) writes the casts of the graph's
    inputs after their readers: ONNX Runtime runs that file, and qdq had refused it."""
    graph = model.graph
    given = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    defined = set(given)
    for node in graph.node:
        if not _ready(node, defined):
            break
        defined.update(node.output)
    else:
        return False
    defined, placed, pending = set(given), [], list(graph.node)
    while pending:
        waiting = []
        for node in pending:
            if _ready(node, defined):
                placed.append(node)
                defined.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            return False
        pending = waiting
    copies = [onnx.NodeProto() for _ in placed]
    for copy, node in zip(copies, placed, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
    return True


def _ready(node: onnx.NodeProto, defined: set[str]) -> bool:
    return all(name in defined for name in (*node.input, *subgraph_reads(node)))


def typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the type and shape ONNX Runtime infers for each node output that ONNX's
    shape inference left untyped. ONNX knows no custom-domain op, so the outputs of ONNX
    Runtime's own fusions (SkipLayerNormalization, BiasGelu: its transformer optimizer, which
    users run before quantizing) and everything after them had no type, and the rules kept
    their readers float as "not float32": 33 of an optimized all-MiniLM-L6-v2's 36 linear
    MatMuls (0.92x FP32's time against 0.48x for the same model unoptimized). Unchanged where
    ONNX Runtime cannot load the model (the stages that need it then say why)."""
    graph = model.graph
    known = {v.name for v in (*graph.input, *graph.value_info, *graph.output)}
    known |= {t.name for t in graph.initializer}
    missing = [name for node in graph.node for name in node.output if name and name not in known]
    if not missing:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing)
    try:
        served = {o.name: o for o in open_session(probe, Use.TYPES).get_outputs()}
    except Exception:  # ORT raises its own types
        return model
    for name in missing:
        kind = served[name].type  # "tensor(float)"; a sequence or map is left untyped
        elem = (
            getattr(onnx.TensorProto, kind[7:-1].upper(), None)
            if kind.startswith("tensor(")
            else None
        )
        if elem is None:
            continue
        shape = served[name].shape or None  # [] is ONNX Runtime's unknown rank, not a scalar
        graph.value_info.append(helper.make_tensor_value_info(name, elem, shape))
    return model


def unshaped(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """The graph inputs and outputs that declare no shape (any rank), as ("input", name) and
    ("output", name): one tensor may be both, shaped as one and not as the other."""
    graph = model.graph
    return {
        (kind, v.name)
        for kind, values in (("input", graph.input), ("output", graph.output))
        for v in values
        if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")
    }


def ranked(model: onnx.ModelProto, ranks: dict[str, int]) -> None:
    """Give each unshaped graph input named in `ranks` that many free axes, in place: the
    rank its samples have, so that shape inference reaches the layers behind it (with none,
    GPTQ and the corrections read less of the digits CNN: 42.1 against its 43.4 dB)."""
    free = unshaped(model)
    for value in model.graph.input:
        if value.name in ranks and ("input", value.name) in free:
            shape = value.type.tensor_type.shape
            for axis in range(ranks[value.name]):
                shape.dim.add().dim_param = f"{value.name}_axis{axis}"


def declared_shapes(model: onnx.ModelProto) -> dict[tuple[str, str], onnx.TensorShapeProto | None]:
    """The shape each graph input and output declares, by ("input", name) and ("output",
    name): None where it declares none (any rank)."""
    graph = model.graph
    return {
        (kind, v.name): _copy(v.type.tensor_type.shape)
        if v.type.tensor_type.HasField("shape")
        else None
        for kind, values in (("input", graph.input), ("output", graph.output))
        for v in values
        if v.type.HasField("tensor_type")
    }


def declare_shapes(
    model: onnx.ModelProto, shapes: dict[tuple[str, str], onnx.TensorShapeProto | None]
) -> None:
    """The graph inputs and outputs of `model` declared as `shapes` says (`declared_shapes` of
    the source), in place: shape inference and ONNX Runtime's rewrites had filled in what the
    source left free ('N' for '?', and names of their own such as 'unk__0')."""
    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if (kind, value.name) not in shapes or not value.type.HasField("tensor_type"):
                continue
            shape = shapes[kind, value.name]
            if shape is None:
                value.type.tensor_type.ClearField("shape")
            else:
                value.type.tensor_type.shape.CopyFrom(shape)


def _copy(shape: onnx.TensorShapeProto) -> onnx.TensorShapeProto:
    copied = onnx.TensorShapeProto()
    copied.CopyFrom(shape)
    return copied


def declare_no_shape(model: onnx.ModelProto, names: set[tuple[str, str]]) -> None:
    """Clear the shapes of the graph inputs and outputs `names` (as `unshaped` gives them), in
    place: the interface of a source that declared none."""
    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if (kind, value.name) in names:
                value.type.tensor_type.ClearField("shape")


def check_model(model: onnx.ModelProto) -> None:
    """ONNX's checker, except that a graph input or output may declare no shape (any rank):
    the checker wants one, ONNX Runtime runs the model without, and so does qdq."""
    with empty_shapes(model):
        onnx.checker.check_model(model)


@contextlib.contextmanager
def empty_shapes(model: onnx.ModelProto) -> Iterator[set[tuple[str, str]]]:
    """The graph inputs and outputs that declare no shape given an empty one while inside (what
    ONNX's checker and version converter want), then none again; yields them (`unshaped`)."""
    names = unshaped(model)
    try:
        for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
            for value in values:
                if (kind, value.name) in names:
                    value.type.tensor_type.shape.SetInParent()
        yield names
    finally:
        declare_no_shape(model, names)
