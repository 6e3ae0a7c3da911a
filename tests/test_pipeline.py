"""quantize_model on the bundled digits models and on graphs shaped like real failures."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import models
from qdq.config import RUN_PRESETS, QuantConfig, preset_config
from qdq.onnx.graph import GraphIndex
from qdq.onnx.model import ort_rewrite
from qdq.pipeline import QuantizeReport, inspect_model, prepare, quantize_model
from qdq.plan.decisions import static_decisions
from qdq.plan.flow import Int8Flow

from conftest import DIGITS, quantize_cnn

FUSED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def run(path: Path | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def accuracy(path: Path) -> float:
    with np.load(DIGITS / "test.npz") as test:
        logits = run(path, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def quantize_on(
    source: Path, x: np.ndarray, folder: Path, config: QuantConfig | None = None
) -> tuple[Path, QuantizeReport]:
    """`source` quantized with `x` (saved as folder/x.npy) for calibration: (output, report)."""
    np.save(folder / "x.npy", x)
    out = folder / "q.onnx"
    return out, quantize_model(source, out, folder / "x.npy", config)


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y) ** 2.0)))


@pytest.mark.parametrize(("name", "budget"), [("cnn", 0.5), ("mobilenet", 1.0)])
@pytest.mark.exact_int8
def test_digits_accuracy_stays_within_budget(tmp_path, name, budget):
    out = tmp_path / f"{name}_int8.onnx"
    report = quantize_model(DIGITS / f"{name}.onnx", out, DIGITS / "calib.npz")
    assert not report.kept_float
    assert accuracy(out) >= accuracy(DIGITS / f"{name}.onnx") - budget / 100
    assert out.stat().st_size < (DIGITS / f"{name}.onnx").stat().st_size


@pytest.mark.parametrize("name", ["cnn", "mobilenet"])
@pytest.mark.exact_int8
def test_every_conv_becomes_an_int8_kernel_in_onnx_runtime(tmp_path, name):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / f"{name}.onnx", out, DIGITS / "calib.npz")
    convs = op_counts(onnx.load(str(DIGITS / f"{name}.onnx")))["Conv"]
    fused = op_counts(ort_rewrite(onnx.load(str(out)), FUSED))
    assert fused["QLinearConv"] == convs
    assert fused["Conv"] == 0
    assert fused["QGemm"] == 1  # the classifier runs in int8 too
    assert fused["QuantizeLinear"] == 1  # int8 flows from the input to the output,
    assert fused["DequantizeLinear"] == 0  # where the QGemm writes float logits itself


def test_transformer_residual_stream_stays_float(tmp_path):
    """Nothing reads the residual sums as int8 (they feed LayerNorms), so they and the bias Adds
    before them stay float, and the MatMuls that feed them keep int8 kernels with float outputs
    (MatMulIntegerToFloat): one int8 grid for a residual stream with outlier channels ruined
    all-MiniLM-L6-v2 (docs/ptq.md). Every op the rules allow (`prefer="int8"`): the default's
    timed candidates may keep the first and last layers float when the machine is busy."""
    out = tmp_path / "q.onnx"
    config = preset_config("default", prefer="int8")
    quantize_model(DIGITS / "transformer.onnx", out, DIGITS / "calib.npz", config)
    model = ort_rewrite(onnx.load(str(out)), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    fused = op_counts(model)
    assert fused["QLinearAdd"] == 0
    assert fused["SkipLayerNormalization"] + fused["LayerNormalization"] == 4
    assert fused["MatMulIntegerToFloat"] > 0
    assert fused["QLinearMatMul"] + fused["QGemm"] + fused["MatMulIntegerToFloat"] == 14
    assert fused["MatMul"] == fused["Gemm"] == 0  # every matrix product runs in int8


def test_logits_stay_float_when_only_a_shape_op_reads_them_on_the_way_to_a_float_op(tmp_path):
    """The Flatten before the Softmax reads nothing in int8 that anything after it needs, so it
    goes float and the Gemm writes float logits: quantized for the Flatten's sake, they were
    rounded to 8 bits."""
    source = save(models.classifier_head(), tmp_path)
    x = np.random.default_rng(5).standard_normal((64, 16)).astype(np.float32)
    out, report = quantize_on(source, x, tmp_path)
    flatten = next(d for d in report.decisions if d.node == "flatten")
    assert not flatten.quantized
    assert "nothing after it reads int8" in flatten.reason
    quantizers = [n for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear"]
    assert not [n for n in quantizers if "logits" in n.input]
    assert sqnr_db(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 35


def test_calibration_observes_only_tensors_that_get_a_grid():
    """Not a Conv output its Relu absorbs (it takes the Relu's range, and observing it would stop
    ONNX Runtime fusing Conv and Relu in the calibration session), not the output of a Gemm that
    nothing reads as int8 (its kernel writes float), not a SiLU's gate (its grid is [0, 1])."""
    config = QuantConfig()
    index = GraphIndex(prepare(models.conv_net(), per_channel=True)[0])
    targets = Int8Flow(index, static_decisions(index, config), config).calibration_targets()
    assert "r1" in targets
    assert "c1" not in targets
    assert "f" in targets
    assert "y" not in targets
    index = GraphIndex(prepare(models.silu_net(), per_channel=True)[0])
    targets = Int8Flow(index, static_decisions(index, config), config).calibration_targets()
    assert "c1" in targets
    assert "s1" not in targets


