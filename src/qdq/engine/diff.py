"""`qdq diff`: where two executions of one quantized model part, node by node.

The left side is always the integer engine in one requantization mode; the right side is ONNX
Runtime, the engine in the other mode, or the FP32 ops on dequantized values (the QDQ graph run
by ONNX Runtime without fusion: each op in float, then QuantizeLinear). Both run the graph
ONNX Runtime's QDQ fusion makes (ORT_ENABLE_EXTENDED), as the engine does, so tensor names are
shared. With `inputs_from`, every node of one side is fed the other side's tensors, so a
difference it shows is its own kernel's, not one propagated from upstream.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from qdq.data import Samples, model_inputs
from qdq.engine.context import Requant
from qdq.engine.executor import Engine, reads
from qdq.errors import ModelError, UsageError, expect, first_line
from qdq.onnx.model import load_model
from qdq.onnx.sessions import fails_on_data, session_with_outputs
from qdq.report.jsonout import strict_json

Against = Literal["ort", "engine", "fp32"]
Values = dict[str, np.ndarray]
OTHER_MODE: dict[str, Requant] = {"fixed": "float", "float": "fixed"}


@dataclass(frozen=True)
class NodeDiff:
    """How one node's outputs differ between the two sides, over every sample."""

    node: str
    op_type: str
    compared: int  # output elements compared
    differing: int
    max_diff: float  # in output LSB (integer codes) or value units (float tensors)
    unit: str  # "LSB" or "value"
    fallback: bool = False  # a float node the engine hands to ONNX Runtime, run alone

    @property
    def share(self) -> float:
        return self.differing / self.compared if self.compared else 0.0


@dataclass(frozen=True)
class Diff:
    """Per node in graph order, the two sides' disagreement; the first node where they part."""

    left: str
    right: str
    fed: str | None  # which side feeds every node of the other, if any
    samples: int
    nodes: list[NodeDiff]

    @property
    def first_departure(self) -> NodeDiff | None:
        return next((n for n in self.nodes if n.differing), None)

    @property
    def first_kernel_departure(self) -> NodeDiff | None:
        """The first differing node that the engine computes itself (not its float fallback,
        which ONNX Runtime runs alone and may compute with another kernel than in the whole
        graph: an NCHWc layout, a fused neighbour)."""
        return next((n for n in self.nodes if n.differing and not n.fallback), None)

    def as_dict(self) -> dict[str, object]:
        first, kernel = self.first_departure, self.first_kernel_departure
        return {
            "left": self.left,
            "right": self.right,
            "inputs_from": self.fed,
            "graph": "ONNX Runtime's QDQ fusion (ORT_ENABLE_EXTENDED)",
            "samples": self.samples,
            "nodes": [{**asdict(n), "share": n.share} for n in self.nodes],
            "first_departure": first and {"node": first.node, "op_type": first.op_type},
            "first_kernel_departure": kernel and {"node": kernel.node, "op_type": kernel.op_type},
        }

    def to_json(self) -> str:
        return strict_json(self.as_dict())

    def to_text(self) -> str:
        lines = [
            f"{self.left} against {self.right}, {self.samples} samples, on the graph ONNX "
            "Runtime's QDQ fusion makes (ORT_ENABLE_EXTENDED; tensor names are that graph's)"
        ]
        if self.fed:
            lines.append(f"each node fed {self.fed}'s inputs: a difference is that node's own")
        width = max([4, *(len(n.node) for n in self.nodes)])
        ops = max([2, *(len(n.op_type) for n in self.nodes)])
        lines.append(f"{'node':<{width}}  {'op':<{ops}}  {'differing':>22}  max |diff|")
        lines += [
            f"{n.node:<{width}}  {n.op_type:<{ops}}  {n.differing:>9} ({n.share:>9.5%})  "
            f"{n.max_diff:.4g} {n.unit}" + ("  (float, ONNX Runtime alone)" if n.fallback else "")
            for n in self.nodes
        ]
        first, kernel = self.first_departure, self.first_kernel_departure
        lines.append(
            f"first departure: {first.node} ({first.op_type})"
            if first
            else f"first departure: none (all {len(self.nodes)} nodes agree)"
        )
        if first is not None and first.fallback:
            lines.append(
                "  a float node the engine hands to ONNX Runtime, run alone there: ONNX "
                "Runtime's kernel alone differs from its kernel in the whole graph; "
                + (
                    f"first departure of the engine's own kernels: {kernel.node} ({kernel.op_type})"
                    if kernel
                    else "the engine's own kernels all agree"
                )
            )
        return "\n".join(lines)


