"""Slider captchas made from scikit-image's bundled photographs, as captcha-recognizer's YOLOv8
segmenter reads them (bench/unseen.py's "slider"): a 320 x 160 background with a puzzle-piece
gap, darkened and outlined, and the piece itself at the left edge, letterboxed to 640 x 640.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from photos import PHOTOS

WIDTH, HEIGHT, SIZE = 320, 160, 640  # the captcha, and the model's square input
LETTERBOX = 114 / 255  # the grey captcha-recognizer pads with


def slider_captchas(count: int, seed: int) -> np.ndarray:
    """`count` captchas (N, 3, 640, 640), RGB in [0, 1], each a random crop of a photograph
    with one gap (a square of 38-55 pixels with two round knobs, darkened to 30-60% with a light
    outline, in the right two thirds) and the same piece, outlined, at the left edge."""
    import skimage.data

    rng = np.random.default_rng(seed)
    out = np.full((count, 3, SIZE, SIZE), LETTERBOX, np.float32)
    top = (SIZE - HEIGHT * SIZE // WIDTH) // 2
    for i in range(count):
        pixels = getattr(skimage.data, PHOTOS[rng.integers(len(PHOTOS))])()
        pixels = pixels * np.uint8(255) if pixels.dtype == bool else pixels
        photo = Image.fromarray(pixels[..., :3] if pixels.ndim == 3 else pixels).convert("RGB")
        wide = int(min(photo.width, 2 * photo.height) * rng.uniform(0.5, 1.0))
        left = int(rng.integers(0, photo.width - wide + 1))
        upper = int(rng.integers(0, photo.height - wide // 2 + 1))
        crop = photo.crop((left, upper, left + wide, upper + wide // 2)).resize((WIDTH, HEIGHT))
        image = np.asarray(crop, np.float32) / 255
        side = int(rng.integers(38, 56))
        y = int(rng.integers(12, HEIGHT - side - 4))
        x = int(rng.integers(WIDTH // 3, WIDTH - side - 14))
        piece = _piece(side)
        h, w = piece.shape
        patch = image[y - h + side : y + side, x : x + w].copy()
        shown = image.copy()
        region = shown[y - h + side : y + side, x : x + w]
        region[piece] *= rng.uniform(0.3, 0.6)
        _outline(region, piece, 0.15)
        at = int(rng.integers(2, 10))  # the movable piece, at the left edge
        moved = shown[y - h + side : y + side, at : at + w]
        moved[piece] = patch[piece]
        _outline(moved, piece, 0.35)
        scaled = Image.fromarray((shown * 255).astype(np.uint8)).resize(
            (SIZE, HEIGHT * SIZE // WIDTH)
        )
        out[i, :, top : top + scaled.height] = (
            np.asarray(scaled, np.float32).transpose(2, 0, 1) / 255
        )
    return out


def _piece(side: int) -> np.ndarray:
    """A puzzle piece's mask: a `side`-pixel square with round knobs on its top and right."""
    knob = side // 5
    h, w = side + knob, side + knob
    yy, xx = np.mgrid[:h, :w]
    body = (yy >= knob) & (xx < side)
    top = (yy - knob) ** 2 + (xx - side / 2) ** 2 < knob**2
    right = (yy - knob - side / 2) ** 2 + (xx - side) ** 2 < knob**2
    return body | top | right


def _outline(region: np.ndarray, mask: np.ndarray, light: float) -> None:
    """Lighten the two-pixel border of `mask` inside `region` toward white by `light`."""
    inner = mask.copy()
    for shift, axis in ((2, 0), (-2, 0), (2, 1), (-2, 1)):
        inner &= np.roll(mask, shift, axis)
    edge = mask & ~inner
    region[edge] = (1 - light) * region[edge] + light
