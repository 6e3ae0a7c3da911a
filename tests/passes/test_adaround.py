"""AdaRound: learned rounding beats nearest rounding where weight error dominates (4 bits)."""

from __future__ import annotations

import sys

import pytest

from qdq.config import QuantConfig
from qdq.errors import SchemeError
from qdq.pipeline import quantize_model

from conftest import DIGITS, digits_cnn_sqnr, quantize_cnn


@pytest.mark.slow
def test_adaround_raises_4_bit_digits_cnn_sqnr(tmp_path, cnn_4bit_sqnr):
    pytest.importorskip("torch")
    learned, _ = quantize_cnn(tmp_path, weight_bits=4, adaround=True)
    assert digits_cnn_sqnr(learned) > cnn_4bit_sqnr + 2.0  # measured: 18.5 -> 22.4 dB


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
