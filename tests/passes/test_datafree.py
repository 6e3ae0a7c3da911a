"""--data-free: a working INT8 model from BatchNorm statistics, with no calibration data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.config import QuantConfig
from qdq.errors import DataError, ModelError, SchemeError
from qdq.onnx.graph import GraphIndex
from qdq.passes.datafree import Moments, _clip, _relu, batchnorm_moments, propagate
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


@pytest.mark.parametrize(("low", "high"), [(0.0, 6.0), (-1.0, 1.0), (0.5, 6.0)])
def test_a_clip_gets_the_clipped_normals_moments(low, high):
    """Both bounds clip the Gaussian (a ReLU6's cap had only capped its mean: N(8, 3^2) gave
    6.0 +- 2.99 for 5.55 +- 1.06, and the bias correction they feed cost a model 3 dB)."""
    mean, std = np.array([-0.5, 2.0, 5.0, 8.0]), np.array([2.0, 2.0, 2.0, 3.0])
    clip = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    graph = helper.make_graph([clip], "c", [], [], [
        numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("lo", low), ("hi", high))
    ])  # fmt: skip
    got = _clip(clip, GraphIndex(helper.make_model(graph)), Moments(mean, std))
    draws = np.clip(np.random.default_rng(0).normal(mean, std, (400_000, 4)), low, high)
    np.testing.assert_allclose(got.mean, draws.mean(axis=0), atol=0.01)
    np.testing.assert_allclose(got.std, draws.std(axis=0), atol=0.01)


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
    with pytest.raises(SchemeError, match="need calibration data"):
        QuantConfig(data_free=True, output_parts=("y:1:0-4,4-8",))


def bn_model(layers: list[onnx.NodeProto], inits: dict[str, np.ndarray], x: list, y: list):
    """x -> Conv `w1` -> BatchNorm (beta 0.5, gamma 1) -> `layers` -> y, opset 17."""
    bn = helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn")
    channels = inits["w1"].shape[0]
    constants = {"g": np.ones(channels), "b": np.full(channels, 0.5), "m": np.zeros(channels),
                 "v": np.ones(channels), **inits}  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"), bn, *layers],
        "bn_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_clip_below_zero_keeps_its_negative_half():
    """Clip(-1, 1) (a hardtanh) is no capped ReLU: its range is [-1, 1], not [0, 1]."""
    rng = np.random.default_rng(0)
    clip = helper.make_node("Clip", ["bn", "low", "high"], ["y"], name="hardtanh")
    model = bn_model([clip], {"w1": rng.standard_normal((4, 3, 3, 3)), "low": np.array(-1.0),
                              "high": np.array(1.0)}, [1, 3, 8, 8], [1, 4, 6, 6])  # fmt: skip
    moments = propagate(GraphIndex(model), batchnorm_moments(model), (0.0, 1.0))
    assert (moments["y"].range().lo, moments["y"].range().hi) == (-1.0, 1.0)


@pytest.mark.parametrize("shape", ["flattened", "1-D"])
def test_data_free_takes_flattened_and_1d_layers(tmp_path, shape):
    """A Gemm after Flatten reads C x H x W features of C channels' statistics, and a 1-D
    convolution's kernels have one spatial axis: both had ended in a traceback."""
    rng = np.random.default_rng(0)
    relu = helper.make_node("Relu", ["bn"], ["r"])
    if shape == "flattened":
        layers = [relu, helper.make_node("Flatten", ["r"], ["f"]),
                  helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)]  # fmt: skip
        weights = {"w1": rng.standard_normal((4, 3, 3, 3)), "w2": rng.standard_normal((10, 144))}
        model = bn_model(layers, weights, [1, 3, 8, 8], [1, 10])
    else:
        layers = [relu, helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
        weights = {"w1": rng.standard_normal((4, 3, 3)), "w2": rng.standard_normal((5, 4, 3))}
        model = bn_model(layers, weights, [1, 3, 16], [1, 5, 12])
    onnx.save(model, tmp_path / "m.onnx")
    config = QuantConfig(data_free=True, input_range=(0.0, 1.0))
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", None, config)
    assert next(d for d in report.decisions if d.node in ("fc", "conv2")).quantized


def test_a_gemms_alpha_and_beta_scale_its_moments():
    """Gemm(alpha=30, beta=3) computes what alpha 1 does with 30 W and 3 C: the same moments
    (alpha and beta had been left out, and the output range missed the data: 0.3 dB)."""
    rng = np.random.default_rng(0)
    w2, c = rng.standard_normal((6, 144)), rng.standard_normal(6)
    moments = []
    for alpha, beta in ((30.0, 3.0), (1.0, 1.0)):
        gemm = helper.make_node("Gemm", ["f", "w2", "c"], ["y"], transB=1, alpha=alpha, beta=beta)
        flatten = helper.make_node("Flatten", ["r"], ["f"])
        layers = [helper.make_node("Relu", ["bn"], ["r"]), flatten, gemm]
        scale = 31.0 - alpha  # the alpha-1 model carries the factors in its constants
        inits = {"w1": np.ones((4, 3, 3, 3)), "w2": w2 * scale, "c": c * (4.0 - beta)}
        model = bn_model(layers, inits, [1, 3, 8, 8], [1, 6])
        moments.append(propagate(GraphIndex(model), batchnorm_moments(model), (0.0, 1.0))["y"])
    np.testing.assert_allclose(moments[0].mean, moments[1].mean, rtol=1e-6)
    np.testing.assert_allclose(moments[0].std, moments[1].std, rtol=1e-6)
