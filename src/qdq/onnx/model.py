"""Loading untrusted ONNX files, preparing them for quantization, saving atomically."""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from qdq.errors import ModelError, first_line
from qdq.onnx.opset import PER_AXIS_OPSET, converted, default_opset
from qdq.onnx.repair import check_model, in_order, typed
from qdq.onnx.sessions import Use, open_session
from qdq.onnx.sparse import densify
from qdq.onnx.untrusted import check_fields

log = logging.getLogger(__name__)

MIN_OPSET = 10  # QuantizeLinear / DequantizeLinear appear in opset 10
TWO_GB = 2**31 - 1
METADATA_KEY = "qdq.quantized_tensors"  # {float tensor name: name of its dequantized copy}
# {float tensor name: the floor qdq started its grid at, below which its only reader is flat}
FLOORS_KEY = "qdq.floored_tensors"
WEIGHTS_KEY = "qdq.weights"  # the weights' grid and bits, GRID:BITS (tables check it)
UNIFORM_INT8 = "uniform:8"  # what WEIGHTS_KEY holds for qdq's default weights (and older files)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file, refusing anything unreadable, empty or reaching outside its folder."""
    if not str(path):  # Path("") is the working folder, which it would name
        raise ModelError("the model path is empty; give the path of an .onnx model")
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist; give the path of an .onnx model")
    if not path.is_file():
        raise ModelError(f"{path} is not a file; give the path of an .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise ModelError(f"{path} is not a readable ONNX model ({error})") from None
    if model.ir_version == 0:
        raise ModelError(f"{path} holds no ONNX graph; is it an .onnx model file?")
    if not model.graph.node:
        raise ModelError(f"{path} is an ONNX model without nodes: it computes nothing to quantize")
    graph = model.graph
    check_fields(model, _tensors(graph), path)
    # ONNX Runtime refuses two nodes of one name, but not two Constants (silero_vad's OpenVINO
    # export names 15 of them 'F0::anon'): it makes them initializers first, and so does qdq
    counts = Counter(n.name for n in graph.node if n.name and n.op_type != "Constant")
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        raise ModelError(
            f"{path} names more than one node {twice[:3]}; ONNX Runtime refuses such a model: "
            "give each node its own name (or none)"
        )
    outputs = Counter(v.name for v in graph.output)
    if twice := sorted(name for name, count in outputs.items() if count > 1):
        raise ModelError(
            f"{path} lists the outputs {twice[:3]} more than once; list each output once (a "
            "caller that wants it twice can copy it)"
        )
    domains = [o.domain or "ai.onnx" for o in model.opset_import]
    twice = sorted({d for d in domains if domains.count(d) > 1})
    if twice:
        raise ModelError(
            f"{path} imports the opset of {twice} more than once; an ONNX model imports each "
            "domain once: re-export it, or keep one of its opset_import entries"
        )
    _load_external_data(model, path.resolve().parent, path)
    densify(model.graph, path, TWO_GB)
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if 0 < opset < MIN_OPSET:
        model = _older_upgraded(model, path)
    elif not MIN_OPSET <= opset <= newest:
        raise ModelError(
            f"{path} uses opset {opset}; qdq supports opsets {MIN_OPSET}..{newest}. "
            "Re-export the model with a supported opset"
        )
    _drop_constant_inputs(model, path)
    if in_order(model):
        log.info("%s: nodes sorted into topological order, as ONNX Runtime sorts them", path)
    try:
        check_model(model)
    except (onnx.checker.ValidationError, UnicodeDecodeError) as error:  # names not UTF-8
        first = str(error).strip().splitlines()[0]
        raise ModelError(f"{path} is not a valid ONNX model: {first}") from None
    return model


def _older_upgraded(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """A model older than QuantizeLinear (opset < 10), converted to opset 13 by ONNX's version
    converter, as a user would convert it by hand; refused with the reason where that fails."""
    opset = default_opset(model)
    _drop_constant_inputs(model, path)  # as the IR it was written in allowed, without a word
    # the IR version of opset 13: IR 3 (before 4) wants every initializer as an input, and the
    # converter adds initializers (Pad's `pads` become one: PyTorch's opset-6 Pad exports failed)
    target = helper.find_min_ir_version_for([helper.make_opsetid("", PER_AXIS_OPSET)])
    model.ir_version = max(model.ir_version, target)
    try:
        upgraded = converted(model, PER_AXIS_OPSET)
    except Exception as error:  # the converter raises bare RuntimeErrors and others
        raise ModelError(
            f"{path} uses opset {opset}, older than QuantizeLinear (opset {MIN_OPSET}), and ONNX's "
            f"version converter could not upgrade it ({first_line(error)}); re-export the model "
            "at opset 13 or newer"
        ) from None
    log.warning("%s uses opset %d; quantizing its conversion to opset 13", path, opset)
    return upgraded


def _drop_constant_inputs(model: onnx.ModelProto, path: Path) -> None:
    """Graph inputs that are also initializers (exporters before IR 4 had to list weights
    as inputs) become plain initializers: qdq quantizes them as the constants they are, and
    the quantized model keeps no input that its int8 weights replaced. From IR 4 on such an
    input is an overridable default, so its dropping is said."""
    initialized = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initialized]
    if len(inputs) == len(model.graph.input):
        return
    if model.ir_version >= 4:
        dropped = [v.name for v in model.graph.input if v.name in initialized]
        log.warning(
            "%s: %d graph inputs have initializers (%s): taken as the constants they default "
            "to, so the quantized model does not take them as inputs",
            path, len(dropped), ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else ""),
        )  # fmt: skip
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)  # IR 3 needs every initializer as an input


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers, sparse ones' values and indices, and node
    attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sparse in (*attribute.sparse_tensors, attribute.sparse_tensor):
                yield from (sparse.values, sparse.indices)
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def float_outputs(model: onnx.ModelProto) -> list[str]:
    """The outputs every check compares with FP32's: the float32 ones, in the graph's order."""
    return [o.name for o in model.graph.output
            if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]  # fmt: skip


