"""Text rendered with Pillow's bundled font, for the OCR models: lines of WORDS, upright or
turned 180 degrees, preprocessed as RapidOCR preprocesses crops (the labels are the rotation),
pages of such lines scattered on tinted paper, for the text detector, and tables of them, for
the table-structure recognizer.
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


def table_images(count: int, size: int, seed: int) -> np.ndarray:
    """`count` tables (3, size, size) of 2-8 rows and 2-5 columns of WORDS, ruled (70%) or with
    only the header and closing rules, with scanner noise, scaled (by Pillow) so the longer
    side is `size`, in BGR order normalized with ImageNet's RGB mean and std, then padded with
    zeros at the bottom right: RapidTable's preprocessing (it loads pages as BGR, scales the
    longest side to 488 by OpenCV, normalizes, then pads to 488 x 488)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 3, size, size), np.float32)
    for i in range(count):
        rows, columns = int(rng.integers(2, 9)), int(rng.integers(2, 6))
        font_size = int(rng.integers(12, 22))
        font = ImageFont.load_default(size=font_size)
        widths = rng.integers(60, 140, columns)
        height = font_size + int(rng.integers(8, 20))
        image = Image.new("RGB", (int(widths.sum()) + 20, rows * height + 20),
                          tuple(int(v) for v in rng.integers(215, 256, 3)))  # fmt: skip
        draw = ImageDraw.Draw(image)
        ink = tuple(int(v) for v in rng.integers(0, 80, 3))
        ruled = rng.random() < 0.7
        right, lefts = 10 + int(widths.sum()), 10 + np.concatenate([[0], np.cumsum(widths)])
        for row in range(rows + 1):
            if ruled or row in (0, 1, rows):
                draw.line([(10, 10 + row * height), (right, 10 + row * height)], fill=ink)
        for left in lefts if ruled else ():
            draw.line([(int(left), 10), (int(left), 10 + rows * height)], fill=ink)
        for row in range(rows):
            for left in lefts[:-1]:
                if rng.random() < 0.9:  # a few empty cells
                    words = " ".join(rng.choice(WORDS, int(rng.integers(1, 3))))
                    draw.text((int(left) + 4, 14 + row * height), words, fill=ink, font=font)
        scale = size / max(image.size)  # sizes truncated, as RapidTable's
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        pixels = np.asarray(image, np.float32) + rng.normal(0, 4, (image.height, image.width, 3))
        normalized = (pixels.clip(0, 255)[..., ::-1] / 255 - IMAGENET_MEAN) / IMAGENET_STD
        out[i, :, : image.height, : image.width] = normalized.transpose(2, 0, 1)
    return out
