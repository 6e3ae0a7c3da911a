"""`--method best` (the default) against `--method percentile` and `--method minmax`, the same
pipeline otherwise, for docs/ptq.md ("Outputs judged as tasks").

Run: pip install -e '.[bench,unseen]' && python bench/method_choice.py
     [--models nudenet ppocr_det cnn mobilenet transformer] [--methods best percentile minmax]
NudeNet's YOLOv8n: 128 calibration photos of draws 1, 3 and 4 of bench/unseen.py (seeds 1, 3, 4),
F1 of FP32's detections (`qdq.plan.parts`) on its 64 evaluation photos (seed 2), and the class
scores' SQNR. Bench tasks (bench/ptq.py): 256 calibration samples, the task metric and output
SQNR on the held-out set. Prints one JSON line per run with the method `best` chose (from the
quantize report's note). No asserts: numbers for docs/ptq.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import ptq
import unseen
import unseen_models
from datasets import tasks
from qdq.config import QuantConfig
from qdq.pipeline import quantize_model
from qdq.plan.part_stats import judged
from qdq.plan.parts import output_parts

DRAWS = (1, 3, 4)  # bench/unseen.py's calibration seeds (2 is the evaluation set)


def quantize(source: Path, data: Path, out: Path, method: str) -> str:
    """Quantize with `method`; returns the method whose ranges the model got."""
    report = quantize_model(source, out, data, QuantConfig(method=method))
    note = next((n for n in report.notes if n.startswith("range method ")), None)
    return note.split()[2].rstrip(":") if note else method


def nudenet(methods: list[str], folder: Path) -> None:
    model = unseen_models.MODELS["nudenet"]
    source = unseen_models.locate(model)
    evaluate, _ = model.data(model.evaluate, 2)
    reference = unseen.run(model, source, evaluate)
    session = ort.InferenceSession(str(source), providers=unseen_models.CPU)
    parts = output_parts([o.name for o in session.get_outputs()], [reference])
    for method in methods:
        for draw in DRAWS:
            calib, _ = model.data(model.calibrate, draw)
            np.save(folder / "calib.npy", calib)
            chosen = quantize(source, folder / "calib.npy", folder / "q.onnx", method)
            got = unseen.run(model, folder / "q.onnx", evaluate)
            scores = next(s for s in judged(parts, [reference], [got]) if s.detections)
            row = {"model": "nudenet", "draw": draw, "method": method, "chosen": chosen,
                   "f1": scores.detections.f1, "scores_sqnr": scores.error.sqnr_db}  # fmt: skip
            print(json.dumps(row), flush=True)


def bench(names: list[str], methods: list[str], folder: Path) -> None:
    for task in (t for t in tasks(256) if t.name in names):
        data = ptq.save_samples(task.calib, folder / f"{task.name}_calib")
        reference = ptq.run_model(task.model, task.input_name, task.evaluate)
        for method in methods:
            out = folder / f"{task.name}_{method}.onnx"
            chosen = quantize(task.model, data, out, method)
            quality = ptq.quality(
                task, reference, ptq.run_model(out, task.input_name, task.evaluate)
            )
            print(json.dumps({"model": task.name, "method": method, "chosen": chosen, **quality}),
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["nudenet", "ppocr_det", "cnn", "mobilenet", "transformer"]
    )
    parser.add_argument("--methods", nargs="+", default=["best", "percentile", "minmax"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if "nudenet" in args.models:
            nudenet(args.methods, Path(tmp))
        bench([m for m in args.models if m != "nudenet"], args.methods, Path(tmp))


if __name__ == "__main__":
    main()
