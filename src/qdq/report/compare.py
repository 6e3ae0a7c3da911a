"""`qdq compare`: how far a quantized model's outputs and layers are from the float model's."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qdq.data import Samples, model_inputs
from qdq.metrics import ErrorStats
from qdq.onnx.model import load_model
from qdq.passes.insert_qdq import METADATA_KEY
from qdq.plan.calibrate import session_with_outputs


@dataclass
class Comparison:
    """Per output and per quantized tensor error; accuracies when labels are given."""

    outputs: dict[str, ErrorStats]
    layers: dict[str, ErrorStats]
    samples: int
    sizes: tuple[int, int]
    latency_ms: tuple[float, float] | None = None
    accuracy: tuple[float, float] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        worst = sorted(self.layers.items(), key=lambda kv: kv[1].sqnr_db)
        out: dict[str, object] = {
            "samples": self.samples,
            "size_bytes": {"float": self.sizes[0], "quantized": self.sizes[1]},
            "outputs": {k: v.as_dict() for k, v in self.outputs.items()},
            "layers": [{"tensor": k, "sqnr_db": v.sqnr_db} for k, v in worst],
        }
        if self.accuracy:
            out["accuracy"] = {"float": self.accuracy[0], "quantized": self.accuracy[1]}
        if self.latency_ms:
            out["latency_ms"] = {"float": self.latency_ms[0], "quantized": self.latency_ms[1]}
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=float)

    def to_text(self, top: int = 15) -> str:
        lines = [f"{self.samples} samples"]
        if self.accuracy:
            f, q = self.accuracy
            lines.append(
                f"accuracy      FP32 {f:.2%}   INT8 {q:.2%}   ({(q - f) * 100:+.2f} points)"
            )
        f_size, q_size = self.sizes
        lines.append(
            f"size          FP32 {f_size / 1e3:.1f} kB   INT8 {q_size / 1e3:.1f} kB   "
            f"({f_size / q_size:.2f}x smaller)"
        )
        if self.latency_ms:
            f, q = self.latency_ms
            lines.append(
                f"latency       FP32 {f:.3f} ms   INT8 {q:.3f} ms   ({f / q:.2f}x speed-up, "
                "1 thread, batch 1, median)"
            )
        for name, stats in self.outputs.items():
            d = stats.as_dict()
            text = f"output {name!r}: SQNR {d['sqnr_db']:.2f} dB, cosine {d['cosine']:.6f}, "
            text += f"max abs error {d['max_abs_error']:.4g}"
            if stats.classes:
                text += f", top-1 {d['top1_agreement']:.2%}, top-5 {d['top5_agreement']:.2%}"
            lines.append(text)
        if self.layers:
            lines.append(
                f"per-layer SQNR, worst first ({min(top, len(self.layers))} of {len(self.layers)}):"
            )
            worst = sorted(self.layers.items(), key=lambda kv: kv[1].sqnr_db)[:top]
            lines.extend(f"  {s.sqnr_db:8.2f} dB  {name}" for name, s in worst)
        return "\n".join(lines)


def quantized_tensor_pairs(
    quantized: onnx.ModelProto, reference: onnx.ModelProto
) -> dict[str, str]:
    """{tensor in the float model: its dequantized copy in the quantized model}."""
    props = {p.key: p.value for p in quantized.metadata_props}
    if METADATA_KEY in props:
        pairs = json.loads(props[METADATA_KEY])
    else:  # a QDQ model from another tool: DequantizeLinear(QuantizeLinear(x)) copies x
        by_input = {n.input[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
        pairs = {
            n.input[0]: by_input[n.output[0]].output[0]
            for n in quantized.graph.node
            if n.op_type == "QuantizeLinear" and n.output[0] in by_input
        }
    names = {o for n in reference.graph.node for o in n.output} | {
        i.name for i in reference.graph.input
    }
    produced = {o for n in quantized.graph.node for o in n.output}
    outputs = {o.name for o in reference.graph.output}
    return {f: q for f, q in pairs.items() if f in names and q in produced and f not in outputs}


def compare_models(
    float_path: str | os.PathLike[str],
    quantized_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    labels: str | None = "label",
    batch_size: int = 32,
    max_samples: int | None = None,
    latency_runs: int = 30,
) -> Comparison:
    """Run both models on the same samples, streaming, and measure the differences."""
    reference, quantized = load_model(float_path), load_model(quantized_path)
    inputs = model_inputs(reference)
    samples = Samples(data, inputs, max_samples)
    pairs = quantized_tensor_pairs(quantized, reference)
    outputs = [o.name for o in reference.graph.output]
    ref_session = session_with_outputs(reference, pairs)
    q_session = session_with_outputs(quantized, pairs.values())
    out_stats = {name: ErrorStats() for name in outputs}
    layer_stats = {name: ErrorStats() for name in pairs}
    predictions: list[tuple[np.ndarray, np.ndarray]] = []
    for feed in samples.batches(batch_size):
        ref = ref_session.run([*outputs, *pairs], feed)
        got = q_session.run([*outputs, *pairs.values()], feed)
        for i, name in enumerate(outputs):
            out_stats[name].update(ref[i], got[i])
        for j, name in enumerate(pairs, start=len(outputs)):
            layer_stats[name].update(ref[j], got[j])
        if out_stats[outputs[0]].classes:
            predictions.append((ref[0].argmax(axis=1), got[0].argmax(axis=1)))
    accuracy = _accuracy(data, labels, predictions, samples)
    first = next(samples.batches(1))
    return Comparison(
        outputs=out_stats,
        layers=layer_stats,
        samples=samples.count,
        sizes=(Path(float_path).stat().st_size, Path(quantized_path).stat().st_size),
        latency_ms=latency_ratio(float_path, quantized_path, first, latency_runs),
        accuracy=accuracy,
    )


def _accuracy(
    data: str | os.PathLike[str],
    key: str | None,
    predictions: list[tuple[np.ndarray, np.ndarray]],
    samples: Samples,
) -> tuple[float, float] | None:
    if not key or Path(data).suffix != ".npz" or not predictions:
        return None
    with np.load(data, allow_pickle=False) as archive:
        if key not in archive.files:
            return None
        truth = archive[key][samples.order]
    ref = np.concatenate([p[0] for p in predictions])
    got = np.concatenate([p[1] for p in predictions])
    return float((ref == truth).mean()), float((got == truth).mean())


def latency_ratio(
    float_path: str | os.PathLike[str],
    quantized_path: str | os.PathLike[str],
    feed: dict[str, np.ndarray],
    runs: int,
) -> tuple[float, float] | None:
    """Median single-threaded latency of each model in ms, runs interleaved."""
    if runs <= 0:
        return None
    first, second = median_latency_ms([str(float_path), str(quantized_path)], feed, runs)
    return first, second


def median_latency_ms(models: list, feed: dict[str, np.ndarray], runs: int) -> list[float]:
    """Median ms per run of each model (a path or serialized bytes), 1 thread, runs
    interleaved so that drift on the machine hits all alike."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sessions = [
        ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]) for m in models
    ]
    times: list[list[float]] = [[] for _ in sessions]
    for session in sessions:  # warm up
        session.run(None, feed)
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]
