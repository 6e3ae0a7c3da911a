"""Label accuracy over several calibration draws: qdq against each quantize_static configuration.

Run: python bench/draws.py [--draws 5] [--models cnn mobilenet transformer ppocr_cls]
On one calibration set, a model flips a few borderline samples either way by chance (the digits
test set moves 0.19 points per image), so ptq.py's single run cannot rank tools whose accuracy
differs by one or two samples. Here each tool quantizes every model from `--draws` random
calibration sets of 256 samples (digits: drawn from the images train.py fitted on; text lines:
rendered with a new seed per draw), and the table gives the mean and spread of label accuracy,
of agreement with FP32's class and of output SQNR. No asserts: numbers for docs/ptq.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from datasets import Task, digits_split, tasks
from ptq import TOOLS, quantize_with, run_model, save_samples
from text_images import text_lines

SAMPLES = 256


def calibration_draw(task: Task, draw: int) -> np.ndarray:
    """The `draw`-th random calibration set for `task`."""
    if task.name == "ppocr_cls":
        return text_lines(SAMPLES, 192, seed=100 + draw)[0]
    fit = digits_split()[0]
    return fit[np.random.default_rng(draw).choice(len(fit), SAMPLES, replace=False)]


def scores(task: Task, reference: np.ndarray, output: np.ndarray) -> tuple[float, float, float]:
    """(label accuracy, agreement with FP32's class, output SQNR in dB)."""
    accuracy = float((output.argmax(axis=-1) == task.labels).mean())
    agreement = float((output.argmax(axis=-1) == reference.argmax(axis=-1)).mean())
    reference = reference.astype(np.float64)
    sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - output) ** 2))
    return accuracy, agreement, float(sqnr)


def quantize(tool: str, task: Task, data: Path, out: Path) -> None:
    """`quantize_with`, quietly (ORT's calibrators print progress), then a load check."""
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_with(tool, task, data, out)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # loads, or raises


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args()
    print("| model | tool | accuracy mean (min-max) | top-1 = FP32's mean | SQNR dB mean |")
    print("|---|---|---|---|---|")
    for task in tasks(0):
        if task.metric != "accuracy" or (args.models and task.name not in args.models):
            continue
        if task.name == "ppocr_cls":  # 4096 lines, 91 within one logit of the border
            evaluate, labels = text_lines(4096, 192, seed=2)
            task = dataclasses.replace(task, evaluate=evaluate, labels=labels)
        reference = run_model(task.model, task.input_name, task.evaluate)
        fp32 = scores(task, reference, reference)[0]
        print(f"| {task.name} | FP32 | {fp32:.4f} | 1.0000 | inf |")
        results: dict[str, list[tuple[float, float, float]]] = {tool: [] for tool in TOOLS}
        with tempfile.TemporaryDirectory() as tmp:
            for draw in range(args.draws):
                data = save_samples(calibration_draw(task, draw), Path(tmp) / f"draw{draw}")
                for tool in list(results):
                    out = Path(tmp) / "q.onnx"
                    try:
                        quantize(tool, task, data, out)
                    except Exception:  # ORT's per-channel classifier does not load: no row
                        del results[tool]
                        continue
                    output = run_model(out, task.input_name, task.evaluate)
                    results[tool].append(scores(task, reference, output))
        for tool, rows in results.items():
            accuracy, agreement, sqnr = np.array(rows).T
            print(
                f"| {task.name} | {tool} | {accuracy.mean():.4f} ({accuracy.min():.4f}-"
                f"{accuracy.max():.4f}) | {agreement.mean():.4f} | {sqnr.mean():.2f} |"
            )


if __name__ == "__main__":
    main()
