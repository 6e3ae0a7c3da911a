"""Empirical bias correction cancels the mean output shift that weight rounding causes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq.ptq
from qdq.config import preset_config
from qdq.onnx.sessions import session_with_outputs
from qdq.passes import bias_correction
from qdq.pipeline import quantize_model
from qdq.ptq import SEQUENTIAL_SAMPLES

from conftest import DIGITS, digits_cnn_sqnr, quantize_cnn


def padded_depthwise(rng: np.random.Generator) -> onnx.ModelProto:
    """x (all positive, like post-ReLU) -> depthwise 3x3 Conv with zero padding -> y."""
    weight = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    weight[:, :, 1, 1] += 3.0  # a few large weights set the per-tensor scale: coarse rounding
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=8, pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(8, "f"), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path)).run(None, {"x": x})[0]


def test_bias_correction_removes_the_mean_shift_of_a_padded_depthwise_conv(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "dw.onnx"
    onnx.save(padded_depthwise(rng), str(source))
    x = (np.abs(rng.standard_normal((256, 8, 6, 6))) * 2 + 1).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    shifts = {}
    for correct in (False, True):
        out = tmp_path / f"q{correct}.onnx"
        config = preset_config("default", per_channel=False, weight_bits=4, bias_correction=correct)
        quantize_model(source, out, tmp_path / "x.npy", config)
        shift = (run(out, x) - run(source, x)).mean(axis=(0, 2, 3))
        shifts[correct] = np.abs(shift).mean()
    assert shifts[True] < shifts[False] / 4


@pytest.mark.slow
def test_sequential_correction_beats_the_per_layer_one_at_4_bits(tmp_path, cnn_4bit_sqnr):
    sequential, _ = quantize_cnn(tmp_path, weight_bits=4, gptq=False)  # the default correction
    assert digits_cnn_sqnr(sequential) > cnn_4bit_sqnr + 2.0  # measured 18.5 -> 21.8


def layer_shifts(path: Path, samples: np.ndarray) -> dict[str, float]:
    """Per Conv/Gemm output of the quantized model at `path`: the largest per-channel mean
    difference from the FP32 digits CNN's same tensor, in that channel's standard deviations."""
    quantized = onnx.load(path)
    reference = onnx.load(DIGITS / "cnn.onnx")
    known = {o for node in reference.graph.node for o in node.output}
    names = [n.output[0] for n in quantized.graph.node if n.op_type in ("Conv", "Gemm")]
    names = [name for name in names if name in known]
    want = session_with_outputs(reference, names).run(names, {"input": samples})
    got = session_with_outputs(quantized, names).run(names, {"input": samples})
    shifts = {}
    for name, w, g in zip(names, want, got, strict=True):
        axes = tuple(d for d in range(w.ndim) if d != 1)
        shift = (g.astype(np.float64) - w).mean(axis=axes) / (w.std(axis=axes) + 1e-9)
        shifts[name] = float(np.abs(shift).max())
    return shifts


@pytest.mark.slow
def test_sequential_correction_leaves_no_mean_shift_in_any_layer(tmp_path):
    """Measured on the samples it corrects with, every layer's mean output per channel is
    FP32's to within a small part of a standard deviation (the correction is a running mean
    over batches, each measured with the upstream corrections as they stood then)."""
    samples = np.load(DIGITS / "calib.npz")["input"][:SEQUENTIAL_SAMPLES]
    (tmp_path / "seq").mkdir()
    sequential, _ = quantize_cnn(tmp_path / "seq", weight_bits=4)
    one_shot, _ = quantize_cnn(tmp_path, weight_bits=4, sequential_bias_correction=False)
    after = layer_shifts(sequential, samples)
    before = layer_shifts(one_shot, samples)
    assert len(after) >= 3
    assert max(after.values()) < 0.03, after  # measured 0.013
    assert max(before.values()) > 0.1, before  # one-shot correction alone: 0.22


def test_re_plans_reuse_each_layers_correction_and_write_the_same_file(tmp_path, monkeypatch):
    # The range method's choice and the frontier re-plan every layer on the same weight grids
    # (pair-safe weights, on x86 without VNNI, follow each plan's activation grid: not here;
    # GPTQ's rounding check corrects the same plan once more with nearest codes: not here).
    computed: list[str] = []
    expected_output = bias_correction._expected_output

    def counted(node, mean, error):
        computed.append(node.name)
        return expected_output(node, mean, error)

    monkeypatch.setattr(bias_correction, "_expected_output", counted)
    (tmp_path / "memo").mkdir()
    reused, _ = quantize_cnn(tmp_path / "memo", prefer="speed", saturation="ignore", gptq=False)
    assert computed
    assert len(computed) == len(set(computed))  # once per layer

    correct = bias_correction.correct_biases
    monkeypatch.setattr(qdq.ptq, "correct_biases", lambda i, p, m, _: correct(i, p, m))
    computed.clear()
    fresh, _ = quantize_cnn(tmp_path, prefer="speed", saturation="ignore", gptq=False)
    assert len(computed) > len(set(computed))  # without the memo: again on every plan
    assert fresh.read_bytes() == reused.read_bytes()


@pytest.fixture
def float_passes(monkeypatch) -> list[int]:
    """One entry per run of the correction's own float pass (`_float_means`)."""
    passes: list[int] = []
    float_means = bias_correction._float_means

    def counted(*args):
        passes.append(1)
        return float_means(*args)

    monkeypatch.setattr(bias_correction, "_float_means", counted)
    return passes


