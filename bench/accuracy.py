"""Accuracy tools side by side: plain, +bias correction, +CLE, +AdaRound, per tensor and per
channel, 8- and 4-bit weights, on the depthwise digits model and the PP-OCR text-direction
classifier (a MobileNetV3-style network shipped in `rapidocr_onnxruntime`).

Run: python bench/accuracy.py [--models mobilenet ppocr_cls] [--samples 256]
Prints a Markdown table: output SQNR against FP32 (dB), task accuracy, quantization seconds.
No asserts: numbers for docs/ptq.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from datasets import tasks
from ptq import quality, run_model, save_samples
from qdq.graph.config import QuantConfig
from qdq.pipeline import quantize_model

VARIANTS = {
    "plain": {"bias_correction": False},
    "+BC": {"bias_correction": True},
    "+CLE+BC": {"bias_correction": True, "equalize": True},
    "+AdaRound+BC": {"bias_correction": True, "adaround": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet", "ppocr_cls"])
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    print("| model | weights | variant | SQNR dB | accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for task in tasks(args.samples):
        if task.name not in args.models:
            continue
        reference = run_model(task.model, task.input_name, task.evaluate)
        with tempfile.TemporaryDirectory() as tmp:
            data = save_samples(task.calib, Path(tmp) / "calib")
            for per_channel in (False, True):
                for bits in (8, 4):
                    label = f"{bits}-bit {'per-channel' if per_channel else 'per-tensor'}"
                    for name, options in VARIANTS.items():
                        config = QuantConfig(per_channel=per_channel, weight_bits=bits, **options)
                        out = Path(tmp) / "q.onnx"
                        start = time.perf_counter()
                        quantize_model(task.model, out, data, config)
                        seconds = time.perf_counter() - start
                        result = quality(
                            task, reference, run_model(out, task.input_name, task.evaluate)
                        )
                        print(
                            f"| {task.name} | {label} | {name} | {result['sqnr_db']:.2f} | "
                            f"{result['metric']:.4f} | {seconds:.1f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
