"""Where quantize_model lets int8 flow on graphs shaped like real failures, and what it keeps
float and why (residual streams, logits, max pools, concats of far apart ranges, masks, ops
without an int8 rule, embedding tables)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import head_models
import models
from qdq.config import QuantConfig, preset_config
from qdq.onnx.graph import GraphIndex
from qdq.onnx.model import ort_rewrite
from qdq.pipeline import prepare, quantize_model
from qdq.plan.decisions import static_decisions
from qdq.plan.flow import Int8Flow
from quantize_and_run import FUSED, op_counts, quantize_on, run, save, sqnr_db

from conftest import DIGITS, quantize_cnn


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


def test_matrix_products_after_onnx_runtimes_own_fused_ops_run_in_int8(tmp_path):
    """ONNX Runtime's transformer optimizer, which users run before quantizing, writes its own
    ops into the file (SkipLayerNormalization, BiasGelu); ONNX's shape inference gives their
    outputs no type, and the rules had kept every matrix product after them float as "not
    float32" (6 of the digits transformer's 14; 33 of an optimized all-MiniLM-L6-v2's 36).
    The LayerNorms are unfused now (qdq.passes.unfuse); BiasGelu stays, typed by ONNX
    Runtime."""
    from onnxruntime.transformers import optimizer

    source = tmp_path / "optimized.onnx"
    fusions = optimizer.optimize_model(str(DIGITS / "transformer.onnx"), model_type="bert")
    fusions.save_model_to_file(str(source))
    written = op_counts(onnx.load(str(source)))
    assert written["SkipLayerNormalization"] == 4
    assert written["BiasGelu"] == 2
    out = tmp_path / "q.onnx"
    config = preset_config("default", prefer="int8")
    quantize_model(source, out, DIGITS / "calib.npz", config)
    model = ort_rewrite(onnx.load(str(out)), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    fused = op_counts(model)
    assert fused["QLinearMatMul"] + fused["QGemm"] + fused["MatMulIntegerToFloat"] == 14
    assert fused["MatMul"] == fused["Gemm"] == 0
    x = np.load(DIGITS / "test.npz")["input"][:64]
    assert sqnr_db(run(source, {"input": x})[0], run(out, {"input": x})[0]) > 25


def test_logits_stay_float_when_only_a_shape_op_reads_them_on_the_way_to_a_float_op(tmp_path):
    """The Flatten before the Softmax reads nothing in int8 that anything after it needs, so it
    goes float and the Gemm writes float logits: quantized for the Flatten's sake, they were
    rounded to 8 bits."""
    source = save(head_models.classifier_head(), tmp_path)
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


def test_a_max_pool_between_int8_convolutions_stays_int8(tmp_path):
    out, report = quantize_cnn(tmp_path)
    assert all(d.quantized for d in report.decisions if d.op_type == "MaxPool")
    optimized = ort_rewrite(onnx.load(str(out)), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert op_counts(optimized)["NhwcMaxPool"] == 1


def test_a_concat_of_very_different_ranges_stays_float(tmp_path):
    source = save(head_models.detector_head(), tmp_path)
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


def test_a_model_with_nothing_int8_is_written_as_it_runs_and_said_so(tmp_path):
    """A Pad alone (PyTorch's opset-6 exports): the range method's choice and its checks ran
    on a plan with nothing int8 and scored every method "inf dB", and the summary called a file
    2.6x larger "0.38x smaller"."""
    pad = onnx.helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")
    graph = onnx.helper.make_graph(
        [pad],
        "pad",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")],
    )
    source = save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), tmp_path
    )
    x = np.random.default_rng(5).standard_normal((32, 3, 8, 8)).astype(np.float32)
    out, report = quantize_on(source, x, tmp_path)
    assert not report.quantized
    assert not any("range method" in note for note in report.notes)
    assert report.quantized_bytes > report.float_bytes  # qdq's metadata on 174 bytes
    assert "x larger)" in report.summary(out).splitlines()[0]
    np.testing.assert_array_equal(run(out, {"x": x})[0], run(source, {"x": x})[0])


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


@pytest.mark.parametrize("conv", ["/9/Conv", "/12/Conv"])  # depthwise, pointwise
def test_a_convolution_kept_float_between_int8_layers_runs_float_in_onnx_runtime(tmp_path, conv):
    """ONNX Runtime quantizes the float weights of a Conv that reads a per-tensor
    DequantizeLinear and writes a QuantizeLinear (one int8 scale for the whole tensor): a layer
    kept float for its accuracy must not come back as coarse int8."""
    out = tmp_path / "q.onnx"
    config = QuantConfig(prefer="int8", exclude=(conv,))
    quantize_model(DIGITS / "mobilenet.onnx", out, DIGITS / "calib.npz", config)
    fused = ort_rewrite(onnx.load(out), FUSED)
    kept = [n for n in fused.graph.node if n.name.startswith(conv)]
    assert kept
    assert {n.op_type for n in kept} <= {"Conv", "FusedConv"}
    assert not any("weight_q" in o for n in fused.graph.node for o in n.output)
    assert op_counts(fused)["QLinearConv"] == 6  # the other convolutions


def test_a_network_of_tiny_activations_keeps_them(tmp_path):
    """Activations a hundred-millionth of the usual (PyTorch's MnasNet as initialized: 1e-7 by
    its last layers): the smallest scale was float32's epsilon, as torch.ao's is, a grid
    coarser than the values themselves, and every int8 layer gave zeros (0.25 dB where ONNX
    Runtime's MinMax kept 25.7)."""
    model = models.conv_net()
    for tensor in model.graph.initializer:
        if tensor.name in ("w1", "b1", "b2", "b3"):
            tiny = onnx.numpy_helper.to_array(tensor) * np.float32(1e-8)
            tensor.CopyFrom(onnx.numpy_helper.from_array(tiny, tensor.name))
    source = save(model, tmp_path)
    x = np.random.default_rng(6).standard_normal((32, 3, 8, 8)).astype(np.float32)
    out, report = quantize_on(source, x, tmp_path, QuantConfig(prefer="int8"))
    assert {"conv1", "conv2", "fc"} <= {d.node for d in report.decisions if d.quantized}
    want, got = run(source, {"x": x})[0], run(out, {"x": x})[0]
    assert np.abs(want).max() < 1e-6
    assert sqnr_db(want, got) > 30


def mlp(tmp_path, bias: bool, shape: list) -> tuple:
    """x -> MatMul mm1 [-> Add bias1 of a constant] -> Relu -> MatMul mm2 [+ x, residual]:
    ONNX Runtime's MatMulAddFusion makes a 2-D MatMul and the Add after it one Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm1")]
    if bias:
        nodes.append(helper.make_node("Add", ["m", "b"], ["a"], name="bias1"))
    nodes += [helper.make_node("Relu", [nodes[-1].output[0]], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "v"], ["y"], name="mm2")]  # fmt: skip
    if not bias:
        nodes[-1].output[0] = "h"
        nodes.append(helper.make_node("Add", ["h", "x"], ["y"], name="residual"))
    weights = {"w": (16, 16), "v": (16, 16), "b": (16,)}
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), k)
         for k, s in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((20, *[d if isinstance(d, int) else 5 for d in shape[1:]]))
    return save(model, tmp_path), x.astype(np.float32)


def test_a_matmul_before_a_residual_sum_runs_int8(tmp_path):
    """The fusion made `r @ v + x` one Gemm, whose bias QGemm wants constant: it had stayed
    float in 2-D (and in 3-D, unfused, not); it is written back as the MatMul and the Add."""
    source, x = mlp(tmp_path, bias=False, shape=["N", 16])
    out, report = quantize_on(source, x, tmp_path, preset_config("default", prefer="int8"))
    decided = {d.node: d for d in report.decisions}
    assert decided["mm2"].quantized
    assert op_counts(onnx.load(out))["MatMul"] == 2


def test_exclude_takes_the_names_of_nodes_preparation_fused_or_folded(tmp_path):
    """`mm1` (fused with its bias Add into `mm1/MatMulAddFusion`), the Add's own name and a
    BatchNormalization (folded into its Conv) had each been refused as naming no node."""
    from qdq.cli import main

    source, x = mlp(tmp_path, bias=True, shape=["N", 16])
    for exclude in ("mm1", "MatMul"):
        _, report = quantize_on(source, x, tmp_path, QuantConfig(exclude=(exclude,)))
        assert "mm1/MatMulAddFusion" in {d.node for d in report.kept_float}, exclude
    for exclude in ("bias1", "Add"):  # a bias is no residual sum: the layer stays int8
        _, report = quantize_on(source, x, tmp_path, QuantConfig(exclude=(exclude,)))
        assert any(f"--exclude {exclude!r}" in note for note in report.notes)
        assert "mm1/MatMulAddFusion" not in {d.node for d in report.kept_float}
    assert main(["inspect", str(source), "--exclude", "mm1"]) == 0
    out = tmp_path / "bn.onnx"
    config = QuantConfig(exclude=("BatchNormalization",))
    report = quantize_model(DIGITS / "mobilenet_bn.onnx", out, DIGITS / "calib.npz", config)
    assert any("folded it into another node" in note for note in report.notes)
