"""The compiled kernels (Numba) against the NumPy reference on whole real models, the kernel
choice, and bit-exactness with ONNX Runtime on PP-OCR's text-direction classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import qdq.engine.product_kernels as product_kernels
from qdq.config import QuantConfig
from qdq.engine import Engine, jit
from qdq.engine.diff import diff_model
from qdq.errors import ModelError
from qdq.pipeline import quantize_model

from conftest import DIGITS

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compiled")
    paths = {}
    for name in ("cnn", "mobilenet"):
        paths[name] = folder / f"{name}.onnx"
        config = QuantConfig(prefer="int8")  # every conv int8: the compiled kernels' work
        quantize_model(DIGITS / f"{name}.onnx", paths[name], DIGITS / "calib.npz", config)
    return paths


def _same_tensors(
    path: Path, feeds: dict[str, np.ndarray], requant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = Engine(path, requant, kernels="numpy").trace(feeds)
    calls = []
    accumulate = product_kernels.conv_accumulator
    monkeypatch.setattr(
        product_kernels, "conv_accumulator", lambda *a, **k: calls.append(1) or accumulate(*a, **k)
    )
    fast = Engine(path, requant, kernels="compiled").trace(feeds)
    assert calls  # the compiled convolution ran, not a fallback to NumPy
    assert fast.keys() == reference.keys()
    for name, want in reference.items():
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(fast[name], want, err_msg=name)


@pytest.mark.parametrize("name", ["cnn", "mobilenet"])
@pytest.mark.parametrize("requant", ["float", "fixed", "spec"])
def test_compiled_kernels_give_the_numpy_references_tensors(digits, name, requant, monkeypatch):
    x = np.load(DIGITS / "test.npz")["input"][:64]
    _same_tensors(digits[name], {"input": x}, requant, monkeypatch)


def test_runs_reuse_their_arrays_but_hand_out_their_own_outputs(digits):
    """`run` writes each run into the arrays of the last: what it returns is a copy."""
    x = np.load(DIGITS / "test.npz")["input"]
    engine = Engine(digits["mobilenet"], "float")
    first = engine.run({"input": x[:8]})
    second = engine.run({"input": x[8:16]})
    for batch, got in ((x[:8], first), (x[8:16], second)):
        want = Engine(digits["mobilenet"], "float").trace({"input": batch})
        for name, value in got.items():
            np.testing.assert_array_equal(value, want[name])
    assert engine._buffers  # the compiled kernels wrote into kept arrays


def test_the_kernel_choice_is_visible_and_checked(digits):
    assert Engine(digits["cnn"]).kernels == ("compiled" if jit.available() else "numpy")
    assert Engine(digits["cnn"], kernels="numpy").kernels == "numpy"
    with pytest.raises(ModelError, match="kernels"):
        Engine(digits["cnn"], kernels="fast")


def _text_lines(count: int, seed: int) -> np.ndarray:
    """`count` RapidOCR-preprocessed lines of printed words (3, 48, 192), some upside down."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = ["engine", "integer", "runtime", "quantized", "exact", "kernel", "model", "scale"]
    lines = []
    for _ in range(count):
        image = Image.new("RGB", (192, 48), (int(rng.integers(170, 256)),) * 3)
        font = ImageFont.load_default(size=int(rng.integers(22, 30)))
        text = " ".join(rng.choice(words, 2))
        ImageDraw.Draw(image).text((6, 24), text, fill=(20, 20, 20), font=font, anchor="lm")
        if rng.integers(0, 2):
            image = image.rotate(180)
        pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255
        lines.append((pixels - 0.5) / 0.5)
    return np.stack(lines).astype(np.float32)


@pytest.mark.slow
@pytest.mark.exact_int8
def test_ppocr_classifier_kernels_are_bit_exact_with_onnx_runtime(tmp_path):
    """Every kernel, fed ONNX Runtime's inputs, gives ONNX Runtime's codes (QLinearMul among
    them: its zero point is added in float32 before the rounding); run whole, every tensor is
    ONNX Runtime's."""
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    model = Path(rapidocr.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_text_lines(16, 1))
    path = tmp_path / "cls_int8.onnx"
    quantize_model(model, path, calib, QuantConfig(prefer="int8"))  # every conv int8
    feeds = {"x": _text_lines(4, 2)}
    np.savez(tmp_path / "data.npz", **feeds)
    fed = diff_model(path, tmp_path / "data.npz", inputs_from="ort")
    assert len(fed.nodes) > 100
    assert [n.node for n in fed.nodes if n.differing] == []
    whole = diff_model(path, tmp_path / "data.npz")
    assert [n.node for n in whole.nodes if n.differing] == []


@pytest.mark.slow
def test_both_paths_agree_on_every_tensor_of_the_ppocr_classifier(tmp_path, monkeypatch):
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    model = Path(rapidocr.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    np.savez(tmp_path / "calib.npz", x=_text_lines(16, 1))
    path = tmp_path / "cls_int8.onnx"
    quantize_model(model, path, tmp_path / "calib.npz", QuantConfig(prefer="int8"))
    _same_tensors(path, {"x": _text_lines(4, 2)}, "float", monkeypatch)