def test_weights_are_stored_as_integers(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz")
    model = onnx.load(str(out))
    types = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
    assert types == {onnx.TensorProto.INT8}
    biases = [
        t for t in model.graph.initializer if t.name.endswith("_quantized") and len(t.dims) == 1
    ]
    assert {t.data_type for t in biases} >= {onnx.TensorProto.INT32}


def test_qoperator_format_is_made_of_integer_ops(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", output_format="qoperator")
    counts = op_counts(onnx.load(str(out)))
    assert counts["QLinearConv"] == 3
    assert not counts["Conv"]
    assert accuracy(out) >= accuracy(DIGITS / "cnn.onnx") - 0.005


def test_tensorrt_preset_is_symmetric_int8_with_narrow_per_channel_weights(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", RUN_PRESETS["tensorrt"])
    model = onnx.load(str(out))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        codes = inits.get(node.input[0])
        zero_point = inits[node.input[2]]
        assert not zero_point.any(), node.name
        if codes is not None and codes.ndim >= 2:  # a weight
            assert codes.dtype == np.int8
            assert codes.min() >= -127
            assert {a.name: a.i for a in node.attribute}.get("axis", 1) == 0
        elif codes is None:
            assert zero_point.dtype == np.int8  # activations


def test_conv_transpose_weights_are_per_channel_on_axis_1(tmp_path):
    source = save(models.conv_transpose_net(), tmp_path)
    x = np.random.default_rng(1).standard_normal((32, 4, 4, 4)).astype(np.float32)
    out, _ = quantize_on(source, x, tmp_path)
    model = onnx.load(str(out))
    weight_dq = next(n for n in model.graph.node if n.name.startswith("w_"))
    assert {a.name: a.i for a in weight_dq.attribute}["axis"] == 1
    assert sqnr_db(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 30


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


def test_a_max_pool_that_onnx_runtime_would_run_in_nchw_on_8_bit_codes_stays_float(tmp_path):
    """Its 8-bit NCHW MaxPool kernel is up to 15x slower than the float one (keeping it float
    made the PP-OCR classifier's INT8 model 4.6% faster, NudeNet's YOLOv8n 6.5%)."""
    source = save(models.hard_swish_tail(), tmp_path)
    x = np.random.default_rng(8).standard_normal((64, 3, 8, 8)).astype(np.float32)
    out, report = quantize_on(source, x, tmp_path)
    pool = next(d for d in report.decisions if d.node == "mp")
    assert not pool.quantized
    assert "NCHW" in pool.reason
    fused = ort_rewrite(onnx.load(str(out)), FUSED).graph.node
    producer = {o: n.op_type for n in fused for o in n.output}[
        next(n for n in fused if n.name == "mp").input[0]
    ]
    assert producer in ("Mul", "DequantizeLinear")  # float in (before: QLinearMul)
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


def test_a_max_pool_between_int8_convolutions_stays_int8(tmp_path):
    out, report = quantize_cnn(tmp_path)
    assert all(d.quantized for d in report.decisions if d.op_type == "MaxPool")
    optimized = ort_rewrite(onnx.load(str(out)), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert op_counts(optimized)["NhwcMaxPool"] == 1


def test_a_concat_of_very_different_ranges_stays_float(tmp_path):
    source = save(models.detector_head(), tmp_path)
    x = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    out, report = quantize_on(source, x, tmp_path)
    head = next(d for d in report.decisions if d.node == "head")
    assert not head.quantized
    assert "levels" in head.reason
    want, got = run(source, {"x": x})[0], run(out, {"x": x})[0]
    probs_error = np.abs(want[:, 4:] - got[:, 4:]).max()
    assert probs_error < 0.05  # one scale over the boxes' +-4000 pixels would be ~30 per level
    assert np.abs(want[:, :4] - got[:, :4]).max() < 0.02 * np.abs(want[:, :4]).max()


def test_masks_and_sentinels_are_never_quantized(tmp_path):
    source = save(models.masked_attention(), tmp_path)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 6, 8)).astype(np.float32)
    keep = (rng.random((32, 6)) > 0.3).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, keep=keep)
    out = tmp_path / "q.onnx"
    report = quantize_model(source, out, tmp_path / "data.npz")
    add = next(d for d in report.decisions if d.node == "add_mask")
    assert not add.quantized
    assert "mask" in add.reason
    want, got = run(source, {"x": x, "keep": keep})[0], run(out, {"x": x, "keep": keep})[0]
    assert np.isfinite(got).all()
    assert sqnr_db(want, got) > 20


def test_an_op_without_int8_rule_stays_float_and_the_model_still_works(tmp_path):
    source = save(models.conv_net(middle="Tanh"), tmp_path)
    x = np.random.default_rng(4).standard_normal((32, 3, 8, 8)).astype(np.float32)
    out, report = quantize_on(source, x, tmp_path)
    tanh = next(d for d in report.decisions if d.node == "middle")
    assert not tanh.quantized
    assert "no int8 rule for Tanh" in tanh.reason
    assert sqnr_db(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 25


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


def test_a_model_with_its_batch_axis_fixed_at_1_is_fed_one_sample_at_a_time(tmp_path):
    model = onnx.load(str(DIGITS / "cnn.onnx"))  # exporters often fix the batch axis at 1
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    source, out = save(model, tmp_path), tmp_path / "q.onnx"
    quantize_model(source, out, DIGITS / "calib.npz")
    with np.load(DIGITS / "test.npz") as test:
        x = test["input"][:64]
    want = np.concatenate([run(source, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([run(out, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    assert sqnr_db(want, got) > 35  # as good as with a free batch axis (42 dB)


def test_the_report_says_what_the_quantization_cost_in_output_sqnr(tmp_path):
    out, report = quantize_cnn(tmp_path)
    with np.load(DIGITS / "calib.npz") as calib:
        x = calib["input"][:16]  # the report measures on the first 16 calibration samples
    want = sqnr_db(run(DIGITS / "cnn.onnx", {"input": x})[0], run(out, {"input": x})[0])
    assert report.output_sqnr == {"logits": pytest.approx(want, abs=1e-6)}
    assert f"'logits' {want:.2f} dB" in report.summary(out)
    assert "warning" not in report.summary(out)
    # Unusable: the report must say so (every layer int8: --prefer balanced keeps the ends
    # float at no measurable cost on this tiny model, and reaches 12 dB).
    out, report = quantize_cnn(tmp_path, weight_bits=2, prefer="speed")
    assert report.output_sqnr["logits"] < 10
    assert "warning: an output SQNR under 10 dB" in report.summary(out)


def test_exclude_keeps_named_nodes_and_op_types_in_float(tmp_path):
    out = tmp_path / "q.onnx"
    config = QuantConfig(exclude=("/12/Gemm", "GlobalAveragePool"))
    report = quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    kept = {d.node for d in report.kept_float}
    assert {"/12/Gemm", "/10/GlobalAveragePool"} <= kept
    fused = op_counts(ort_rewrite(onnx.load(str(out)), FUSED))
    assert fused["Gemm"] == 1


def test_inspect_says_why_each_float_node_stays_float(tmp_path):
    source = save(models.conv_net(middle="Tanh"), tmp_path)
    decisions = {d.node: d for d in inspect_model(source)}
    assert decisions["conv1"].quantized
    assert not decisions["middle"].quantized
    assert "Tanh" in decisions["middle"].reason


def test_metadata_maps_float_tensors_to_their_quantized_copies(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    copies = json.loads(props["qdq.quantized_tensors"])
    assert copies["input"] == "input_dq"
    assert "logits" not in copies  # the last Gemm outputs float: nothing reads it as int8


def test_a_quantized_graph_output_keeps_its_name(tmp_path):
    # ConvTranspose has no float-output int8 kernel: its output (through the Relu) is quantized,
    # and the dequantized copy carries the graph output's name.
    source = save(models.conv_transpose_net(), tmp_path)
    x = np.random.default_rng(5).standard_normal((8, 4, 4, 4)).astype(np.float32)
    out, _ = quantize_on(source, x, tmp_path)
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["qdq.quantized_tensors"])["y"] == "y"
    assert next(n for n in model.graph.node if n.output[0] == "y").op_type == "DequantizeLinear"


@pytest.mark.parametrize("spiky", [False, True])
def test_an_embedding_table_is_stored_in_8_bits_and_gathered_in_8_bits(tmp_path, spiky):
    source = save(models.embedding(spiky=spiky), tmp_path)
    ids = np.random.default_rng(6).integers(0, 2000, (32, 8))
    out, report = quantize_on(source, ids, tmp_path)
    embed = next(d for d in report.decisions if d.node == "embed")
    assert embed.quantized is not spiky
    if spiky:  # the table stays float, with the reason
        assert "dB" in embed.reason
        return
    assert out.stat().st_size < source.stat().st_size / 3
    fused = ort_rewrite(onnx.load(str(out)), FUSED)
    gather = next(n for n in fused.graph.node if n.op_type == "Gather")
    table = next(t for t in fused.graph.initializer if t.name == gather.input[0])
    assert table.data_type == onnx.TensorProto.UINT8  # rows picked from the 8-bit table go
    assert "DequantizeLinear" not in op_counts(fused)  # into the int8 MatMul: nothing dequantized
    assert sqnr_db(run(source, {"ids": ids})[0], run(out, {"ids": ids})[0]) > 30
