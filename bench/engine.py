"""The integer engine against ONNX Runtime's int8 kernels: bit-exactness and speed, one thread.

Run: python bench/engine.py [--runs 7] [--models cnn mobilenet ppocr_cls ppocr_det ppocr_rec
    efficientnet_lite0]
Quantizes each model with qdq's defaults, then on one batch of held-out inputs:
- exactness: the share of output elements bit-identical to ONNX Runtime's in each requantization
  mode, and (`qdq diff --inputs-from ort`) how many integer codes the engine's kernels give
  differently when every node is fed ONNX Runtime's own inputs;
- speed: ONNX Runtime (one intra-op thread) and the engine with NumPy and compiled kernels (one
  BLAS thread, one thread in its float fallback's ONNX Runtime sessions), timed interleaved,
  fastest of --runs each, in wall-clock time and in the process's CPU time (on a shared
  machine the CPU time leaves out the waits for a core, which wall-clock time counts).
Ratios only; no asserts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from datasets import tasks
from ptq import quantize_qdq, save_samples
from qdq.engine import Engine
from qdq.engine.diff import diff_model

BATCH = {
    "cnn": 64,
    "mobilenet": 64,
    "ppocr_cls": 16,
    "ppocr_det": 4,
    "ppocr_rec": 8,
    "efficientnet_lite0": 8,
}


def fastest_ms(runs: dict[str, object], feeds: dict[str, np.ndarray], rounds: int) -> dict:
    """Fastest milliseconds of each `run(feeds)`, wall-clock and CPU time ("cpu " + name),
    the runs interleaved, after one warm-up."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for run in runs.values():
        run(feeds)
    for _ in range(rounds):
        for name, run in runs.items():
            start, cpu = time.perf_counter(), time.process_time()
            run(feeds)
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    wall = {name: min(t[0] for t in values) * 1e3 for name, values in times.items()}
    return wall | {f"cpu {name}": min(t[1] for t in values) * 1e3 for name, values in times.items()}


def kernel_departures(model: Path, data: Path) -> int:
    """Integer codes that differ from ONNX Runtime's when each node reads ORT's inputs."""
    diff = diff_model(model, data, inputs_from="ort", max_samples=4)
    return sum(n.differing for n in diff.nodes if n.unit == "LSB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=list(BATCH))
    args = parser.parse_args()
    print(
        "| model | batch | ORT ms | engine NumPy ms | engine compiled ms | NumPy/ORT | "
        "compiled/ORT | compiled/ORT, CPU time | float = ORT | spec = ORT | fixed = ORT | "
        "kernels fed ORT's inputs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task in tasks(64):
        if task.name not in args.models:
            continue
        batch = BATCH[task.name]
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "q.onnx"
            quantize_qdq(task, model, save_samples(task.calib, Path(tmp) / "calib"))
            x = {task.input_name: task.evaluate[:batch]}
            data = Path(tmp) / "data.npz"
            np.savez(data, **x)
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(model), options)
            want = session.run(None, x)[0]
            same = {}
            for mode in ("float", "spec", "fixed"):
                got = next(iter(Engine(model, mode).run(x).values()))
                same[mode] = float(np.mean(got == want))
            engines = {
                k: Engine(model, "float", kernels=k, threads=1) for k in ("numpy", "compiled")
            }
            with threadpool_limits(1):
                ms = fastest_ms(
                    {"ort": partial(session.run, None)} | {k: e.run for k, e in engines.items()},
                    x,
                    args.runs,
                )
            departures = kernel_departures(model, data)
        print(
            f"| {task.name} | {batch} | {ms['ort']:.2f} | {ms['numpy']:.1f} | "
            f"{ms['compiled']:.1f} | {ms['numpy'] / ms['ort']:.1f}x | "
            f"{ms['compiled'] / ms['ort']:.1f}x | {ms['cpu compiled'] / ms['cpu ort']:.1f}x | "
            f"{same['float']:.2%} | {same['spec']:.2%} | "
            f"{same['fixed']:.2%} | {departures} codes differ |",
            flush=True,
        )


if __name__ == "__main__":
    main()
