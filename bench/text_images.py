"""Text rendered with Pillow's bundled font, for the OCR models: lines of WORDS, upright or
turned 180 degrees, preprocessed as RapidOCR preprocesses crops (the labels are the rotation),
and pages of such lines scattered on tinted paper, for the text detector.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from photos import IMAGENET_MEAN, IMAGENET_STD

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
