"""qdq against ONNX Runtime's quantize_static on real models, side by side in one run.

Run: python bench/ptq.py [--models cnn mobilenet ...] [--samples 256] [--rss] [--out bench/out]
Needs the `bench` extra (RapidOCR's models, matplotlib). Prints a Markdown table and writes it,
with a plot, under --out. No asserts: numbers for docs/ptq.md.

For each model: task metric (digits accuracy, text-direction accuracy, CTC decode agreement,
top-1 agreement with FP32 for EfficientNet-Lite0 on unlabelled photographs, text-mask IoU
with FP32 for the PP-OCRv4 detector, nearest-neighbour agreement with FP32 for MiniLM's
sentence embeddings),
output SQNR against FP32, file size, INT8/FP32 latency in ONNX Runtime (1 thread, interleaved
runs, median), quantization time and peak RSS (each quantization runs in a fresh process, capped
at 12 GB); with --rss, time and peak RSS at 32, 128 and 512 samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from datasets import Task, tasks

ORT_CONFIGS = [
    (method, per_channel)
    for method in ("MinMax", "Entropy", "Percentile")
    for per_channel in (False, True)
]


def run_model(path: Path, name: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def ctc_strings(scores: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding: argmax per step, repeats merged, blanks (0) dropped."""
    out = []
    for best in scores.argmax(axis=-1):
        merged = [int(c) for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1])]
        out.append(tuple(merged))
    return out


def trimmed(codes: tuple[int, ...], space: int) -> tuple[int, ...]:
    """A decoded line without the spaces at its ends (PP-OCR's `space` class): FP32 emits
    them at near-ties in the blank margins of a crop, and the line's text is the same without
    them."""
    start, stop = 0, len(codes)
    while start < stop and codes[start] == space:
        start += 1
    while stop > start and codes[stop - 1] == space:
        stop -= 1
    return codes[start:stop]


def nearest(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def quality(task: Task, reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    noise = np.sum((reference.astype(np.float64) - output) ** 2)
    result = {"sqnr_db": float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))}
    if task.metric == "accuracy":
        result["metric"] = float((output.argmax(axis=-1) == task.labels).mean())
        # Labels let a noisier model win a borderline sample by chance; agreement with FP32's
        # class is what quantization alone decides.
        result["agreement"] = float((output.argmax(axis=-1) == reference.argmax(axis=-1)).mean())
    elif task.metric == "top1":  # agreement with FP32's top class
        result["metric"] = float((output.argmax(axis=-1) == reference.argmax(axis=-1)).mean())
    elif task.metric == "iou":  # the text mask a detector's threshold would cut
        mask, got = reference > 0.3, output > 0.3
        result["metric"] = float((mask & got).sum() / max((mask | got).sum(), 1))
    elif task.metric == "neighbour":  # semantic search: each sentence's nearest other sentence
        result["metric"] = float((nearest(output) == nearest(reference)).mean())
    else:  # agreement of decoded text with FP32's
        pairs = list(zip(ctc_strings(reference), ctc_strings(output), strict=True))
        result["metric"] = float(np.mean([a == b for a, b in pairs]))
        # the same, spaces at a line's ends aside (PP-OCR's last class is the space)
        space = reference.shape[-1] - 1
        result["text"] = float(np.mean([trimmed(a, space) == trimmed(b, space) for a, b in pairs]))
    return result


def latency_ratio(fp32: Path, int8: Path, x: np.ndarray, runs: int = 40) -> tuple[float, float]:
    f, q = medians([fp32, int8], x, runs)
    return f, q


