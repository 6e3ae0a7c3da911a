"""The integer-only reference engine: runs QOperator graphs with qdq's integer kernels.

QDQ graphs are first lowered to QOperator form by ONNX Runtime's own QDQ fusion (the rewrite its
CPU provider executes: DQ -> Conv -> Q becomes QLinearConv, and so on), so the engine computes
exactly the integer ops ONNX Runtime would, but with its own kernels. Ops without an integer
kernel run through a one-node ONNX Runtime session: data movement on integer tensors (Reshape,
MaxPool, ...) stays integer; ops on float tensors are the float fallback, listed by
`float_nodes`.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from qdq.data import check_feeds, model_inputs
from qdq.engine.context import Context, Kernel, Requant
from qdq.engine.elementwise import FLOAT_KERNELS
from qdq.engine.jit import available
from qdq.engine.kernels import INTEGER_ONLY, KERNELS
from qdq.errors import ModelError, expect, first_line
from qdq.onnx.graph import attributes, reads
from qdq.onnx.model import load_model, ort_rewrite
from qdq.onnx.sessions import Use, open_session

Kernels = Literal["auto", "numpy", "compiled"]
# float ops whose one-node session declares its inputs' shapes: ONNX Runtime's layout
# transformer takes a pool to NCHWc, as in the whole graph, only when it knows the channel
# count; run plain, PP-OCRv4's recognizer's AveragePool sums in another order (0.9% of the
# outputs differ). Declared for GlobalAveragePool, 66% of them would: there the whole graph
# keeps the plain kernel (docs/engine.md).
SHAPED = frozenset({"AveragePool", "MaxPool"})
# Ops whose inputs or outputs are sequences of tensors (ONNX's `seq` type): lists here
SEQUENCE_OPS = frozenset({
    "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SplitToSequence",
})  # fmt: skip


@dataclass(frozen=True)
class _Step:
    """One node as the engine runs it, resolved once per model."""

    position: int
    node: onnx.NodeProto
    attrs: dict
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kernel: Kernel | None  # its integer kernel, whatever the inputs' types
    integer: Kernel | None  # a kernel for integer inputs only (MaxPool, Reshape, ...)
    fallback: Callable | None  # a compiled float kernel in place of ONNX Runtime's, if any
    label: str  # "name (op)", as `float_nodes` lists it


@dataclass(frozen=True)
class Overflow:
    """Accumulations of one node that did not fit the simulated accumulator."""

    node: str
    overflows: int
    total: int


class Engine:
    """A model prepared for integer execution; `run` many feeds through it."""

    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike[str],
        requant: Requant = "fixed",
        accumulator_bits: int = 32,
        kernels: Kernels = "auto",
        threads: int | None = None,
    ) -> None:
        """`threads`: intra-op threads of the float fallback's ONNX Runtime sessions (None:
        ONNX Runtime's default, every core; 1 for a one-thread measurement)."""
        if kernels not in ("auto", "numpy", "compiled"):
            raise ModelError(f"kernels must be 'auto', 'numpy' or 'compiled', got {kernels!r}")
        if kernels == "compiled" and not available():
            raise ModelError(
                "kernels='compiled' needs Numba: pip install 'qdq[fast]', or use kernels='numpy'"
            )
        if requant not in ("fixed", "float", "spec"):
            raise ModelError(f"requant must be 'fixed', 'float' or 'spec', got {requant!r}")
        expect(model, (onnx.ModelProto, str, os.PathLike), "model")
        expect(accumulator_bits, numbers.Integral, "accumulator_bits")
        expect(threads, (numbers.Integral, type(None)), "threads")
        if threads is not None and threads < 1:
            raise ModelError(f"threads must be >= 1 (or None: every core), got {threads}")
        if accumulator_bits not in (16, 32):
            raise ModelError(f"accumulator_bits must be 16 or 32, got {accumulator_bits}")
        if not isinstance(model, onnx.ModelProto):
            model = load_model(Path(model))
        makes = [n for n in model.graph.node if n.op_type in SEQUENCE_OPS]
        if makes:  # its tensors are lists: no kernel's, no one-node session's declared input
            raise ModelError(
                f"node {makes[0].name!r} ({makes[0].op_type}) makes or reads a sequence of "
                "tensors, which the integer engine does not run: `qdq run --engine ort` runs "
                "it, and `qdq compare` measures it against the FP32 model"
            )
        if any(
            n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node
        ) and _has_qdq_groups(model):
            model = ort_rewrite(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        self.model = model
        self.requant = requant
        self.accumulator_bits = accumulator_bits
        # which kernels run: the compiled ones when Numba is installed ("auto"), else NumPy's
        self.kernels = ("compiled" if available() else "numpy") if kernels == "auto" else kernels
        self._weights: dict[int, tuple] = {}  # the compiled path's prepared weights, per node
        self._buffers: dict[tuple[int, str], np.ndarray] = {}  # `run`'s arrays, reused
        self.constants = {
            t.name: _read_only(numpy_helper.to_array(t)) for t in model.graph.initializer
        }
        self.opsets = list(model.opset_import)
        self.inputs = [i.name for i in model.graph.input if i.name not in self.constants]
        self.threads = threads
        self._specs = model_inputs(model)
        self._plan = [_step(position, node) for position, node in enumerate(model.graph.node)]
        self._spent = _spent(self._plan, {o.name for o in model.graph.output} | set(self.constants))
        self._sessions: dict[tuple, ort.InferenceSession] = {}  # per (node, input shapes)
        self._multipliers: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # M -> (m0, shift)
        self.float_nodes: list[str] = []
        self.last_context = Context(requant, accumulator_bits)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.trace(feeds, keep=False)
        # copies: the next run writes into the arrays this one used (and the compiled
        # convolutions leave channels-last memory behind their views)
        return {o.name: np.array(values[o.name], order="C") for o in self.model.graph.output}

    def trace(
        self,
        feeds: dict[str, np.ndarray],
        source: Mapping[str, np.ndarray] | None = None,
        keep: bool = True,
    ) -> dict[str, np.ndarray | None]:
        """Every tensor of a run on `feeds`. With `source`, each node reads `source`'s tensors
        where it has them instead of the engine's own, so that a kernel's difference from
        another runtime is told apart from one it inherited (`qdq diff --inputs-from`). With
        `keep=False` (`run`), each tensor is let go after the last node that reads it, only
        the outputs and constants remain, and the compiled kernels write into the arrays they
        wrote in the last such run (an engine runs one feed at a time)."""
        check_feeds(feeds, self._specs, "feeds")
        values: dict[str, np.ndarray | None] = {**self.constants, **feeds, "": None}
        context = Context(
            self.requant,
            self.accumulator_bits,
            multipliers=self._multipliers,
            compiled=self.kernels == "compiled",
            weights=self._weights,
            buffers=None if keep else self._buffers,
        )
        float_nodes = []
        for step in self._plan:
            if source is None:
                inputs = [values[n] for n in step.inputs]
            else:
                inputs = [source[n] if n in source else values[n] for n in step.inputs]
            # an unnamed node by its op and place: its accumulators are its own
            context.node = step.node.name or f"{step.node.op_type} #{step.position}"
            context.position = step.position
            integer = step.integer is not None and inputs[0].dtype.kind in "iu"
            if kernel := step.kernel or (step.integer if integer else None):
                try:
                    outputs = kernel(context, inputs, step.attrs)
                except ModelError as error:  # the kernels' messages do not know the node
                    raise ModelError(
                        f"node {step.node.name!r} ({step.node.op_type}): {error}"
                    ) from None
                if outputs is None:  # a form the integer kernel leaves to ONNX Runtime
                    outputs = self.ort_node(step.position, step.node, inputs)
            else:
                outputs = None
                if step.fallback is not None and context.compiled:
                    outputs = step.fallback(context, inputs, step.attrs)
                if outputs is None:
                    outputs = self.ort_node(step.position, step.node, inputs)
                # float where its data is or it makes floats: a Resize of codes, whose scales
                # are float, moves integers
                made = [o for o in outputs if isinstance(o, np.ndarray)]
                if _is_float(inputs[0] if inputs else None) or any(map(_is_float, made)):
                    float_nodes.append(step.label)
            values.update(zip(step.outputs, outputs, strict=False))
            if not keep:
                for name in self._spent[step.position]:
                    values.pop(name, None)
        self.float_nodes = float_nodes
        self.last_context = context
        return values

    def overflows(self) -> list[Overflow]:
        """Per node of the last run: accumulations beyond the accumulator's range."""
        return [
            Overflow(name, a.overflows, a.total)
            for name, a in self.last_context.accumulators.items()
        ]

    def ort_node(self, position: int, node: onnx.NodeProto, inputs: list) -> list[np.ndarray]:
        """Node `position` run alone by ONNX Runtime on `inputs` (a session cached per node):
        the engine's float fallback. The node's constant inputs stay initializers, so that
        ONNX Runtime optimizes it as in a whole-model session and a float Conv runs the same
        kernel (NCHWc, needing constant weights) and gives the same float32 sums; for the
        ops in `SHAPED` the inputs' shapes are declared too (a session per shape)."""
        # a Loop's or If's body may read outer tensors that its inputs do not list (`reads`)
        names = reads(node)
        fixed = {n for n in names if n in self.constants}
        # by name: one tensor may feed several inputs (a Slice whose axes and steps are one [1])
        present = {
            name: x for name, x in zip(names, inputs, strict=True) if name and name not in fixed
        }
        shapes = tuple(x.shape for x in present.values()) if node.op_type in SHAPED else ()
        session = self._sessions.get((position, shapes))
        if session is None:
            graph = helper.make_graph(
                [node],
                "one",
                [
                    helper.make_tensor_value_info(
                        n, helper.np_dtype_to_tensor_dtype(x.dtype), shape
                    )
                    for (n, x), shape in zip(
                        present.items(), shapes or [None] * len(present), strict=True
                    )
                ],
                [onnx.ValueInfoProto(name=o) for o in node.output if o],
                [numpy_helper.from_array(self.constants[n], n) for n in sorted(fixed)],
            )
            one = helper.make_model(
                graph, opset_imports=self.opsets, ir_version=self.model.ir_version
            )
            level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            try:
                session = open_session(one, Use.ONE_NODE, level=level, threads=self.threads)
            except Exception as error:  # onnxruntime raises its own types (a custom op's Fail)
                raise ModelError(
                    f"node {node.name!r} ({node.op_type}): ONNX Runtime cannot run it "
                    f"({first_line(error)})"
                ) from None
            self._sessions[position, shapes] = session
        return session.run([o for o in node.output if o], present)


def _is_float(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _read_only(array: np.ndarray) -> np.ndarray:
    """`array`, no longer writeable: a constant of the model, whose prepared form a kernel
    may keep between runs (`product_kernels`)."""
    array.flags.writeable = False
    return array


def _step(position: int, node: onnx.NodeProto) -> _Step:
    """How the engine runs `node`: its kernels looked up and its attributes parsed, once."""
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    attrs = attributes(node)
    kernel = KERNELS.get(key)
    if node.op_type == "Constant" and "value" in attrs:
        value = [numpy_helper.to_array(attrs["value"])]
        kernel = lambda ctx, inputs, attrs: value  # noqa: E731
    return _Step(
        position,
        node,
        attrs,
        reads(node),
        tuple(node.output),
        kernel,
        # one output: MaxPool's indices come from ONNX Runtime
        INTEGER_ONLY.get(key) if len([o for o in node.output if o]) == 1 else None,
        FLOAT_KERNELS.get(key),
        f"{node.name or f'node #{position}'} ({node.op_type})",  # an unnamed one by its place
    )


def _spent(plan: list[_Step], kept: set[str]) -> list[tuple[str, ...]]:
    """Per step, the tensors no later step reads (none of `kept`)."""
    last = {name: step.position for step in plan for name in step.inputs if name}
    spent: list[list[str]] = [[] for _ in plan]
    for name, position in last.items():
        if name not in kept:
            spent[position].append(name)
    return [tuple(names) for names in spent]


def _has_qdq_groups(model: onnx.ModelProto) -> bool:
    """Whether some op reads a DequantizeLinear output (a QDQ model, not just Q/DQ ops)."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return any(
        n.op_type not in ("QuantizeLinear", "DequantizeLinear") and set(n.input) & dequantized
        for n in model.graph.node
    )


def run(
    model: onnx.ModelProto | str | os.PathLike[str],
    feeds: dict[str, np.ndarray],
    *,
    requant: Requant = "fixed",
    accumulator_bits: int = 32,
    kernels: Kernels = "auto",
) -> dict[str, np.ndarray]:
    """Run `model` on `feeds` with integer kernels; see `Engine` to reuse a prepared model."""
    return Engine(model, requant, accumulator_bits, kernels).run(feeds)