def diff_model(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    against: Against = "ort",
    requant: Requant = "float",
    inputs_from: Literal["ort", "engine"] | None = None,
    max_samples: int | None = None,
    batch_size: int = 64,
) -> Diff:
    """Run the engine (`requant`) and `against` on `data`; compare every node's outputs."""
    if against not in ("ort", "engine", "fp32"):
        raise UsageError(f"`against` must be ort, engine or fp32, got {against!r}")
    if inputs_from not in (None, "ort", "engine"):
        raise UsageError(f"`inputs_from` must be ort, engine or None, got {inputs_from!r}")
    expect(model_path, (str, os.PathLike), "model_path")
    expect(data, (str, os.PathLike), "data", "a .npz file or a folder of samples")
    expect(max_samples, (numbers.Integral, type(None)), "`max_samples`")
    expect(batch_size, numbers.Integral, "`batch_size`")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be >= 1, got {batch_size}")
    if inputs_from is not None and against != "ort":
        raise UsageError(
            "`inputs_from` feeds the engine and ONNX Runtime each other's tensors; "
            "give `against` ort, or drop `inputs_from`"
        )
    model = load_model(model_path)
    samples = Samples(data, model_inputs(model), max_samples)
    engine = Engine(model, requant)
    right, right_name = _right_side(model, engine, against)
    tallies = {i: _Tally() for i in range(len(engine.model.graph.node))}
    fallback: set[str] = set()  # "name (op)" of the nodes the engine ran through ONNX Runtime
    for feeds in samples.batches(batch_size):
        if inputs_from == "ort":
            theirs = right(feeds)
            mine = engine.trace(feeds, source=theirs)
        elif inputs_from == "engine":
            mine = engine.trace(feeds)
            theirs = _ort_trace(engine, mine)
        else:  # ONNX Runtime first: data the model cannot take is said as such
            theirs = right(feeds)
            mine = engine.trace(feeds)
        fallback.update(engine.float_nodes)
        for position, node in enumerate(engine.model.graph.node):
            for name in node.output:
                if mine.get(name) is not None and theirs.get(name) is not None:
                    tallies[position].add(mine[name], theirs[name])
    nodes = [
        tallies[i].result(node, f"{node.name} ({node.op_type})" in fallback)
        for i, node in enumerate(engine.model.graph.node)
        if tallies[i].compared
    ]
    fed = {"ort": "ONNX Runtime", "engine": "the engine"}.get(inputs_from or "")
    return Diff(f"engine ({requant} requantization)", right_name, fed, samples.count, nodes)


class _Tally:
    """Differing elements and the largest difference of one node, summed over batches."""

    def __init__(self) -> None:
        self.compared = self.differing = 0
        self.max_diff = 0.0
        self.unit = "LSB"

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.compared += a.size
        if a.shape != b.shape:  # a layout the other side does not share: all of it differs
            self.differing += a.size
            self.max_diff = float("inf")
            return
        if a.dtype.kind in "iub" and b.dtype.kind in "iub":
            diff = np.abs(a.astype(np.int64) - b.astype(np.int64)).astype(np.float64)
        else:
            self.unit = "value"
            x, y = a.astype(np.float64), b.astype(np.float64)
            diff = np.where(np.isnan(x) & np.isnan(y), 0.0, np.abs(x - y))
            diff = np.where(np.isnan(diff), np.inf, diff)
        self.differing += int(np.count_nonzero(diff))
        if diff.size:
            self.max_diff = max(self.max_diff, float(diff.max()))

    def result(self, node: onnx.NodeProto, fallback: bool) -> NodeDiff:
        return NodeDiff(
            node.name,
            node.op_type,
            self.compared,
            self.differing,
            self.max_diff,
            self.unit,
            fallback,
        )


def _ort_trace(engine: Engine, source: Values) -> Values:
    """Every node's outputs by ONNX Runtime's own kernels, each node run alone on `source`'s
    tensors (`qdq diff --inputs-from engine`)."""
    values = dict(source)
    for position, node in enumerate(engine.model.graph.node):
        if node.op_type != "Constant":
            inputs = [_read(name, engine.constants, source) for name in reads(node)]
            outputs = engine.ort_node(position, node, inputs)
            values.update(zip([o for o in node.output if o], outputs, strict=True))
    return values


def _read(name: str, own: Values, source: Values | None) -> np.ndarray | None:
    """Tensor `name` from `source` where it has it, else the side's own (None if absent)."""
    if not name:
        return None
    return source[name] if source is not None and name in source else own[name]


def _right_side(
    model: onnx.ModelProto, engine: Engine, against: Against
) -> tuple[Callable[[Values], Values], str]:
    """A function from feeds to every tensor of the `against` side, and its name."""
    if against == "engine":
        other = OTHER_MODE[engine.requant]
        return Engine(engine.model, other).trace, f"engine ({other} requantization)"
    if against == "fp32":
        if model is engine.model:
            raise UsageError(
                "`against` fp32 runs the QDQ graph's float ops on dequantized values; this "
                "model has no QDQ groups (a float model, or QOperator form): give the QDQ file "
                "qdq quantize writes (--format qdq, its default)"
            )
        session = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        name = "FP32 ops on dequantized values (ONNX Runtime, QDQ graph unfused)"
    else:
        session = _session(engine.model, None)
        name = "ONNX Runtime"
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Values) -> Values:
        with fails_on_data("the quantized model on the data"):
            return dict(zip(names, session.run(names, feeds), strict=True))

    return run, name


def _session(
    model: onnx.ModelProto, level: ort.GraphOptimizationLevel | None
) -> ort.InferenceSession:
    """ONNX Runtime's session of `model` with every node output fetched."""
    names = [o for n in model.graph.node for o in n.output if o]
    try:
        return session_with_outputs(model, names, level)
    except Exception as error:  # ONNX Runtime raises its own exception types
        first = first_line(error)
        raise ModelError(
            f"ONNX Runtime cannot run the model ({first}); qdq diff compares models ONNX "
            "Runtime can run"
        ) from None
