"""Random crops of scikit-image's bundled photographs, preprocessed for ImageNet models (the
EfficientNet-Lite0 task, NudeNet in bench/unseen.py, the backgrounds of faces.py's scenes).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
    "immunohistochemistry", "camera", "coins", "moon", "page", "text", "brick", "grass", "gravel",
    "horse", "clock", "cell", "logo", "colorwheel",
)  # fmt: skip
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


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
