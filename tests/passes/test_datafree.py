"""--data-free: a working INT8 model from BatchNorm statistics, with no calibration data."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from qdq.config import QuantConfig
from qdq.errors import DataError, ModelError, SchemeError
from qdq.passes.datafree import Moments, _relu
from qdq.pipeline import quantize_model

from conftest import DIGITS


def accuracy(path) -> float:
    with np.load(DIGITS / "test.npz") as test:
        logits = ort.InferenceSession(str(path)).run(None, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())


@pytest.mark.slow
def test_data_free_int8_keeps_the_accuracy(tmp_path):
    out = tmp_path / "q.onnx"
    config = QuantConfig(data_free=True, input_range=(0.0, 1.0))
    report = quantize_model(DIGITS / "mobilenet_bn.onnx", out, None, config)
    assert report.samples == 0
    assert not report.kept_float
    assert accuracy(out) >= accuracy(DIGITS / "mobilenet_bn.onnx") - 0.01  # measured: 98.33%


def test_clipped_normal_moments_golden():
    # ReLU of N(0, 1): mean = 1/sqrt(2 pi) = 0.3989, variance = 1/2 - 1/(2 pi) = 0.3408
    relu = _relu(Moments(np.array([0.0]), np.array([1.0])))
    assert relu.mean[0] == pytest.approx(0.39894, abs=1e-4)
    assert relu.std[0] ** 2 == pytest.approx(0.5 - 1 / (2 * np.pi), abs=1e-4)
    assert relu.low == 0.0


def test_data_free_refuses_models_without_batchnorm_and_extra_data(tmp_path):
    with pytest.raises(ModelError, match="BatchNormalization"):
        quantize_model(DIGITS / "cnn.onnx", tmp_path / "q.onnx", None, QuantConfig(data_free=True))
    with pytest.raises(DataError, match="drop `calibration`"):
        quantize_model(
            DIGITS / "mobilenet_bn.onnx",
            tmp_path / "q.onnx",
            DIGITS / "calib.npz",
            QuantConfig(data_free=True),
        )
    with pytest.raises(DataError, match="give `calibration`"):
        quantize_model(DIGITS / "cnn.onnx", tmp_path / "q.onnx", None, QuantConfig())
    with pytest.raises(SchemeError, match="need calibration data"):
        QuantConfig(data_free=True, adaround=True)
