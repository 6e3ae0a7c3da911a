"""INT8 latency of qdq's model against ONNX Runtime's quantize_static model, interleaved.

Run: python bench/head_to_head.py [--runs 200] [--models ...]
For each benchmark model: quantize with qdq's defaults and with quantize_static (MinMax, per
channel where ORT writes a loadable model, else per tensor), then time both INT8 models and the
FP32 model in one interleaved loop (1 thread, median), twice with the INT8 models' order swapped,
averaged. Ratios only; no asserts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxruntime as ort

from datasets import tasks
from ptq import medians, quantize_ort, quantize_qdq, save_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args()
    print("| model | batch | FP32 ms | qdq INT8 ms | ORT INT8 ms | qdq/ORT |")
    print("|---|---|---|---|---|---|")
    for task in tasks(128):
        if args.models and task.name not in args.models:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            data = save_samples(task.calib, Path(tmp) / "calib")
            ours, theirs = Path(tmp) / "qdq.onnx", Path(tmp) / "ort.onnx"
            quantize_qdq(task, ours, data)
            quantize_ort(task, theirs, data, "MinMax", True)
            try:
                ort.InferenceSession(str(theirs))
            except Exception:
                quantize_ort(task, theirs, data, "MinMax", False)
            x = task.evaluate[: task.latency_batch]
            # Both orders, half the runs each: the second session created runs 1.5-3% slower.
            fp32, q, o = medians([task.model, ours, theirs], x, args.runs // 2)
            fp32b, ob, qb = medians([task.model, theirs, ours], x, args.runs // 2)
            fp32, q, o = (fp32 + fp32b) / 2, (q + qb) / 2, (o + ob) / 2
            print(f"| {task.name} | {len(x)} | {fp32:.3f} | {q:.3f} | {o:.3f} | {q / o:.2f} |")


if __name__ == "__main__":
    main()
