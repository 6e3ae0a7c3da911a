"""A tour of the core on real data: every observer calibrates the same image batches.

The bundled data are scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), standardized
so that they are signed, as a first layer's input is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qdq.affine import fake_quantize
from qdq.errors import DataError
from qdq.observers import METHODS, make_observer
from qdq.qparams import choose_qparams
from qdq.scheme import QScheme

BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "digits" / "digits.npz"


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|x|^2 / |x - y|^2), in dB."""
    noise = np.sum((reference.astype(np.float64) - approximation) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


def load_images(path: str | None) -> np.ndarray:
    source = Path(path) if path else BUNDLED
    if not source.is_file():
        raise DataError(f"{source} does not exist; pass --data FILE.npz with an 'images' array")
    with np.load(source, allow_pickle=False) as data:
        if "images" not in data:
            raise DataError(f"{source} has no 'images' array (it has {', '.join(data.files)})")
        return data["images"].astype(np.float32)


def run_demo(path: str | None = None) -> str:
    """Calibrate each method on 18 batches, then report range and SQNR at 8 and 4 bits."""
    images = load_images(path)
    x = (images - images.mean()) / images.std()
    lines = [f"{x.shape[0]} images, {x.size} values in [{x.min():.2f}, {x.max():.2f}]"]
    lines.append(f"{'method':<12}{'bits':>5}{'range':>22}{'SQNR dB':>10}")
    for bits in (8, 4):
        scheme = QScheme(bits=bits)
        for method in METHODS:
            observer = make_observer(method, bits=bits)
            for batch in np.array_split(x, 18):
                observer.update(batch)
            rng = observer.compute()
            quality = sqnr_db(x, fake_quantize(x, choose_qparams(rng, scheme)))
            span = f"[{float(rng.lo):.2f}, {float(rng.hi):.2f}]"
            lines.append(f"{method:<12}{bits:>5}{span:>22}{quality:>10.2f}")
    return "\n".join(lines)
