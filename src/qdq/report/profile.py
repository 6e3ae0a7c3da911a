"""Where a model's time goes: ONNX Runtime's profiler summed per op type."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from qdq.onnx.sessions import Use, open_session


def op_times_ms(
    model: str | os.PathLike[str], feed: dict[str, np.ndarray], runs: int = 20
) -> dict[str, float]:
    """Mean ms per run spent in each op type's kernels (1 thread, after one warm-up run), as
    ONNX Runtime's profiler records them on the graph it optimized: an INT8 model shows the
    fused QLinearConv, not its Q/DQ pairs.

    The warm-up run is left out: its events are told apart by their run index.
    """
    session = open_session(model, Use.PROFILE)
    for _ in range(runs + 1):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    return _per_op_type(events, runs)


def _per_op_type(events: list[dict], runs: int) -> dict[str, float]:
    """Kernel durations (µs in the trace) summed per op type over the last `runs` runs, in ms
    per run."""
    total: dict[str, float] = defaultdict(float)
    run_starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first_timed = run_starts[-runs] if len(run_starts) >= runs else 0
    for event in events:
        args = event.get("args", {})
        kernel = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if kernel and "op_name" in args and event["ts"] >= first_timed:
            total[args["op_name"]] += event["dur"] / 1e3
    return {op: ms / runs for op, ms in sorted(total.items(), key=lambda kv: -kv[1])}
