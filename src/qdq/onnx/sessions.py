"""The one place qdq opens ONNX Runtime sessions: CPU only, with a named set of options per use.

Each set was chosen by a measurement (the comments say which); a new use picks one or adds one
here rather than building its own `SessionOptions`.
"""

from __future__ import annotations

import enum
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from qdq.errors import DataError, first_line
from qdq.onnx.graph import copied_except, subgraph_reads
from qdq.workers import session_threads

PROVIDERS = ["CPUExecutionProvider"]
LEAST_ROUNDS = 5  # interleaved timing rounds a time budget never cuts
# Initializers larger than this reach ONNX Runtime as in-memory external data rather than inside
# the serialized graph: a quantize opens ~50 sessions, and ddddocr's 33 MB Gemm weight cost each
# one 78 ms to serialize and 130 ms to open, against 0.1 ms and 71-81 ms handed over (scratch
# /work/notes/r66/ext.py). Small ones stay inline: one OrtValue each would cost more.
HANDED_BYTES = 1 << 16


class Use(enum.Enum):
    """What a session is for; each picks its options in `_options`."""

    PLAIN = "plain"  # ONNX Runtime's defaults: scoring candidates, `qdq run --engine ort`
    CALIBRATION = "calibration"  # streaming many batches with extra outputs
    OBSERVING = "observing"  # CALIBRATION beside threads that take each batch's outputs
    CHECK = "check"  # one sample at a time after calibration (the report's output check)
    LATENCY = "latency"  # timing: one thread
    ONE_NODE = "one_node"  # a single node run as it is (the engine's float fallback)
    REWRITE = "rewrite"  # optimize and save the graph ONNX Runtime makes (`ort_rewrite`)
    PROFILE = "profile"  # time per node (the HTML report): one thread, ORT's profiler on
    TYPES = "types"  # the types ONNX Runtime infers for a graph's tensors, none rewritten


def open_session(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    use: Use = Use.PLAIN,
    *,
    level: ort.GraphOptimizationLevel | None = None,
    optimized_path: Path | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """A CPU session of `model` (a proto, its bytes, or a path) with `use`'s options; REWRITE
    takes the optimization `level` and writes the optimized graph to `optimized_path`.
    `threads` sets the intra-op threads; by default, in a worker process, its share of the
    cores (`qdq.workers.session_threads`), except for the one-thread timing uses."""
    options = _options(use)
    if threads is None and use not in (Use.LATENCY, Use.PROFILE):
        threads = session_threads()
    if threads is not None:
        options.intra_op_num_threads = threads
    if level is not None:
        options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    weights: list[ort.OrtValue] = []
    if isinstance(model, str | os.PathLike) and not _utf8(str(model)):
        model = onnx.load(str(model))  # ONNX Runtime takes UTF-8 paths only (a checked model)
    # ONNX Runtime 1.32 ends in a segmentation fault building a session of some float16 models
    # (a ViT exported .half(): its MatMul-Transpose fusion beside the NCHWc transformer); qdq
    # runs its own float32 copy, but the check, compare and report run the user's file
    disabled = ["MatmulTransposeFusion"] if _half(model) else []
    if isinstance(model, onnx.ModelProto) and optimized_path is None:
        model, names, weights = _handed(model)
        if names:
            options.add_external_initializers(names, weights)
    elif isinstance(model, onnx.ModelProto):  # ONNX Runtime writes the graph: every weight in it
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    session = ort.InferenceSession(
        model, options, providers=PROVIDERS, disabled_optimizers=disabled
    )
    session.qdq_weights = weights  # ONNX Runtime may read them in place: alive as it is
    return session


def _half(model: onnx.ModelProto | bytes | str | os.PathLike[str]) -> bool:
    """Whether `model` holds float16 weights or inputs (its graph read without its weights'
    files where given as a path or bytes)."""
    if isinstance(model, bytes):
        model = onnx.ModelProto.FromString(model)
    elif not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    half = onnx.TensorProto.FLOAT16
    inputs = (v.type.tensor_type.elem_type for v in model.graph.input)
    return any(t.data_type == half for t in model.graph.initializer) or half in inputs


def _utf8(path: str) -> bool:
    """Whether `path` is UTF-8 text: a file name of other bytes comes from Python with
    surrogates in it, which ONNX Runtime's binding refuses."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _handed(model: onnx.ModelProto) -> tuple[bytes, list[str], list[ort.OrtValue]]:
    """`model` serialized with each initializer over HANDED_BYTES as an external-data stub,
    and those initializers' names and values, for `add_external_initializers`."""
    light = copied_except(model, "initializer")
    graph = model.graph
    read = {name for node in graph.node for name in (*node.input, *subgraph_reads(node))}
    kept = {v.name for v in (*graph.input, *graph.output)}
    names, values = [], []
    for tensor in graph.initializer:
        if tensor.name not in read:  # ONNX Runtime drops it, and then finds none to fill
            if tensor.name in kept:
                light.graph.initializer.append(tensor)
            continue
        if not tensor.HasField("raw_data") or _nbytes(tensor) <= HANDED_BYTES:
            light.graph.initializer.append(tensor)
            continue
        stub = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="qdq-in-memory")
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(tensor)))
    return light.SerializeToString(), names, values