def medians(paths: list[Path], x: np.ndarray, runs: int) -> list[float]:
    """Median ms per run of each model, 1 thread, runs interleaved so drift hits all alike, in
    an order rotated every round so that no model always runs after the same one. (The order the
    sessions are created in still matters, by 1.5-3%: head_to_head.py times both orders.)"""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths
    ]
    name = sessions[0].get_inputs()[0].name
    times: list[list[float]] = [[] for _ in paths]
    for s in sessions:
        s.run(None, {name: x})
    for r in range(runs):
        for i in np.roll(np.arange(len(sessions)), -r):
            start = time.perf_counter()
            sessions[i].run(None, {name: x})
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def save_samples(samples: np.ndarray, folder: Path) -> Path:
    """One .npy per sample, so that both tools can read them lazily (peak RSS stays theirs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        np.save(folder / f"{i:05d}.npy", sample)
    return folder


def quantize_qdq(task: Task, out: Path, data: Path) -> None:
    from qdq.pipeline import quantize_model

    quantize_model(task.model, out, data)


def quantize_ort(task: Task, out: Path, data: Path, method: str, per_channel: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    files = sorted(data.glob("*.npy"))

    class Reader(CalibrationDataReader):
        """Reads 16 files per batch, as qdq does: neither tool holds the data set."""

        def __init__(self) -> None:
            self.batches = (files[i : i + 16] for i in range(0, len(files), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            return {task.input_name: np.stack([np.load(f) for f in batch])}

    quantize_static_qdq(task.model, out, Reader(), method, per_channel)


def quantize_static_qdq(
    source: Path,
    out: Path,
    reader: object,
    method: str,
    per_channel: bool,
    op_types: list[str] | None = None,
    extra_options: dict | None = None,
) -> None:
    """ORT's recommended `quant_pre_process`, then `quantize_static` in QDQ format with uint8
    activations and int8 weights, calibrated by `method` (a `CalibrationMethod` name) on
    `reader`'s batches; `op_types` is its `op_types_to_quantize`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Its symbolic shape inference fails on some models and then leaves
        # sym_shape_infer_temp.onnx in the working directory: keep that in tmp.
        with contextlib.chdir(tmp):
            try:
                quant_pre_process(str(source), str(pre))
            except Exception:
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
            op_types_to_quantize=op_types,
            extra_options=extra_options,
        )


TOOLS = ["qdq default"] + [f"ORT {m}{' per-ch' if pc else ''}" for m, pc in ORT_CONFIGS]
MEMORY_CAP = 12 * 2**30  # a child over this fails with MemoryError instead of taking the machine


def quantize_in_child(tool: str, task: Task, data: Path, out: Path) -> dict[str, object]:
    """Quantize in a fresh process (so peak RSS is this run's alone); returns its numbers."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", tool, task.name, str(data), str(out)],
        capture_output=True,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        error = (done.stderr.strip().splitlines() or ["killed"])[-1]
        if "Failed to allocate memory" in error or "MemoryError" in error:
            error = f"out of memory at the {MEMORY_CAP >> 30} GB cap"
        return {"error": error}
    return json.loads(lines[-1])


def quantize_with(tool: str, task: Task, data: Path, out: Path) -> None:
    """Quantize `task`'s model with one of TOOLS."""
    if tool == "qdq default":
        quantize_qdq(task, out, data)
    else:
        method, per_channel = dict(zip(TOOLS[1:], ORT_CONFIGS, strict=True))[tool]
        quantize_ort(task, out, data, method, per_channel)


