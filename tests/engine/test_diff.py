"""`qdq diff`: per node, where the engine and ONNX Runtime (or the engine's other mode) part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qdq.cli import main
from qdq.engine.diff import diff_model
from qdq.engine.kernels import KERNELS
from qdq.errors import UsageError
from qdq.pipeline import quantize_model

from conftest import DIGITS

TEST = DIGITS / "test.npz"
WRONG = "/7/Conv"  # the digits CNN's last convolution, after two others


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("diff")
    paths = {}
    for fmt in ("qdq", "qoperator"):
        paths[fmt] = folder / f"cnn_{fmt}.onnx"
        quantize_model(DIGITS / "cnn.onnx", paths[fmt], DIGITS / "calib.npz", output_format=fmt)
    return paths


@pytest.fixture
def wrong_kernel(monkeypatch):
    """QLinearConv adds 1 to the codes of node WRONG below the dtype's top, and only there."""
    right = KERNELS[("", "QLinearConv")]

    def wrong(context, inputs, attrs):
        outputs = right(context, inputs, attrs)
        if context.node == WRONG:
            y = outputs[0]
            outputs = [np.where(y < np.iinfo(y.dtype).max, y + 1, y).astype(y.dtype)]
        return outputs

    monkeypatch.setitem(KERNELS, ("", "QLinearConv"), wrong)


def _differing(result) -> dict[str, int]:
    return {n.node: n.differing for n in result.nodes if n.differing}


def test_a_wrong_kernel_is_the_first_departure(cnn, wrong_kernel):
    # On the first 64 test images the unperturbed engine agrees with ONNX Runtime everywhere
    # (measured; see the next test), so every difference here comes from the wrong kernel.
    result = diff_model(cnn["qoperator"], TEST, max_samples=64)
    assert result.first_departure.node == WRONG
    assert result.first_departure.max_diff == 1
    assert {"/10/GlobalAveragePool", "/12/Gemm"} <= set(_differing(result))  # propagated


def test_fed_the_other_sides_inputs_only_the_wrong_node_differs(cnn, wrong_kernel):
    for inputs_from in ("ort", "engine"):
        result = diff_model(cnn["qoperator"], TEST, max_samples=64, inputs_from=inputs_from)
        assert list(_differing(result)) == [WRONG]


def test_float_requant_agrees_with_onnx_runtime_on_nearly_every_code(cnn):
    # Measured on this machine's ONNX Runtime (540 images, QDQ and QOperator alike): fed ONNX
    # Runtime's inputs, 1 of 1,105,920 codes of /3/Conv and 1 of 552,960 of /7/Conv differ by
    # 1 LSB (near ties); propagated, at most 0.012% of any node's codes (4 of 34,560 pooled
    # codes) and 10 of 5,400 logits. MLAS on another CPU may round other near ties.
    for fmt in ("qdq", "qoperator"):
        alone = diff_model(cnn[fmt], TEST, inputs_from="ort")
        assert all(n.share < 1e-5 and n.max_diff <= 1 for n in alone.nodes)
        assert alone.samples == 540
        chained = diff_model(cnn[fmt], TEST)
        assert all(n.share < 1e-3 and n.max_diff <= 1 for n in chained.nodes if n.unit == "LSB")


def test_fixed_and_float_requant_part_at_the_first_convolution(cnn):
    result = diff_model(cnn["qdq"], TEST, against="engine", requant="fixed", max_samples=64)
    assert result.right == "engine (float requantization)"
    assert result.first_departure.node == "/0/Conv"
    assert result.first_departure.max_diff == 1


def test_fp32_side_runs_the_unfused_qdq_graph_and_needs_one(cnn):
    result = diff_model(cnn["qdq"], TEST, against="fp32", max_samples=16)
    assert {n.op_type for n in result.nodes} >= {"QLinearConv", "QGemm"}
    with pytest.raises(UsageError, match="--format qdq"):
        diff_model(cnn["qoperator"], TEST, against="fp32")


def test_inputs_from_needs_onnx_runtime_as_the_other_side(cnn):
    with pytest.raises(UsageError, match="`against` ort"):
        diff_model(cnn["qdq"], TEST, against="engine", inputs_from="ort")


def test_command_prints_json_or_a_table_naming_the_departure(cnn, wrong_kernel, capsys):
    args = ["diff", str(cnn["qdq"]), "--data", str(TEST), "--max-samples", "64"]
    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["first_departure"] == {"node": WRONG, "op_type": "QLinearConv"}
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"first departure: {WRONG} (QLinearConv)" in text
    assert "QDQ fusion" in text  # says which graph both sides ran


def test_command_refuses_bad_input_with_exit_2(cnn, capsys):
    base = ["diff", str(cnn["qdq"]), "--data", str(TEST)]
    assert main([*base, "--against", "engine", "--inputs-from", "ort"]) == 2
    assert main(["diff", "missing.onnx", "--data", str(TEST)]) == 2
    assert main([*base, "--requant", "spec"]) == 2
    assert capsys.readouterr().err.count("qdq: error") == 3
