"""The distillation loss of `qdq finetune` (qdq.qat.finetune_loss): KL and the power-normalized
error at the teacher, the ranking hinge, and which outputs count as distributions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from qdq.onnx.sessions import open_session
from qdq.qat.finetune_loss import (
    confirmed_axes,
    distance,
    flip_margin,
    log_scores,
    softmax_axes,
)


def test_kl_and_power_normalized_error_are_zero_at_the_teacher() -> None:
    teacher = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    assert float(distance(teacher, teacher, axis=-1)) == pytest.approx(0.0, abs=1e-6)
    # student 0 everywhere: the error equals the teacher's power, 1.0 after normalizing
    assert float(distance(torch.zeros(2, 2), teacher, axis=None)) == pytest.approx(1.0)
    # KL([0.25, 0.75] || [0.5, 0.5]) = 0.25 ln 0.5 + 0.75 ln 1.5 = 0.1308; row 2 adds 0
    student = torch.full((2, 2), 0.5)
    assert float(distance(student, teacher, axis=-1)) == pytest.approx(0.1308 / 2, abs=1e-4)


def test_margin_term_acts_only_where_the_student_loses_the_teachers_top_class() -> None:
    teacher = log_scores(torch.tensor([[0.6, 0.4, 0.0], [0.9, 0.05, 0.05]]))
    # row 1 ranks as the teacher with more room, row 2 likewise: nothing to add
    agreeing = log_scores(torch.tensor([[0.7, 0.3, 0.0], [0.95, 0.03, 0.02]]))
    assert float(flip_margin(agreeing, teacher, axis=-1)) == pytest.approx(0.0, abs=1e-6)
    # row 1 flipped: the teacher's margin ln(0.6/0.4) = 0.405 asks for 0.203 and the student
    # has -0.405, 0.608 short; row 2 keeps a margin of ln 3 > the 0.5 cap: zero
    flipped = log_scores(torch.tensor([[0.4, 0.6, 0.0], [0.6, 0.2, 0.2]]))
    assert float(flip_margin(flipped, teacher, axis=-1)) == pytest.approx(0.608 / 2, abs=1e-3)
    # along another axis: the same rows as columns
    assert float(flip_margin(flipped.T, teacher.T, axis=0)) == pytest.approx(0.608 / 2, abs=1e-3)
    # one class ranks nothing
    assert float(flip_margin(torch.ones(4, 1), torch.ones(4, 1), axis=-1)) == 0.0


def test_margin_term_reads_logits_as_their_softmax() -> None:
    """Class logits (EfficientNet-Lite0's output) give the hinge of their probabilities: a
    margin of logits is one of log-probabilities, whatever constant shifts a row."""
    rng = np.random.default_rng(0)
    teacher, student = (
        torch.from_numpy(rng.normal(size=(16, 10)).astype(np.float32)) for _ in "ts"
    )
    probs = [log_scores(torch.softmax(x, -1)) for x in (student, teacher)]
    assert float(flip_margin(student, teacher, -1)) > 0
    assert float(flip_margin(student + 3.0, teacher - 1.0, -1)) == pytest.approx(
        float(flip_margin(*probs, -1)), rel=1e-4
    )


@pytest.mark.parametrize(
    ("shape", "loss", "axis"), [((2, 3, 5), "kl", -1), ((2, 15), "mse", -1), ((2, 3, 5), "kl", 1)]
)
def test_a_reshaped_softmax_output_is_distilled_with_kl_where_it_stays_a_distribution(
    shape: tuple[int, ...], loss: str, axis: int
) -> None:
    """PP-OCRv4's recognizer reshapes its (N * T, classes) Softmax to (N, T, classes): KL per
    step; a reshape that merges the class axis with others leaves no distribution: MSE. The
    last axis named by its positive index (1 of 2) is the last axis too (it had given MSE)."""
    nodes = [
        onnx.helper.make_node("Softmax", ["x"], ["p"], axis=axis),
        onnx.helper.make_node("Reshape", ["p", "shape"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "reshaped_softmax",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(shape, np.int64), "shape")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    teacher = open_session(model).run(None, {"x": x})
    axes = confirmed_axes(softmax_axes(model, ["y"]), teacher)
    assert {"kl": -1, "mse": None}[loss] == axes["y"]
