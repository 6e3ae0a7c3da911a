"""Ifs whose branch the calibration data decide: quantized inside, written back as Ifs.

Exported models put whole networks inside an If: Silero VAD's `silero_vad.onnx` picks its
16 kHz or 8 kHz network on its scalar `sr` input, and TorchScript exports branch on shapes
(a batch of one squeezed). qdq's rules and passes work on one graph, so each If of the main
graph whose condition is the same on every calibration sample (and on a batch of several) is
replaced by the branch it takes (`inlined`: its nodes and tensors renamed under the If's
name, its outputs written as the If's), which exposes an inner If to the next round. The model
is then quantized as any other, and `rewrapped` puts back each If, innermost first: the nodes
that came from its branch, with the Q/DQ and other nodes that feed only them, become that
branch; the other branch is as it was, in float. So the file takes every input the model took,
and an input that picks the other branch runs it as FP32 did.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, replace
from itertools import chain
from typing import TypeVar

import numpy as np
import onnx

from qdq.data import Samples
from qdq.errors import ModelError
from qdq.onnx.graph import (
    all_names,
    ancestors,
    computing,
    free_name,
    in_order,
    outer_reads,
    rename,
    subgraph_reads,
    subgraphs,
)
from qdq.onnx.sessions import Use, open_session

log = logging.getLogger(__name__)
M = TypeVar("M", onnx.NodeProto, onnx.ValueInfoProto)
ROUNDS = 8  # Ifs nested deeper than this stay as they are
BATCHES = (8, 16)  # batch sizes the pipeline's passes feed besides one sample (`decided_ifs`)
BRANCHES = {True: "then_branch", False: "else_branch"}
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True)
class Inlined:
    """An If replaced by the branch it takes: what `rewrapped` needs to put it back."""

    node: onnx.NodeProto  # the If as it was
    taken: bool  # the condition's value on every calibration sample
    names: frozenset[str]  # the nodes that came from the branch
    types: dict[str, onnx.TypeProto]  # of the If's outputs
    # what computes the condition and the tensors the other branch reads (passes may drop
    # them while the If is away, as nothing else reads them), and the initializers they read
    feeders: list[onnx.NodeProto]
    constants: list[onnx.TensorProto]


def inline_decided(
    model: onnx.ModelProto, samples: Samples, batch_size: int, excluded: Collection[str] = ()
) -> tuple[onnx.ModelProto, list[Inlined]]:
    """`model` with every If the samples decide replaced by its branch, round after round for
    Ifs inside branches, but none if "If" is `excluded` and none `excluded` by name; the
    records, in the order they were inlined."""
    records: list[Inlined] = []
    for _ in range(0 if "If" in excluded else ROUNDS):
        ifs = [
            n
            for n in model.graph.node
            if n.op_type == "If" and n.domain in ("", "ai.onnx") and n.name not in excluded
        ]
        decided = decided_ifs(model, ifs, samples, batch_size) if ifs else {}
        if not decided:
            break
        model, done = inlined(model, decided)
        if not done:
            break
        records += done
    return model, records


def inlined_names(graph: onnx.GraphProto, prefix: str = "") -> set[str]:
    """The names `inlined` gives the nodes inside `graph`'s Ifs, of either branch and at any
    depth (`{if}/{node}`, `{if}/{inner if}/{node}`), which `--exclude` may name as reports
    show them."""
    names: set[str] = set()
    for node in graph.node:
        if node.op_type != "If":
            continue
        for branch in subgraphs(node):
            names |= {
                f"{prefix}{node.name}/{inner.name or f'{inner.op_type}_{k}'}"
                for k, inner in enumerate(branch.node)
            }
            names |= inlined_names(branch, f"{prefix}{node.name}/")
    return names


def decided_ifs(
    model: onnx.ModelProto, ifs: list[onnx.NodeProto], samples: Samples, batch_size: int
) -> dict[str, bool]:
    """The Ifs whose condition has one value on each sample alone and on the first batch of
    each size the pipeline feeds (a condition on the batch size differs there), by name."""
    conditions = [node.input[0] for node in ifs]
    probe = computing(model, conditions)
    try:
        session = open_session(probe, Use.CALIBRATION)
        sizes = sorted({batch_size, *BATCHES} - {1})
        feeds = chain(samples.batches(1), (next(samples.batches(s)) for s in sizes))
        seen: list[set[bool]] = [set() for _ in ifs]
        for feed in feeds:
            for values, value in zip(seen, session.run(conditions, feed), strict=True):
                values.add(bool(np.asarray(value).reshape(-1)[0]))
    except Exception as error:  # the passes that follow say what is wrong with the data
        log.info("the Ifs' conditions could not be computed (%s); the Ifs stay float", error)
        return {}
    return {n.name: next(iter(v)) for n, v in zip(ifs, seen, strict=True) if len(v) == 1}


def inlined(
    model: onnx.ModelProto, decided: dict[str, bool]
) -> tuple[onnx.ModelProto, list[Inlined]]:
    """A copy of `model` with each If named in `decided` replaced by the branch it takes,
    where that branch computes each of its outputs with a node of its own."""
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    graph = flat.graph
    taken = all_names(graph)
    records, nodes = [], []
    for node in map(_copy, graph.node):
        record = node.name in decided and _inline(flat, node, decided[node.name], taken, nodes)
        if record:
            records.append(record)
        else:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    dead = _unread(graph)
    return flat, [_with_feeders(record, graph, dead) for record in records]


def _with_feeders(record: Inlined, graph: onnx.GraphProto, dead: set[str]) -> Inlined:
    """`record` with copies of the nodes that computed its condition or fed its other branch
    and that nothing else reads now (`dead`, by name), and of the initializers they and the
    other branch read."""
    feeders = [_copy(node) for node in record.feeders if node.name in dead]
    read = _outer_reads(record.node, record.taken)
    read |= {name for node in feeders for name in (*node.input, *subgraph_reads(node))}
    constants = [_copy(t) for t in graph.initializer if t.name in read]
    return replace(record, feeders=feeders, constants=constants)


def _outer_reads(node: onnx.NodeProto, taken: bool) -> set[str]:
    """What the If `node` reads from outside besides the branch it takes: its condition and
    what its other branch reads."""
    other = next(a.g for a in node.attribute if a.name == BRANCHES[not taken])
    return {node.input[0], *outer_reads(other)}


def _unread(graph: onnx.GraphProto) -> set[str]:
    """The nodes of `graph` whose outputs nothing reads, nor reads in turn (by name): once an
    If is inlined, those that computed its condition or fed its other branch."""
    readers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in {*node.input, *subgraph_reads(node)}:
            readers[name] += 1
    for output in graph.output:
        readers[output.name] += 1
    dead: set[str] = set()
    for node in reversed(graph.node):  # readers come after what they read
        if not any(readers[name] for name in node.output):
            dead.add(node.name)
            for name in {*node.input, *subgraph_reads(node)}:
                readers[name] -= 1
    return dead


def _inline(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    value: bool,
    taken: set[str],
    nodes: list[onnx.NodeProto],
) -> Inlined | None:
    """Append the branch of `node` that `value` takes to `nodes`, renamed; None (nothing
    appended) where a branch output is not computed in the branch, or is two outputs."""
    branch = next(a.g for a in node.attribute if a.name == BRANCHES[value])
    produced = {out for inner in branch.node for out in inner.output if out}
    outputs = [o.name for o in branch.output]
    if (
        len(set(outputs)) < len(outputs)
        or not set(outputs) <= produced
        or not all(node.output)
        or branch.sparse_initializer
    ):
        return None
    local = produced | {t.name for t in branch.initializer}
    renames = {name: free_name(f"{node.name}/{name}", taken) for name in local}
    renames.update(zip(outputs, node.output, strict=True))
    names = set()
    for k, inner in enumerate(branch.node):
        copy = _copy(inner)
        copy.name = free_name(f"{node.name}/{inner.name or f'{inner.op_type}_{k}'}", taken)
        rename(copy, renames)
        names.add(copy.name)
        nodes.append(copy)
    for tensor in branch.initializer:
        renamed = model.graph.initializer.add()
        renamed.CopyFrom(tensor)
        renamed.name = renames[tensor.name]
    for info in branch.value_info:
        if info.name in renames and renames[info.name] not in node.output:
            model.graph.value_info.add().CopyFrom(info)
            model.graph.value_info[-1].name = renames[info.name]
    return Inlined(
        node=_copy(node),
        taken=value,
        names=frozenset(names),
        types=dict(zip(node.output, (o.type for o in branch.output), strict=True)),
        feeders=ancestors(model.graph, _outer_reads(node, value)),  # `_with_feeders` cuts
        constants=[],
    )


def outputs_kept(model: onnx.ModelProto, records: list[Inlined]) -> onnx.ModelProto:
    """A copy of `model` that also outputs every inlined If's outputs, so that ONNX Runtime's
    optimizer keeps them (it would read an Identity's input in place of its output, across
    the branch's edge); `hidden` takes them out again."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for record in records:
        for name, kind in record.types.items():
            if name not in present:
                copy.graph.output.append(onnx.helper.make_value_info(name, kind))
    return copy


def rewrapped(model: onnx.ModelProto, records: list[Inlined]) -> onnx.ModelProto:
    """A copy of `model` with each inlined If put back, innermost first (`Inlined`);
    `model` itself where there are none."""
    if not records:
        return model
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    for record in reversed(records):
        _rewrap(model_copy.graph, record)
    return model_copy


def _rewrap(graph: onnx.GraphProto, record: Inlined) -> None:
    nodes = list(map(_copy, graph.node))
    readers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        for name in {*node.input, *subgraph_reads(node)}:
            readers[name].append(i)
    read_outside = {o.name for o in graph.output} | _outer_reads(record.node, record.taken)
    inside = [node.name in record.names for node in nodes]
    changed = True
    while changed:  # nodes that feed only the branch's (a weight's DequantizeLinear) join it
        changed = False
        for i in reversed(range(len(nodes))):
            made = [out for out in nodes[i].output if out]
            users = [j for out in made for j in readers.get(out, [])]
            joins = users and all(inside[j] for j in users)
            if not inside[i] and joins and not any(out in read_outside for out in made):
                inside[i] = changed = True
    # but a Q stays beside the op that writes its tensor: ONNX Runtime fuses the two only
    # within one graph (Silero VAD's last encoder convolution had stayed float: 0.109
    # against 0.083 ms a frame)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    for i, node in enumerate(nodes):
        writer = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if inside[i] and writer is not None and not inside[writer]:
            inside[i] = node.name in record.names
    made, crossing = _crossing(nodes, inside, readers, read_outside)
    slots = set(record.node.output)
    while stray := crossing - slots:  # an If output renamed to keep its name past its Q/DQ
        users = [j for name in stray for j in readers.get(name, []) if not inside[j]]
        if not users or any(nodes[j].op_type not in QDQ for j in users):
            break
        for j in users:
            inside[j] = True
        made, crossing = _crossing(nodes, inside, readers, read_outside)
    kept = [name for name in record.node.output if name in made]
    if not crossing <= set(kept):
        raise ModelError(
            f"could not write If {record.node.name!r} back: its branch's tensors "
            f"{sorted(crossing - set(kept))[:3]} are read outside it; quantize with "
            "`--exclude If` to keep it float"
        )
    taken = all_names(graph)
    local = {name: free_name(f"{name}_branch", taken) for name in kept}
    branch_nodes = [node for node, ins in zip(nodes, inside, strict=True) if ins]
    for node in branch_nodes:
        rename(node, local)
    old = next(a.g for a in record.node.attribute if a.name == BRANCHES[record.taken])
    branch = onnx.helper.make_graph(
        branch_nodes,
        old.name,
        [],
        [onnx.helper.make_value_info(local[name], record.types[name]) for name in kept],
        value_info=[v for v in graph.value_info if v.name in made and v.name not in kept],
    )
    positions = [list(record.node.output).index(name) for name in kept]
    other = next(a.g for a in record.node.attribute if a.name == BRANCHES[not record.taken])
    kept_other = onnx.GraphProto()
    kept_other.CopyFrom(other)
    del kept_other.output[:]
    kept_other.output.extend(other.output[k] for k in positions)
    # The other branch reads a quantized tensor's DQ copy, as the taken one does: a float
    # tensor read past its Q is one ONNX Runtime cannot fuse away (Silero VAD's last encoder
    # convolution had stayed float so: 0.109 against 0.083 ms a frame).
    wanted = outer_reads(kept_other)
    copies, added = _dequantized(nodes, inside, readers, wanted, taken)
    for node in kept_other.node:
        rename(node, copies)
    wrapped = onnx.helper.make_node(
        "If",
        [record.node.input[0]],
        kept,
        record.node.name,
        **{BRANCHES[record.taken]: branch, BRANCHES[not record.taken]: kept_other},
    )
    rest = [node for node, ins in zip(nodes, inside, strict=True) if not ins] + added
    present = {out for node in rest for out in node.output}
    present |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    rest += [n for n in record.feeders if not set(n.output) & present]
    read = {name for node in (*rest, wrapped) for name in (*node.input, *subgraph_reads(node))}
    graph.initializer.extend(t for t in record.constants if t.name in read - present)
    graph.ClearField("node")
    graph.node.extend(in_order([*rest, wrapped]))
    outside = [_copy(v) for v in graph.value_info if v.name not in made or v.name in kept]
    graph.ClearField("value_info")
    graph.value_info.extend(outside)


def _dequantized(
    nodes: list[onnx.NodeProto],
    inside: list[bool],
    readers: dict[str, list[int]],
    wanted: set[str],
    taken: set[str],
) -> tuple[dict[str, str], list[onnx.NodeProto]]:
    """For each tensor in `wanted` that a QuantizeLinear outside the branch reads, a
    DequantizeLinear copy outside it: one there, or a new one beside the Q (its DQs all in the
    branch, where they fuse with what reads them); and the new nodes."""
    copies: dict[str, str] = {}
    added = []
    for i, node in enumerate(nodes):
        if node.op_type != "QuantizeLinear" or inside[i] or node.input[0] not in wanted:
            continue
        dqs = [j for j in readers.get(node.output[0], []) if nodes[j].op_type == "DequantizeLinear"]
        out = [j for j in dqs if not inside[j]]
        if out or dqs:
            dq = nodes[(out or dqs)[0]]
            if not out:
                dq = _copy(dq)
                dq.name = free_name(f"{dq.name}_other", taken)
                dq.output[0] = free_name(f"{dq.output[0]}_other", taken)
                added.append(dq)
            copies.setdefault(node.input[0], dq.output[0])
    return copies, added


def _crossing(
    nodes: list[onnx.NodeProto],
    inside: list[bool],
    readers: dict[str, list[int]],
    read_outside: set[str],
) -> tuple[set[str], set[str]]:
    """The tensors the nodes `inside` make, and those of them read outside."""
    made = {out for node, ins in zip(nodes, inside, strict=True) if ins for out in node.output}
    outside = {name for name in made if any(not inside[j] for j in readers.get(name, []))}
    return made, outside | (made & read_outside)


def _copy(message: M) -> M:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy
