"""Networks inside Ifs (Silero VAD's form): quantized where the samples decide the branch, the
other branch kept as it was."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper

import models
from qdq.config import QuantConfig
from qdq.data import Samples, model_inputs
from qdq.engine.diff import diff_model
from qdq.errors import ModelError
from qdq.onnx.model import ort_rewrite
from qdq.passes.branches import decided_ifs
from qdq.pipeline import quantize_model
from qdq.report.tables import read_ranges
from quantize_and_run import FUSED, run, save, sqnr_db

from conftest import DIGITS


def ops(graph: onnx.GraphProto) -> collections.Counter:
    """Op types in `graph` and every graph inside its nodes."""
    counts = collections.Counter(node.op_type for node in graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                counts += ops(attribute.g)
    return counts


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("branched")
    source = save(models.branched(onnx.load(str(DIGITS / "cnn.onnx"))), folder)
    with np.load(DIGITS / "calib.npz") as calib:
        x = calib["input"][:64]
    return source, x, folder


def calibrate(folder, x, modes) -> str:
    path = folder / f"calib_{len(set(modes))}.npz"
    np.savez(path, input=x, mode=np.asarray(modes, np.int64))
    return path


@pytest.fixture(scope="module")
def quantized(branched):
    source, x, folder = branched
    out = folder / "q.onnx"
    return source, out, quantize_model(source, out, calibrate(folder, x, [1] * len(x)))


def test_a_network_inside_ifs_the_samples_decide_is_quantized_and_written_back_as_ifs(quantized):
    source, out, report = quantized
    assert sum(d.quantized for d in report.decisions if d.op_type == "Conv") == 3
    assert any("inside 2 If nodes" in note for note in report.notes)
    written = onnx.load(str(out))
    assert collections.Counter(n.op_type for n in written.graph.node) == {
        "GreaterOrEqual": 1,
        "If": 1,
    }
    branches = {a.name: a.g for a in written.graph.node[-1].attribute}
    taken, other = branches["then_branch"], branches["else_branch"]
    assert ops(taken)["QuantizeLinear"]
    assert ops(taken)["If"] == 1
    assert not ops(other)["QuantizeLinear"]
    assert ops(ort_rewrite(written, FUSED).graph)["QLinearConv"] == 3  # int8 kernels in ORT
    test = np.load(DIGITS / "test.npz")["input"][:128]
    for mode, least_db in ((1, 30), (2, 25), (0, 100)):  # 0: the float branch, unchanged
        feed = {"input": test, "mode": np.array(mode, np.int64)}
        assert sqnr_db(run(source, feed)[0], run(out, feed)[0]) > least_db, mode


def test_an_if_whose_condition_differs_between_samples_stays_float(branched):
    source, x, folder = branched
    modes = np.arange(len(x)) % 2
    report = quantize_model(source, folder / "mixed.onnx", calibrate(folder, x, modes))
    assert not any(d.quantized for d in report.decisions)
    assert not any("If nodes" in note for note in report.notes)


def test_excluding_if_keeps_the_networks_inside_float(branched):
    source, x, folder = branched
    config = QuantConfig(exclude=("If",))
    report = quantize_model(
        source, folder / "kept.onnx", calibrate(folder, x, [1] * len(x)), config
    )
    assert not any(d.quantized for d in report.decisions)


def test_a_condition_on_the_batch_size_is_not_decided_by_single_samples(tmp_path):
    """TorchScript's `if x.size(0) == 1: squeeze`: one sample takes one branch, a calibration
    batch the other, so inlining either would calibrate or time the wrong graph."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=0, end=1),
        helper.make_node("Equal", ["shape", "one"], ["single"]),
        helper.make_node(
            "If",
            ["single"],
            ["y"],
            then_branch=helper.make_graph(
                [helper.make_node("Relu", ["x"], ["a"])], "t", [], [models._value("a", ["N", 4])]
            ),
            else_branch=helper.make_graph(
                [helper.make_node("Sigmoid", ["x"], ["b"])], "e", [], [models._value("b", ["N", 4])]
            ),
            name="by_batch",
        ),
    ]
    one = onnx.numpy_helper.from_array(np.array([1], np.int64), "one")
    x, y = models._value("x", ["N", 4]), models._value("y", ["N", 4])
    model = models._model(nodes, [x], [y], [one])
    np.savez(tmp_path / "x.npz", x=np.ones((32, 4), np.float32))
    samples = Samples(tmp_path / "x.npz", model_inputs(model))
    assert decided_ifs(model, list(model.graph.node[-1:]), samples, 16) == {}
    np.savez(tmp_path / "one.npz", x=np.ones((1, 4), np.float32))  # one sample: every batch is 1
    single = Samples(tmp_path / "one.npz", model_inputs(model))
    assert decided_ifs(model, list(model.graph.node[-1:]), single, 16) == {"by_batch": True}


