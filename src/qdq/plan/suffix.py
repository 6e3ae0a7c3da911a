"""Running only what a candidate plan changes: the accuracy search's candidates differ from the
all-int8 model in a few layers, and everything before the first of them computes what the
all-int8 model computed. The int8 codes that model's QuantizeLinear nodes write are recorded
once (`record`); a candidate then runs from those codes on (`Recorded.suffix`).

Only int8 codes are reused, never float tensors: a QuantizeLinear's output is what ONNX Runtime's
fused kernels write too (QLinearConv ends in it), so asking for it as an output leaves the
fusions, and so the values, as they are; the part that runs again starts with the
DequantizeLinear nodes that read those codes, and ONNX Runtime fuses it as it fuses the whole
candidate. Int8 layers give the whole candidate's outputs to the bit (`tests/plan/test_suffix.py`);
a float layer at the cut may get another float kernel layout from ONNX Runtime than in the whole
graph (PP-OCR's classifier: 11 of a search's 193 scores moved by at most 1e-4 dB, and no
decision with them).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from qdq.onnx.graph import reads
from qdq.onnx.sessions import open_session, session_with_outputs

log = logging.getLogger(__name__)
# The recorded codes of all feeds together; past it a model is scored whole.
RECORD_BUDGET = 256 * 2**20

Outputs = Iterator[list[np.ndarray]]  # per feed, the outputs in the scored names' order


@dataclass(frozen=True)
class Recorded:
    """The all-int8 model's nodes and constants (as digests) and, per feed, every int8 code its
    QuantizeLinear nodes wrote and every output it gave."""

    nodes: frozenset[bytes]
    constants: dict[str, bytes]
    values: list[dict[str, np.ndarray]]

    def suffix(self, candidate: onnx.ModelProto, names: Sequence[str]) -> Callable[[], Outputs]:
        """A function that gives `candidate`'s outputs `names` on every recorded feed, running
        only the nodes that depart from the recorded model and the DequantizeLinear nodes
        between them and the recorded codes."""
        graph = candidate.graph
        same = _unchanged(graph, self)
        producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
        run = {i for i in range(len(graph.node)) if not same[i]}
        pending = list(run)
        cut: set[str] = set()
        while pending:  # every input of a node that runs: a recorded code, or run its producer
            for name in graph.node[pending.pop()].input:
                i = producer.get(name)
                if i is None or i in run:
                    continue
                if graph.node[i].op_type == "QuantizeLinear" and name in self.values[0]:
                    cut.add(name)
                else:
                    run.add(i)
                    pending.append(i)
        made = {out for i in run for out in graph.node[i].output}
        wanted = [n for n in names if n in made]
        if not wanted:
            return lambda: ([values[n] for n in names] for values in self.values)
        model = _partial(candidate, sorted(run), sorted(cut), wanted, self.values[0])
        try:
            session = open_session(model)
        except Exception as error:  # ONNX Runtime's errors share no base: run it whole
            log.info("the candidate runs whole: its partial graph does not load (%s)", error)
            session, wanted = open_session(candidate), list(names)
        inputs = [i.name for i in session.get_inputs()]

        def outputs() -> Outputs:
            for values in self.values:
                ran = session.run(wanted, {n: values[n] for n in inputs})
                got = dict(zip(wanted, ran, strict=True))
                yield [got[n] if n in got else values[n] for n in names]

        return outputs


def record(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> Recorded | None:
    """`model`'s int8 codes and outputs on `feeds` (with the feeds themselves), or None when
    they would take more than RECORD_BUDGET or the graph has subgraphs (an If or a Loop reads
    tensors its inputs do not name, so what a node depends on is not in the graph's edges)."""
    graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in graphs for node in model.graph.node for a in node.attribute):
        return None
    codes = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    names = list(dict.fromkeys([o.name for o in model.graph.output] + codes))
    session = session_with_outputs(model, codes)
    values: list[dict[str, np.ndarray]] = []
    for feed in feeds:  # copies: an array ONNX Runtime returns holds its session's arena
        got = [value.copy() for value in session.run(names, feed)]
        values.append({**feed, **dict(zip(names, got, strict=True))})
        if sum(v.nbytes for v in values[0].values()) * len(feeds) > RECORD_BUDGET:
            return None
    nodes = frozenset(node.SerializeToString() for node in model.graph.node)
    return Recorded(nodes, {t.name: _digest(t) for t in model.graph.initializer}, values)


def _digest(tensor: onnx.TensorProto) -> bytes:
    return hashlib.sha256(tensor.SerializeToString()).digest()


def _unchanged(graph: onnx.GraphProto, recorded: Recorded) -> list[bool]:
    """Per node: the recorded model has it, with the same constants, and every node it reads
    from is unchanged too (a node that reads what a later node writes counts as changed)."""
    constants = {t.name: t for t in graph.initializer}
    produced = {name for node in graph.node for name in node.output}
    digests: dict[str, bytes] = {}
    same_output: dict[str, bool] = {}
    result = []
    for node in graph.node:
        same = node.SerializeToString() in recorded.nodes
        for name in reads(node):
            if not same or not name:
                continue
            if name in same_output:
                same = same_output[name]
            elif name in produced:  # read before it is written: out of graph order, so run it
                same = False
            elif name in constants:
                if name not in digests:
                    digests[name] = _digest(constants[name])
                same = digests[name] == recorded.constants.get(name)
        for name in node.output:
            same_output[name] = same
        result.append(same)
    return result


def _partial(
    model: onnx.ModelProto,
    nodes: list[int],
    cut: list[str],
    outputs: list[str],
    example: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """The nodes `nodes` of `model` as a model of their own: the recorded codes `cut` and the
    model inputs they read come in, `outputs` go out."""
    graph = model.graph
    chosen = [graph.node[i] for i in nodes]
    read = {name for node in chosen for name in reads(node)}
    constants = [t for t in graph.initializer if t.name in read]
    declared = {v.name: v for v in graph.input}
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(example[n].dtype), None)
        for n in cut
    ]
    inputs += [declared[n] for n in declared if n in read]
    out = {v.name: v for v in graph.output}
    part = helper.make_graph(
        chosen, graph.name, inputs, [out[n] for n in outputs], constants, value_info=[]
    )
    result = helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)
    result.functions.extend(model.functions)
    return result
