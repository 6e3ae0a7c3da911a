"""qdq on the other forms users save a model in: after ONNX Runtime's extended optimizations
(FusedConv, FusedGemm, FusedMatMul in the file), through ONNX Runtime's transformer optimizer
(SkipLayerNormalization, BiasGelu), converted to float16 by ONNX Runtime's own converter, and
with its ArgMax in the graph (a label output). Each variant is quantized with qdq's defaults on
the same calibration samples, scored against the FP32 source on the evaluation samples (the
task's metric of bench/ptq.py; a label output against FP32's top class), and timed against
its own float file and the source's (1 thread, interleaved). A form qdq quantizes as it does
the source should come out as accurate and as fast.

Run: python bench/variants.py [--models cnn efficientnet_lite0 minilm] [--samples 128]
(docs/ptq.md, "Which ops run in int8", has the numbers).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from datasets import Task, tasks
from ptq import medians, quality, run_model

CLASSIFIERS = ("cnn", "depthwise", "efficientnet_lite0")


def _saved_by_onnx_runtime(task: Task, folder: Path) -> onnx.ModelProto | None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / "extended.onnx")
    ort.InferenceSession(str(task.model), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(folder / "extended.onnx"))


def _transformer_optimizer(task: Task, folder: Path) -> onnx.ModelProto | None:
    if task.name != "minilm":
        return None
    from onnxruntime.transformers import optimizer

    return optimizer.optimize_model(str(task.model), model_type="bert").model


def _float16(task: Task, folder: Path) -> onnx.ModelProto | None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(task.model)))
    model.convert_float_to_float16(keep_io_types=True)
    return model.model


def _label(task: Task, folder: Path) -> onnx.ModelProto | None:
    if task.name not in CLASSIFIERS:
        return None
    model = onnx.load(str(task.model))
    scores = model.graph.output[0].name
    model.graph.node.append(helper.make_node("ArgMax", [scores], ["label"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    return model


VARIANTS: dict[str, Callable[[Task, Path], onnx.ModelProto | None]] = {
    "source": lambda task, folder: onnx.load(str(task.model)),
    "ORT extended": _saved_by_onnx_runtime,
    "transformer optimizer": _transformer_optimizer,
    "float16": _float16,
    "label": _label,
}


def measure(task: Task, folder: Path) -> list[str]:
    """One table row per variant of `task`."""
    from qdq.pipeline import quantize_model

    calib = folder / "calib.npz"
    np.savez(calib, **{task.input_name: task.calib})
    source = run_model(task.model, task.input_name, task.evaluate)
    rows = []
    for name, make in VARIANTS.items():
        model = make(task, folder)
        if model is None:
            continue
        path, out = folder / f"{name}.onnx", folder / f"{name}_int8.onnx"
        onnx.save(model, str(path))
        ops = Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")
        report = quantize_model(path, out, calib)
        quantized = sum(d.quantized for d in report.decisions)
        got = run_model(out, task.input_name, task.evaluate).astype(np.float32)
        if got.ndim == 1:  # a label: against FP32's top class
            metric = float((got == source.argmax(axis=-1)).mean())
        else:
            metric = quality(task, source, got)["metric"]
        x = task.evaluate[:1]
        float_ms, int8_ms, source_ms = medians([path, out, task.model], x, 40)
        fused = ", ".join(f"{count} {op}" for op, count in ops.most_common(3)) or "-"
        rows.append(
            f"| {task.name} | {name} | {fused} | {quantized} of {len(report.decisions)} | "
            f"{metric:.4f} | {int8_ms:.2f} | {float_ms:.2f} | {source_ms:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "efficientnet_lite0", "minilm"])
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    print("| model | variant | its com.microsoft ops | nodes int8 | metric | INT8 ms | "
          "its FP32 ms | source FP32 ms |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for task in tasks(args.samples):
        if task.name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                measure(task, Path(tmp))


if __name__ == "__main__":
    main()