def check_outputs_readable(model: onnx.ModelProto, path: object) -> None:
    """Refuse a model with a bfloat16 output: ONNX Runtime's Python API cannot return one
    ("No corresponding Numpy type"), so nothing can run it from Python to compare or save."""
    bfloat16 = [o.name for o in model.graph.output
                if o.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16]  # fmt: skip
    if bfloat16:
        raise ModelError(
            f"{path}: outputs {bfloat16} are bfloat16, which ONNX Runtime's Python API cannot "
            "return; add a Cast to float32 at the end of the model"
        )


def model_bytes(path: str | os.PathLike[str]) -> int:
    """What the model at `path` takes on disk: its file and the files of its external weights
    (its .onnx file alone can be a few hundred bytes of graph)."""
    path = Path(path)
    extra = (f.stat().st_size for f in external_data_files(path) if f.is_file())
    return path.stat().st_size + sum(extra)


def external_data_files(path: Path) -> list[Path]:
    """The files beside the model at `path` that hold its external weights (none if it holds
    its weights itself or cannot be read: reading it reports that)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # any unreadable file has no weights elsewhere to protect
        return []
    folder = path.resolve().parent
    return list(dict.fromkeys(
        folder / location
        for tensor in _tensors(model.graph)
        if external_data_helper.uses_external_data(tensor)
        for location in [next((e.value for e in tensor.external_data if e.key == "location"), "")]
        if location
    ))  # fmt: skip


def _load_external_data(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    """Read external weights after checking that each file lies inside `folder` and that the
    whole model stays under protobuf's 2 GB, which every graph pass here serializes through."""
    size = model.ByteSize()
    for tensor in _tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        item = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        size += item * math.prod(tensor.dims)
        keys = [e.key for e in tensor.external_data]
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if len(set(keys)) < len(keys) or "\0" in location:
            raise ModelError(
                f"{path}: tensor {tensor.name!r} has external data entries {keys} with a key "
                "given twice, or a location holding a NUL byte; the model is corrupt, export it "
                "again"
            )
        target = (folder / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(folder):
            raise ModelError(
                f"{path}: tensor {tensor.name!r} points at external data {location!r}, an "
                "absolute path or one outside the model's folder; refused, as model files are "
                "untrusted. Keep weights beside the model, named relative to it"
            )
        if not target.is_file():
            raise ModelError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing "
                "(or not a file)"
            )
        _check_extent(tensor, target, item * math.prod(tensor.dims), path)
    if size >= TWO_GB:
        raise ModelError(
            f"{path} holds {size / 2**30:.1f} GB of graph and weights; qdq quantizes models "
            "under 2 GB (protobuf's limit on a model held in memory). For larger models use "
            "weight-only quantization, e.g. onnxruntime's MatMulNBits quantizer"
        )
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except (OSError, onnx.checker.ValidationError) as error:  # unreadable: the checker's words
        raise ModelError(f"{path}: cannot read its external data ({error})") from None