def child(tool: str, task_name: str, data: Path, out: Path) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    task = next(t for t in tasks(0) if t.name == task_name)
    start = time.perf_counter()
    quantize_with(tool, task, data, out)
    seconds = time.perf_counter() - start
    print(json.dumps({"quantize_s": seconds, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage: on Linux its ru_maxrss carries
    the parent's peak across fork and exec, which hid every child's own number."""
    status = Path("/proc/self/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def compare(task: Task, samples: int, folder: Path) -> list[dict[str, object]]:
    reference = run_model(task.model, task.input_name, task.evaluate)
    x_latency = task.evaluate[: task.latency_batch]
    fp32 = quality(task, reference, reference) | {"sqnr_db": float("inf")}
    rows = [{"model": task.name, "tool": "FP32", **fp32, "kB": task.model.stat().st_size / 1e3}]
    data = save_samples(task.calib[:samples], folder / f"{task.name}_calib")
    for tool in TOOLS:
        out = folder / f"{task.name}_{tool.replace(' ', '_')}.onnx"
        row: dict[str, object] = {"model": task.name, "tool": tool}
        row |= quantize_in_child(tool, task, data, out)
        if "error" not in row:
            try:
                output = run_model(out, task.input_name, task.evaluate)
                f_ms, q_ms = latency_ratio(task.model, out, x_latency)
                row |= quality(task, reference, output) | {
                    "kB": out.stat().st_size / 1e3,
                    "latency_fp32_ms": f_ms,
                    "latency_int8_ms": q_ms,
                    "speedup": f_ms / q_ms,
                }
            except Exception as error:
                row["error"] = str(error).splitlines()[0]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def rss_scaling(task_names: list[str], folder: Path) -> list[dict[str, object]]:
    """Calibration time and peak RSS at 32, 128 and 512 samples, qdq and ORT's MinMax."""
    rows = []
    for name in task_names:
        task = next(t for t in tasks(512) if t.name == name)
        for samples in (32, 128, 512):
            data = save_samples(task.calib[:samples], folder / f"{name}_{samples}")
            for tool in ("qdq default", "ORT MinMax per-ch"):
                result = quantize_in_child(tool, task, data, folder / "rss.onnx")
                rows.append({"model": name, "tool": tool, "samples": samples, **result})
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, object]], rss: list[dict[str, object]]) -> str:
    lines = [
        "| model | tool | metric | top-1 = FP32's | SQNR dB | kB | INT8/FP32 latency | "
        "quantize s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | fails: {r['error'][:90]} | | | | | |")
            continue
        speed = f"{1 / r['speedup']:.2f} ({r['latency_int8_ms']:.2f} ms)" if "speedup" in r else ""
        seconds = f"{r['quantize_s']:.1f}" if "quantize_s" in r else ""
        memory = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        agreement = f"{r['agreement']:.4f}" if "agreement" in r else ""
        lines.append(
            f"| {r['model']} | {r['tool']} | {r['metric']:.4f} | {agreement} | "
            f"{r['sqnr_db']:.2f} | {r['kB']:.0f} | {speed} | {seconds} | {memory} |"
        )
    if rss:
        lines += [
            "",
            "| model | tool | samples | quantize s | peak RSS MB |",
            "|---|---|---|---|---|",
        ]
        for r in rss:
            if "error" in r:
                lines.append(
                    f"| {r['model']} | {r['tool']} | {r['samples']} | fails: {r['error'][:60]} | |"
                )
            else:
                lines.append(
                    f"| {r['model']} | {r['tool']} | {r['samples']} | "
                    f"{r['quantize_s']:.2f} | {r['peak_rss_mb']:.0f} |"
                )
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "sqnr_db" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    tools = [t for t in dict.fromkeys(r["tool"] for r in rows) if t != "FP32"]
    if not tools:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        values = [
            next((r.get("sqnr_db", 0) for r in rows if r["model"] == m and r["tool"] == tool), 0)
            for m in models
        ]
        ax.bar(np.arange(len(models)) + i * width, values, width, label=tool)
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models)
    ax.set_ylabel("output SQNR vs FP32 (dB)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rss", action="store_true", help="also measure 32/128/512 samples")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, name, data, out = args.child
        child(tool, name, Path(data), Path(out))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [t for t in tasks(args.samples) if not args.models or t.name in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in chosen:
            rows += compare(task, args.samples, Path(tmp))
        rss = rss_scaling([t.name for t in chosen], Path(tmp)) if args.rss else []
    table = markdown(rows, rss)
    (args.out / "ptq.md").write_text(table + "\n")
    (args.out / "ptq.json").write_text(json.dumps({"rows": rows, "rss": rss}, indent=1))
    plot(rows, args.out / "ptq.png")
    print(table)


if __name__ == "__main__":
    main()
