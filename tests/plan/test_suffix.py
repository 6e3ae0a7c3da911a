"""The accuracy search runs each candidate only from where it departs from the all-int8 model,
on that model's recorded int8 codes, and must get what running the candidate whole gets."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qdq.plan.suffix
from qdq.plan.suffix import record

from conftest import DIGITS, quantize_cnn


@pytest.fixture(scope="module")
def int8_cnn(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path, _ = quantize_cnn(tmp_path_factory.mktemp("suffix"), prefer="int8")
    return onnx.load(path)


def feeds() -> list[dict[str, np.ndarray]]:
    x = np.load(DIGITS / "test.npz")["input"][:64]
    return [{"input": x[i : i + 16]} for i in range(0, 64, 16)]


def whole(model: onnx.ModelProto, names: list[str]) -> list[list[np.ndarray]]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(names, feed) for feed in feeds()]


def test_a_changed_last_layer_runs_alone_and_gives_the_whole_models_outputs(int8_cnn):
    recorded = record(int8_cnn, feeds())
    assert recorded is not None
    candidate = onnx.ModelProto()
    candidate.CopyFrom(int8_cnn)
    # the Gemm's weight codes change (as AdaRound or a re-plan would change them)
    gemm = next(n for n in candidate.graph.node if n.op_type == "Gemm")
    dq = next(n for n in candidate.graph.node if gemm.input[1] in n.output)
    codes = next(t for t in candidate.graph.initializer if t.name == dq.input[0])
    changed = numpy_helper.to_array(codes).copy()
    changed[0] = -changed[0]
    codes.CopyFrom(numpy_helper.from_array(changed, codes.name))
    names = [o.name for o in candidate.graph.output]

    got = list(recorded.suffix(candidate, names)())
    want = whole(candidate, names)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(want[0][0], whole(int8_cnn, names)[0][0])  # it did change


def test_an_unchanged_candidate_is_the_recorded_model(int8_cnn):
    recorded = record(int8_cnn, feeds())
    names = [o.name for o in int8_cnn.graph.output]
    got = list(recorded.suffix(int8_cnn, names)())
    for a, b in zip(got, whole(int8_cnn, names), strict=True):
        np.testing.assert_array_equal(a[0], b[0])


def test_a_partial_graph_that_does_not_load_runs_the_candidate_whole(int8_cnn, monkeypatch):
    recorded = record(int8_cnn, feeds())
    candidate = onnx.ModelProto()
    candidate.CopyFrom(int8_cnn)
    candidate.graph.node[-1].name = "renamed"  # a change at the end: a partial graph
    broken = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    monkeypatch.setattr(qdq.plan.suffix, "_partial", lambda *args: broken)
    names = [o.name for o in candidate.graph.output]
    got = list(recorded.suffix(candidate, names)())
    for a, b in zip(got, whole(candidate, names), strict=True):
        np.testing.assert_array_equal(a[0], b[0])


def test_codes_over_the_budget_are_not_recorded(int8_cnn, monkeypatch):
    monkeypatch.setattr(qdq.plan.suffix, "RECORD_BUDGET", 1000)
    assert record(int8_cnn, feeds()) is None


@pytest.mark.slow
def test_the_search_writes_the_same_model_as_with_whole_runs(tmp_path, monkeypatch):
    options = {"weight_bits": 4, "target_sqnr": 30.0}
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    fast, _ = quantize_cnn(tmp_path / "fast", **options)
    monkeypatch.setattr(qdq.plan.suffix, "RECORD_BUDGET", 0)  # nothing recorded: whole runs
    slow, _ = quantize_cnn(tmp_path / "slow", **options)
    assert fast.read_bytes() == slow.read_bytes()


def test_graphs_with_subgraphs_are_not_recorded():
    """An If's branches read tensors the If's inputs do not name: its dependencies are not in
    the graph's edges, so such a graph always runs whole."""
    h, f = onnx.helper, onnx.TensorProto.FLOAT
    x, y = h.make_tensor_value_info("x", f, [2]), h.make_tensor_value_info("y", f, [2])
    cond = h.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    then = h.make_graph([h.make_node("Identity", ["x"], ["t"])], "then", [], [y])
    other = h.make_graph([h.make_node("Neg", ["x"], ["e"])], "else", [], [y])
    then.output[0].name, other.output[0].name = "t", "e"
    branch = h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    graph = h.make_graph([branch], "g", [x, cond], [y])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    assert record(model, [{"x": np.ones(2, np.float32), "c": np.array(True)}]) is None