def test_an_if_output_that_a_second_if_reads_is_written_back_past_its_q_dq(branched):
    """The CNN's logits leave the inner If as a graph output that qdq quantizes (renamed to keep
    the output's name after its Q/DQ), and a second If on the same condition reads them."""
    source, x, folder = branched
    model = onnx.load(str(source))
    value = models._value

    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["logits"], [op])], op, [], [value(op, None)]
        )

    second = helper.make_node(
        "If", ["at_least_one"], ["z"], then_branch=branch("Relu"), else_branch=branch("Neg")
    )
    model.graph.node.append(second)
    model.graph.output.append(value("z", ["N", 10]))
    path = save(model, folder, "two_ifs.onnx")
    out = folder / "two_ifs_q.onnx"
    report = quantize_model(path, out, calibrate(folder, x, [1] * len(x)))
    assert sum(d.quantized for d in report.decisions if d.op_type == "Conv") == 3
    test = np.load(DIGITS / "test.npz")["input"][:128]
    for mode, least_db in ((1, 30), (2, 25), (0, 100)):
        feed = {"input": test, "mode": np.array(mode, np.int64)}
        for want, got in zip(run(path, feed), run(out, feed), strict=True):
            assert sqnr_db(want, got) > least_db, mode


def test_the_engine_and_diff_run_an_if_whose_branches_read_outer_tensors(quantized, branched):
    """The engine's float fallback runs the If alone in ONNX Runtime: it must be fed the
    tensors its branches read from outside (the model's input), which its inputs do not list."""
    _, out, _ = quantized
    _, x, folder = branched
    result = diff_model(out, calibrate(folder, x, [1] * len(x)), max_samples=8)
    assert result.first_departure is None
    assert {node.op_type for node in result.nodes} >= {"If"}


def test_tables_are_refused_with_the_reason_for_layers_inside_ifs(quantized):
    with pytest.raises(ModelError, match="inside If branches"):
        read_ranges(onnx.load(str(quantized[1])))


def test_a_node_inside_an_if_is_excluded_by_the_name_reports_give_it(branched):
    source, x, folder = branched
    inner = "if//3/Conv"  # the If's name, then the node's in its branch
    config = QuantConfig(exclude=(inner,))
    report = quantize_model(source, folder / "ex.onnx", calibrate(folder, x, [1] * len(x)), config)
    convs = {d.node: d.quantized for d in report.decisions if d.op_type == "Conv"}
    assert convs == {"if//0/Conv": True, inner: False, "if//7/Conv": True}


def test_a_convolution_an_inner_if_reads_still_runs_as_an_int8_kernel(branched):
    """The inner If holds the pooling and the classifier; its other branch reads the last
    convolution's output. Read as float past its Q there, ONNX Runtime could not fuse that
    convolution (it stayed float, as Silero VAD's last encoder convolution had)."""
    _, x, folder = branched
    source = save(models.branched(onnx.load(str(DIGITS / "cnn.onnx")), tail=3), folder, "tail.onnx")
    out = folder / "tail_q.onnx"
    quantize_model(source, out, calibrate(folder, x, [1] * len(x)))
    fused = ops(ort_rewrite(onnx.load(str(out)), FUSED).graph)
    assert fused["QLinearConv"] == 3
    assert fused["QLinearGlobalAveragePool"] == 1
    test = np.load(DIGITS / "test.npz")["input"][:128]
    for mode, least_db in ((1, 30), (2, 25), (0, 100)):
        feed = {"input": test, "mode": np.array(mode, np.int64)}
        assert sqnr_db(run(source, feed)[0], run(out, feed)[0]) > least_db, mode