def _check_extent(tensor: onnx.TensorProto, target: Path, nbytes: int, path: Path) -> None:
    """The tensor's `offset` and `length` are numbers that stay inside `target` and match its
    dtype and dims."""
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries.get("length", str(nbytes)))
    except ValueError:
        offset = length = -1
    where = f"{path}: tensor {tensor.name!r}"
    if offset < 0 or length != nbytes:
        raise ModelError(
            f"{where} has external data offset {entries.get('offset')!r} and length "
            f"{entries.get('length')!r}, for {nbytes} bytes of weights; the model is corrupt, "
            "export it again"
        )
    if offset + length > target.stat().st_size:
        raise ModelError(
            f"{where} reads bytes {offset}..{offset + length} of {target.name}, which holds "
            f"{target.stat().st_size}; the weights file is truncated, copy it again"
        )


def check_quantizable(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Refuse a model whose opset is newer than ONNX Runtime's QuantizeLinear."""
    opset = default_opset(model)
    if not _ort_quantizes_at(opset):
        raise ModelError(
            f"{path} uses opset {opset}, at which this onnxruntime ({ort.__version__}) has no "
            "QuantizeLinear; re-export the model at a lower opset, or upgrade onnxruntime"
        )


@functools.cache
def _ort_quantizes_at(opset: int) -> bool:
    """Whether ONNX Runtime runs QuantizeLinear and DequantizeLinear at `opset` (probed once)."""
    scale = helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [0.1])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["y"]),
    ]
    x, y = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy")
    graph = helper.make_graph(nodes, "probe", [x], [y], [scale])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        open_session(probe, Use.PLAIN)
    except Exception:  # ONNX Runtime raises its own exception types
        return False
    return True


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's basic (ONNX-standard) rewrites: BatchNorm folded into Conv, constants
    folded, no-ops removed; then shape inference, ONNX's and, where it leaves a tensor
    untyped, ONNX Runtime's (`qdq.onnx.repair.typed`)."""
    optimized = ort_rewrite(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    return typed(onnx.shape_inference.infer_shapes(_own_names(model, optimized)))


OWN_SUFFIX = "_qdq"


def _own_names(source: onnx.ModelProto, optimized: onnx.ModelProto) -> onnx.ModelProto:
    """`optimized` with the initializers ONNX Runtime created renamed (`OWN_SUFFIX`).

    ORT names what its rewrites create from fixed stems (MatMulAddFusion's reshape shapes are
    `gemm_input_shape`, then `gemm_input_shape_token_N`), counting afresh in every session, and
    checks them against node names only. A later session of the same graph (the quantized model,
    the calibration and correction sessions, the user's own) whose rewrites create one again
    then fails: "AddInitializedOrtValue Attempt to replace the existing tensor". Seen on a
    pooled, normalised all-MiniLM-L6-v2 export with fixed shapes, whose int8 attention
    projections ORT fuses only once they read a DequantizeLinear."""
    known = {t.name for t in source.graph.initializer}
    known |= {name for node in source.graph.node for name in node.output}
    renamed = {
        t.name: t.name + OWN_SUFFIX for t in optimized.graph.initializer if t.name not in known
    }
    if not renamed:
        return optimized
    for tensor in optimized.graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for value in optimized.graph.value_info:
        value.name = renamed.get(value.name, value.name)
    for node in _all_nodes(optimized.graph):
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    return optimized


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (which may read its initializers)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _all_nodes(subgraph)


def ort_rewrite(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> onnx.ModelProto:
    """The graph ONNX Runtime's CPU provider makes of `model` at `level`, as an ONNX model.

    At ORT_ENABLE_EXTENDED that fuses QDQ groups into QLinearConv, QLinearMatMul, QGemm,
    QLinearAdd, ... Temporary files stay in a private folder, never beside the user's.
    """
    with tempfile.TemporaryDirectory(prefix="qdq-") as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "optimized.onnx"
        _save(model, source)
        try:
            open_session(source, Use.REWRITE, level=level, optimized_path=target)
        except Exception as error:  # ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load the model: {error}") from None
        return onnx.load(str(target))


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write `model` to `path` atomically: to a temporary name in the same folder, then rename.

    Models over 2 GB go to `path` plus a `<name>.data` file beside it, both moved into place.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelError(f"output folder {path.parent} does not exist; create it first")
    with tempfile.TemporaryDirectory(prefix=".qdq-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        _save(model, staged)
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, path.with_name(data.name))
        os.replace(staged, path)


def _save(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() < TWO_GB:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
