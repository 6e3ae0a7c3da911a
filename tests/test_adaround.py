"""AdaRound: learned rounding beats nearest rounding where weight error dominates (4 bits)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from qdq.errors import SchemeError
from qdq.graph.config import QuantConfig
from qdq.pipeline import quantize_model

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def output_sqnr(path: Path) -> float:
    x = np.load(DIGITS / "test.npz")["input"]
    want = ort.InferenceSession(str(DIGITS / "cnn.onnx")).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2)))


def test_adaround_raises_4_bit_output_sqnr(tmp_path):
    pytest.importorskip("torch")
    nearest, learned = tmp_path / "nearest.onnx", tmp_path / "learned.onnx"
    quantize_model(DIGITS / "cnn.onnx", nearest, DIGITS / "calib.npz", QuantConfig(weight_bits=4))
    quantize_model(
        DIGITS / "cnn.onnx",
        learned,
        DIGITS / "calib.npz",
        QuantConfig(weight_bits=4, adaround=True),
    )
    assert output_sqnr(learned) > output_sqnr(nearest) + 2.0  # measured: 18.5 -> 22.4 dB


def test_adaround_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(SchemeError, match=r"qdq\[torch\]"):
        quantize_model(
            DIGITS / "cnn.onnx",
            tmp_path / "q.onnx",
            DIGITS / "calib.npz",
            QuantConfig(adaround=True),
        )
    assert not (tmp_path / "q.onnx").exists()
