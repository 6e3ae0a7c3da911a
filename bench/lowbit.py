"""Accuracy of the digits CNN with each weight grid, PTQ only (docs/quantization.md, §19).

Run: python bench/lowbit.py [--model examples/digits/cnn.onnx]
Quantizes the model with `qdq.quantize_model` on examples/digits/calib.npz (256 images) once per
weight grid (uniform int8, binary, ternary, power-of-two; per channel, and power-of-two scales on
the uniform grid), runs each file in ONNX Runtime on examples/digits/test.npz (540 held-out
images) and prints top-1 accuracy, the output SQNR that `qdq quantize` reports (first 16
calibration samples), the time each run took and the distinct weight codes in the file. No asserts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from qdq.config import QuantConfig
from qdq.pipeline import quantize_model
from qdq.scheme import INT8_WEIGHTS

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
RUNS = [
    ("uniform int8", QuantConfig()),
    (
        "uniform int8, power-of-two scales",
        QuantConfig(weights=replace(INT8_WEIGHTS, power_of_two_scale=True)),
    ),
    ("binary", QuantConfig(weight_grid="binary")),
    ("ternary", QuantConfig(weight_grid="ternary")),
    ("power_of_two", QuantConfig(weight_grid="power_of_two")),
    (
        "power_of_two, power-of-two scales",
        QuantConfig(
            weight_grid="power_of_two", weights=replace(INT8_WEIGHTS, power_of_two_scale=True)
        ),
    ),
]


def accuracy(path: Path, data: dict[str, np.ndarray]) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data["input"]})[0]
    return float(np.mean(logits.argmax(axis=1) == data["label"]))


def weight_codes(path: Path) -> list[int]:
    """Every distinct int8 weight code in the file (the DequantizeLinear inputs of rank > 1)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found: set[int] = set()
    for node in model.graph.node:
        codes = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is not None and codes.dtype == np.int8 and codes.ndim > 1:
            found.update(int(c) for c in np.unique(codes))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DIGITS / "cnn.onnx")
    args = parser.parse_args()
    test = dict(np.load(DIGITS / "test.npz"))
    print(f"{'weights':<34} {'top-1':>7} {'output SQNR':>12} {'time':>6}  weight codes")
    print(f"{'FP32':<34} {accuracy(args.model, test):>7.2%}")
    with tempfile.TemporaryDirectory() as folder:
        for name, config in RUNS:
            out = Path(folder) / "model.onnx"
            start = time.perf_counter()
            report = quantize_model(args.model, out, DIGITS / "calib.npz", config, seed=0)
            seconds = time.perf_counter() - start
            sqnr = min(report.output_sqnr.values())
            codes = weight_codes(out)
            shown = (
                codes if len(codes) <= 16 else f"{len(codes)} values in [{codes[0]}, {codes[-1]}]"
            )
            print(
                f"{name:<34} {accuracy(out, test):>7.2%} {sqnr:>9.1f} dB {seconds:>5.1f}s  {shown}"
            )


if __name__ == "__main__":
    main()
