"""The grids quantize_model picks on graphs shaped like real failures: a sigmoid gate's fixed
[0, 1], an activation's input floored where the activation is flat, per-channel weights (on
axis 1 for ConvTranspose, opset 13 for older models) and a dead channel's bias."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import models
from qdq.config import QuantConfig, preset_config
from qdq.onnx.model import ort_rewrite
from quantize_and_run import FUSED, op_counts, quantize_on, run, save, sqnr_db


def test_a_sigmoid_gate_gets_the_fixed_0_1_grid_so_its_mul_runs_in_int8(tmp_path):
    source = save(models.silu_net(), tmp_path)
    x = np.random.default_rng(7).standard_normal((64, 3, 8, 8)).astype(np.float32)
    out, report = quantize_on(source, x, tmp_path)
    decisions = {d.node: d for d in report.decisions}
    assert decisions["gate"].quantized
    assert decisions["silu"].quantized
    scales = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert scales["s1_scale"] == np.float32(1 / 255)
    assert scales["s1_zero_point"] == 0
    fused = op_counts(ort_rewrite(onnx.load(str(out)), FUSED))
    assert fused["QLinearMul"] == 1  # YOLO's SiLU: 13-25% faster than a float Mul between Q/DQ
    assert fused["Mul"] == 0
    assert sqnr_db(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 30


def _lowest_real(path: Path, tensor: str) -> tuple[float, float]:
    """The real value of the lowest code of `tensor`'s QuantizeLinear, and its scale."""
    model = onnx.load(str(path))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    scale, zero = constants[q.input[1]], constants[q.input[2]]
    return float((np.iinfo(zero.dtype).min - int(zero)) * scale), float(scale)


ACTIVATIONS = {  # the function each test model applies to the convolution's output c1
    "hard_swish": (models.hard_swish_tail, "m1", lambda x: x * np.clip(0.2 * x + 0.5, 0, 1)),
    "silu": (models.silu_net, "m1", lambda x: x / (1 + np.exp(-x))),
    "gelu": (  # after a per-channel bias
        models.gelu_max_pool,
        "gelu",
        lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    ),
}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.exact_int8
def test_a_tensor_only_an_activation_reads_has_no_codes_where_the_activation_is_flat(
    activation, tmp_path, monkeypatch
):
    """HardSwish, x * HardSigmoid(x), is exactly 0 at and below -beta / alpha (-2.5 for
    HardSigmoid's default alpha 0.2); SiLU and GELU (here after a per-channel bias Add, as in
    Magika) tend to 0 below their minimum. The convolution's output grid stops a code under
    HardSwish's flat part, and where SiLU and GELU are within half a code of where they go, so
    the codes go where the activation varies, and its output is more accurate for it."""
    build, fetched, function = ACTIVATIONS[activation]
    source = save(build(), tmp_path)
    probe = onnx.load(str(source))  # the float model, the activation's output fetched
    probe.graph.output.append(onnx.ValueInfoProto(name=fetched))
    bias = {t.name: numpy_helper.to_array(t) for t in probe.graph.initializer}.get("bias", 0.0)
    x = np.random.default_rng(8).standard_normal((64, 3, 8, 8)).astype(np.float32) * 3
    config = QuantConfig(method="minmax", prefer="int8")
    results = {}
    for floor in (True, False):
        with monkeypatch.context() as patch:
            if not floor:
                patch.setattr("qdq.plan.build.flat_floor", lambda *args: None)
            out, _ = quantize_on(source, x, tmp_path, config)
        quantized = onnx.load(str(out))
        quantized.graph.output.append(onnx.ValueInfoProto(name=fetched))
        got = run(save(quantized, tmp_path, f"probe_{floor}.onnx"), {"x": x})[1]
        want = run(save(probe, tmp_path, "probe.onnx"), {"x": x})[1]
        results[floor] = (*_lowest_real(out, "c1"), sqnr_db(want, got))
    (lowest, scale, floored), (unfloored_lowest, _, unfloored) = results.values()
    assert unfloored_lowest < lowest - 3  # the calibrated minimum, where the grid began
    # clamping at the lowest code moves the activation by at most a code of its input: half a
    # code by the rule (their slope is 1 where they keep rising), and the zero point's rounding
    # moves the lowest code by up to half a code, where the activation is nearly flat
    moved = np.abs(function(lowest + np.ravel(bias)) - function(-30 + np.ravel(bias)))
    assert moved.max() <= scale
    if activation == "hard_swish":  # the lowest code lies in the flat part: nothing moves
        assert moved.max() == 0
    # dB; the activation's output grid, which the floor does not touch, keeps more of the
    # noise (measured: HardSwish +1.8, SiLU +1.0, GELU +1.4)
    assert floored > unfloored + 0.7


def test_conv_transpose_weights_are_per_channel_on_axis_1(tmp_path):
    source = save(models.conv_transpose_net(), tmp_path)
    x = np.random.default_rng(1).standard_normal((32, 4, 4, 4)).astype(np.float32)
    out, _ = quantize_on(source, x, tmp_path)
    model = onnx.load(str(out))
    weight_dq = next(n for n in model.graph.node if n.name.startswith("w_"))
    assert {a.name: a.i for a in weight_dq.attribute}["axis"] == 1
    assert sqnr_db(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 30


@pytest.mark.parametrize("per_channel", [True, False])
def test_a_dead_channel_keeps_its_bias_in_onnx_runtimes_int8_kernel(tmp_path, per_channel):
    """All-zero weights with a bias (EfficientNet-Lite0's stem has four such channels): the int32
    bias code must not overflow, or the fused QLinearConv outputs garbage for that channel."""
    model = models.conv_net()
    inits = {t.name: t for t in model.graph.initializer}
    w1 = onnx.numpy_helper.to_array(inits["w1"]).copy()
    b1 = onnx.numpy_helper.to_array(inits["b1"]).copy()
    w1[3], b1[3] = 0.0, 8.0
    inits["w1"].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    inits["b1"].CopyFrom(onnx.numpy_helper.from_array(b1, "b1"))
    source = save(model, tmp_path)
    x = np.random.default_rng(6).standard_normal((16, 3, 8, 8)).astype(np.float32)
    out, _ = quantize_on(source, x, tmp_path, preset_config("default", per_channel=per_channel))
    quantized = onnx.load(str(out))
    quantized.graph.output.append(onnx.helper.make_tensor_value_info("r1", 1, None))
    session = ort.InferenceSession(quantized.SerializeToString())  # fused int8 kernels
    relu = session.run(["r1"], {"x": x})[0]
    np.testing.assert_allclose(relu[:, 3], 8.0, rtol=0.01)


def test_models_older_than_opset_13_are_upgraded_for_per_channel_weights(tmp_path):
    source = save(models.conv_net(opset=11), tmp_path)
    x = np.random.default_rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32)
    out, _ = quantize_on(source, x, tmp_path)
    quantized = onnx.load(str(out))
    opset = next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    assert any(a.name == "axis" for n in quantized.graph.node for a in n.attribute)
    assert sqnr_db(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 25