def test_the_float_means_taken_in_calibration_correct_as_a_float_pass_does(
    tmp_path, monkeypatch, float_passes
):
    # Calibration takes each layer's float means per channel on its way, so the sequential
    # correction runs the int8 network alone; without them it runs the float network too.
    (tmp_path / "taken").mkdir()
    taken, _ = quantize_cnn(tmp_path / "taken", weight_bits=4, prefer="speed")
    assert not float_passes
    monkeypatch.setattr(qdq.ptq, "correctable_outputs", lambda index, quantized: [])
    passed, _ = quantize_cnn(tmp_path, weight_bits=4, prefer="speed")
    assert float_passes == [1]

    _assert_same_biases(taken, passed)


def _assert_same_biases(got_path: Path, want_path: Path) -> None:
    """The two files' float biases agree: the same means, summed in another order."""

    def biases(path: Path) -> dict[str, np.ndarray]:
        model = onnx.load(str(path))
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                if t.data_type == TensorProto.FLOAT and t.dims and len(t.dims) == 1}  # fmt: skip

    got, want = biases(got_path), biases(want_path)
    assert got
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_layer_whose_rows_are_not_samples_is_corrected_from_a_float_pass(tmp_path, float_passes):
    # The digits transformer's attention projections are Gemms on (samples x tokens, features):
    # calibration cannot take their means per sample, so the correction runs the float network
    # (before, it took rows as samples and left the output at 16.7 dB instead of 42).
    out = tmp_path / "transformer_int8.onnx"
    config = preset_config("default", prefer="int8", gptq=False)
    quantize_model(DIGITS / "transformer.onnx", out, DIGITS / "calib.npz", config)
    assert float_passes == [1]
    x = np.load(DIGITS / "test.npz")["input"]
    want = ort.InferenceSession(str(DIGITS / "transformer.onnx")).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    sqnr = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2))
    assert sqnr > 35


def test_a_sample_at_a_time_calibration_takes_the_means_of_rows_that_are_not_samples(
    tmp_path, monkeypatch, float_passes
):
    # A batch-1 model (ddddocr's Gemm after its LSTM reads (steps, features)) is fed one sample
    # at a time: each tensor is that sample's whatever its rows, so calibration takes its means
    # and the correction runs no float pass, with the biases the float pass gives.
    config = preset_config("default", prefer="int8", gptq=False, batch_size=1)
    taken, passed = tmp_path / "taken.onnx", tmp_path / "passed.onnx"
    quantize_model(DIGITS / "transformer.onnx", taken, DIGITS / "calib.npz", config)
    assert not float_passes
    monkeypatch.setattr(qdq.ptq, "correctable_outputs", lambda index, quantized: [])
    quantize_model(DIGITS / "transformer.onnx", passed, DIGITS / "calib.npz", config)
    assert float_passes == [1]
    _assert_same_biases(taken, passed)


def test_a_sequential_correction_that_harms_the_held_out_samples_is_dropped(tmp_path, monkeypatch):
    correct = qdq.ptq.correct_sequentially

    def harmful(*args, **kwargs):
        plan = correct(*args, **kwargs)
        shifted = {k: v + 3 * np.abs(v).max() for k, v in plan.bias_values.items()}
        return replace(plan, bias_values=shifted)

    monkeypatch.setattr(qdq.ptq, "correct_sequentially", harmful)
    out, report = quantize_cnn(tmp_path, prefer="speed")
    assert any(n.startswith("sequential bias correction dropped") for n in report.notes)
    assert digits_cnn_sqnr(out) > 35
    monkeypatch.setattr(qdq.ptq, "correct_sequentially", correct)
    _, report = quantize_cnn(tmp_path, prefer="speed")
    assert any(n.startswith("sequential bias correction kept") for n in report.notes)


def test_a_gemm_with_a_row_bias_is_corrected(tmp_path):
    """A Gemm's C of shape (1, N) takes its correction per channel (the running correction had
    kept C's shape, which the correcting graph refused: the stage was always skipped)."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.standard_normal((6, 8))), ("c1", rng.standard_normal((1, 6))),
        ("w2", rng.standard_normal((6, 5))), ("c2", rng.standard_normal((1, 5))))]  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Gemm", ["r", "w1", "c1"], ["g"], name="fc1", transB=1),
            helper.make_node("Relu", ["g"], ["h"]),
            helper.make_node("Gemm", ["h", "w2", "c2"], ["y"], name="fc2"),
        ],
        "row_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        init,
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    np.save(tmp_path / "x.npy", rng.standard_normal((32, 8)).astype(np.float32))
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy",
                            preset_config("default", prefer="speed"))  # fmt: skip
    assert not any("skipped" in n for n in report.notes), report.notes
    assert any(n.startswith("sequential bias correction") for n in report.notes)