def _nbytes(tensor: onnx.TensorProto) -> int:
    """A tensor's size from its type and shape (upb's `ByteSize` took 49 ms on 33 MB)."""
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _options(use: Use) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Fatal only: ONNX Runtime warns about the model, not about anything qdq or its user did
    # (PicoDet's export printed 32 "Removing initializer ... not used" lines per session), and
    # logs each error it then raises, which qdq reports in its own one line.
    options.log_severity_level = 4
    if use in (Use.CALIBRATION, Use.OBSERVING):
        # All optimizations (the NCHWc layout calibrates EfficientNet-Lite0 in 13 s, not 19),
        # but no memory patterns: with them, memory grew over the first few dozen batches
        # (text-direction classifier 218 -> 266 MB from 32 to 512 samples); without, 215 -> 216.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = False
        if use is Use.OBSERVING:
            # Its threads wait without spinning: the observers' threads take the previous batch
            # meanwhile, on the same cores (ddddocr's detector's calibration: 9.3-10.3 s
            # spinning, 8.0-8.3 s not; the sequential correction's runs, with little Python
            # between them, were 10% faster spinning: 3.4 against 3.8 s).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif use is Use.CHECK:
        # No arena: the check runs one sample at a time and must not raise the peak that
        # calibration set.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    elif use in (Use.LATENCY, Use.PROFILE):
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
    if use is Use.PROFILE:
        # The trace goes to the temporary folder, never beside the user's files; the caller
        # reads it from `end_profiling()` and removes it.
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "qdq-profile")
    elif use in (Use.ONE_NODE, Use.TYPES):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def run_named(
    session: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """`session`'s outputs `names` on `feed`; none for no names, where ONNX Runtime would return
    every output (a model with no float output asks for none)."""
    return session.run(names, feed) if names else []


@contextmanager
def fails_on_data(what: str) -> Iterator[None]:
    """ONNX Runtime's error while running the user's float model on the user's data (a token
    id outside the vocabulary, a shape the graph cannot take) as the DataError it is, naming
    `what` ran; qdq's own errors and bugs pass through."""
    try:
        yield
    except Exception as error:
        if not type(error).__module__.startswith("onnxruntime"):
            raise
        raise DataError(
            f"{what} fails in ONNX Runtime ({_ort_reason(error)}); check that the data suit "
            "the model: its shapes, and values such as token ids within the vocabulary"
        ) from None


def _ort_reason(error: Exception) -> str:
    """ONNX Runtime's message without its status prefix: "node 'gather' (Gather): indices
    element out of data bounds, ..."."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(error, 400))
    node = (
        r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: "
    )
    return re.sub(node, r"node '\2' (\1): ", text)


def session_with_outputs(
    model: onnx.ModelProto,
    names: Iterable[str],
    level: ort.GraphOptimizationLevel | None = None,
    use: Use = Use.CALIBRATION,
) -> ort.InferenceSession:
    """A calibration session (or `use`'s) whose outputs are the model's own followed by
    `names`; `level` overrides its optimization level (`qdq diff` runs a QDQ graph unfused)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return open_session(extended, use, level=level)


def median_latency_ms(
    models: list,
    feed: dict[str, np.ndarray],
    runs: int,
    budget_s: float | None = None,
    still: Callable[[list[list[float]]], set[int]] | None = None,
) -> list[float]:
    """Median ms per run of each model (a proto, a path or serialized bytes), 1 thread, runs
    interleaved so that drift on the machine hits all alike. With `budget_s`, rounds stop once
    they took that long, after at least LEAST_ROUNDS: a model whose one run takes a second
    (the nucleus segmenter's 1024 x 1024 tile) is timed in seconds, not minutes, and runs that
    long vary little. With `still`, from LEAST_ROUNDS on only the models it names (given every
    model's times so far) run again, and rounds stop when it names none: a frontier's
    candidate that can no longer be chosen (`qdq.plan.racing`)."""
    sessions = [open_session(m, Use.LATENCY) for m in models]
    times: list[list[float]] = [[] for _ in sessions]
    for session in sessions:  # warm up
        session.run(None, feed)
    began = time.perf_counter()
    timed = set(range(len(sessions)))
    for round_ in range(runs):
        spent = time.perf_counter() - began
        if budget_s is not None and round_ >= LEAST_ROUNDS and spent > budget_s:
            break
        if still is not None and round_ >= LEAST_ROUNDS:
            timed &= still(times)
            if not timed:
                break
        for i, session in enumerate(sessions):
            if i in timed:
                start = time.perf_counter()
                session.run(None, feed)
                times[i].append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]
