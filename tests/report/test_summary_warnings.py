"""`qdq quantize`'s summary warns where the file gains the user nothing: no node quantized, or
no plan faster than FP32 (and then says whether the file is at least smaller)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qdq.pipeline import quantize_model
from qdq.plan.build import Candidate
from qdq.report.summary import QuantizeReport

from conftest import DIGITS

SLOWER = [Candidate("all int8", 30.0, 2.0, 4, chosen=True), Candidate("ends float", 31.0, 2.1, 2)]


def test_a_slower_int8_file_is_called_smaller_only_where_it_is():
    # basic-pitch's CQT kernels, each shared by several convolutions, came out 2.1x larger
    smaller = QuantizeReport([], 32, 1.0, 200, 100, candidates=SLOWER, float_ms=1.0)
    assert "the int8 file is smaller, not faster, on this machine" in smaller.summary("q.onnx")
    larger = QuantizeReport([], 32, 1.0, 200, 400, candidates=SLOWER, float_ms=1.0)
    summary = larger.summary("q.onnx")
    assert "the int8 file is neither smaller nor faster, on this machine" in summary
    assert "smaller, not faster" not in summary


def test_a_model_with_nothing_to_quantize_is_said_to_be_float(tmp_path):
    # g2p-id's LSTM encoder: 0 of 11 nodes quantized, and a summary that only listed reasons
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"], name="log")],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source, calib = tmp_path / "log.onnx", tmp_path / "calib.npy"
    onnx.save(model, source)
    np.save(calib, np.random.default_rng(0).uniform(0.1, 2.0, (16, 4)).astype(np.float32))
    report = quantize_model(source, tmp_path / "q.onnx", calib)
    assert not report.quantized
    summary = report.summary(tmp_path / "q.onnx")
    assert "warning: no node was quantized" in summary
    assert "kept float: Log log: no int8 rule for Log" in summary
    digits = quantize_model(DIGITS / "cnn.onnx", tmp_path / "d.onnx", DIGITS / "calib.npz")
    assert "no node was quantized" not in digits.summary(tmp_path / "d.onnx")
