"""Shared hypothesis settings and strategies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from qdq.config import preset_config
from qdq.pipeline import QuantizeReport, quantize_model
from qdq.plan.saturation import kernels_saturate

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `exact_int8` pin ONNX Runtime's int8 kernels computing the QDQ arithmetic of
    weights that PTQ did not make pair-safe (hand-made codes, QAT exports, plans timed on the
    kernels): skipped where the kernels saturate, with the reason. Everything PTQ writes there
    avoids it (`qdq.plan.saturation`), so the rest of the int8 tests run on every CPU."""
    marked = [item for item in items if item.get_closest_marker("exact_int8")]
    if marked and kernels_saturate():
        reason = (
            "ONNX Runtime's u8s8 int8 kernels saturate on this CPU (x86 without VNNI): weights "
            "not made pair-safe do not run their QDQ arithmetic here (docs/ptq.md, Known limits)"
        )
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True, scope="session")
def latency_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """--prefer's measured latencies go to a folder of the test session, not the user's cache."""
    os.environ.setdefault("QDQ_CACHE_DIR", str(tmp_path_factory.mktemp("qdq-cache")))


def float_arrays(min_size: int = 1, max_size: int = 200, bound: float = 1e4) -> st.SearchStrategy:
    """1-D float32 arrays of finite values, as calibration batches."""
    element = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32)
    return st.lists(element, min_size=min_size, max_size=max_size).map(
        lambda v: np.asarray(v, dtype=np.float32)
    )


DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def digits_cnn_sqnr(path: Path) -> float:
    """Output SQNR (dB) of a quantized digits CNN against the FP32 one on the 540 test images."""
    x = np.load(DIGITS / "test.npz")["input"]
    want = ort.InferenceSession(str(DIGITS / "cnn.onnx")).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2)))


def quantize_cnn(folder: Path, **options: object) -> tuple[Path, QuantizeReport]:
    """The digits CNN quantized on its calibration set, `options` as `preset_config` takes them."""
    out = folder / "cnn_int8.onnx"
    report = quantize_model(
        DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", preset_config("default", **options)
    )
    return out, report


@pytest.fixture(scope="session")
def cnn_4bit_sqnr(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Output SQNR of the digits CNN with plain 4-bit weights (nearest rounding) and one-shot
    bias correction (18.5 dB), every layer int8: what 4-bit tools beat."""
    folder = tmp_path_factory.mktemp("cnn4")
    plain = quantize_cnn(
        folder, weight_bits=4, sequential_bias_correction=False, prefer="speed", gptq=False
    )
    return digits_cnn_sqnr(plain[0])
