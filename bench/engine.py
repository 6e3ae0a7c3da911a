"""The integer engine's speed against ONNX Runtime's int8 kernels, single-threaded.

Run: python bench/engine.py [--runs 5]
Quantizes the digits CNN and depthwise model and the PP-OCR text-direction classifier with qdq,
then times ONNX Runtime (1 thread) and the engine in both requantization modes on the same batch
(median of --runs), and compares outputs in units of the output's LSB: float requantization
against ONNX Runtime, fixed-point against float. Ratios only; no asserts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from datasets import tasks
from ptq import quantize_qdq, save_samples
from qdq.engine import Engine


def median_ms(run, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Median milliseconds of `run(feeds)` after one warm-up call."""
    run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def output_lsb(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear producing the output (its 1 LSB), or 1."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    output = model.graph.output[0].name
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == output]
    return float(inits[dq[0].input[1]]) if dq else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(
        "| model | batch | ORT int8 ms | engine float ms | engine fixed ms | fixed/ORT | "
        "float = ORT | max LSB | fixed = float | max LSB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in tasks(64):
        if task.name not in ("cnn", "mobilenet", "ppocr_cls"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "q.onnx"
            quantize_qdq(task, model, save_samples(task.calib, Path(tmp) / "calib"))
            x = {task.input_name: task.evaluate[:64]}
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(model), options)
            ms = [median_ms(partial(session.run, None), x, args.runs)]
            outputs = [session.run(None, x)[0]]
            for mode in ("float", "fixed"):
                engine = Engine(model, requant=mode)
                ms.append(median_ms(engine.run, x, args.runs))
                outputs.append(next(iter(engine.run(x).values())))
            lsb = output_lsb(onnx.load(str(model)))
            float_vs_ort = np.abs(outputs[1].astype(np.float64) - outputs[0]) / lsb
            fixed_vs_float = np.abs(outputs[2].astype(np.float64) - outputs[1]) / lsb
            print(
                f"| {task.name} | 64 | {ms[0]:.2f} | {ms[1]:.1f} | {ms[2]:.1f} | "
                f"{ms[2] / ms[0]:.0f}x | {np.mean(float_vs_ort < 1e-3):.4%} | "
                f"{float_vs_ort.max():.2f} | {np.mean(fixed_vs_float < 1e-3):.2%} | "
                f"{fixed_vs_float.max():.2f} |"
            )


if __name__ == "__main__":
    main()
