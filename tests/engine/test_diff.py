"""`qdq diff`: per node, where the engine and ONNX Runtime (or the engine's other mode) part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qdq.cli import main
from qdq.config import QuantConfig
from qdq.engine import Engine
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


def test_float_requant_agrees_with_onnx_runtime_on_every_code(cnn):
    # MLAS's float32 arithmetic (engine/mlas.py), measured on this machine's ONNX Runtime (AMD
    # EPYC, AVX-512 VNNI), 540 images, QDQ and QOperator alike: no node differs, fed ONNX
    # Runtime's inputs or run whole. MLAS on another CPU may round other near ties.
    for fmt in ("qdq", "qoperator"):
        alone = diff_model(cnn[fmt], TEST, inputs_from="ort")
        assert alone.samples == 540
        assert alone.first_departure is None
        assert diff_model(cnn[fmt], TEST).first_departure is None


def test_a_float_node_that_onnx_runtime_runs_alone_is_told_apart(tmp_path, monkeypatch):
    """The engine hands float nodes to ONNX Runtime, one node at a time; where ONNX Runtime's
    kernel alone differs from the one in its whole graph (here made to, by 1e-6), the node is
    marked, and the engine's own kernels are reported on their own."""
    path = tmp_path / "cnn.onnx"
    config = QuantConfig(exclude=("GlobalAveragePool",))
    quantize_model(DIGITS / "cnn.onnx", path, DIGITS / "calib.npz", config)
    alone = Engine.ort_node

    def other_kernel(self, position, node, inputs):
        outputs = alone(self, position, node, inputs)
        if node.op_type == "GlobalAveragePool":
            outputs = [y + np.float32(1e-6) for y in outputs]
        return outputs

    monkeypatch.setattr(Engine, "ort_node", other_kernel)
    result = diff_model(path, TEST, inputs_from="ort", max_samples=16)
    assert (result.first_departure.op_type, result.first_departure.fallback) == (
        "GlobalAveragePool",
        True,
    )
    assert result.first_kernel_departure is None
    assert {n.op_type for n in result.nodes if n.fallback} == {"GlobalAveragePool", "Flatten"}
    assert "the engine's own kernels all agree" in result.to_text()
    assert result.as_dict()["first_kernel_departure"] is None


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
