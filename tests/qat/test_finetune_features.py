"""`FinetuneOptions.feature_weight`: training steps also distil the inner tensors (each
quantized activation's float input against FP32's), while checkpoints stay by the outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qdq.cli import main
from qdq.config import preset_config
from qdq.data import Samples, model_inputs
from qdq.errors import DataError, SchemeError
from qdq.onnx.sessions import open_session, session_with_outputs
from qdq.pipeline import quantize_model
from qdq.qat import finetune_trainer
from qdq.qat.finetune import FinetuneOptions
from qdq.qat.finetune_loss import distance, feature_tensors

from conftest import DIGITS

CONFIG = preset_config("default", weight_bits=4, sequential_bias_correction=False, prefer="speed")


@pytest.fixture(scope="module")
def ptq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("features") / "ptq.onnx"
    quantize_model(DIGITS / "cnn.onnx", path, DIGITS / "calib.npz", CONFIG)
    return path


def _trainer(ptq: Path, options: FinetuneOptions, features: list[str]) -> finetune_trainer.Trainer:
    model = onnx.load(DIGITS / "cnn.onnx")
    teacher = session_with_outputs(model, features) if features else open_session(model)
    samples = Samples(DIGITS / "calib.npz", model_inputs(model))
    return finetune_trainer.Trainer(onnx.load(ptq), teacher, samples, CONFIG, options, 16, 0)


def test_inner_tensors_are_each_activation_quantizers_input_that_fp32_makes(ptq: Path) -> None:
    model, quantized = onnx.load(DIGITS / "cnn.onnx"), onnx.load(ptq)
    features = feature_tensors(model, quantized)
    made = {o for n in model.graph.node for o in n.output} - {o.name for o in model.graph.output}
    read = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert features
    assert set(features) == made & read
    assert len(features) == len(set(features))


def test_a_training_step_adds_the_inner_tensors_error_and_checkpoints_ignore_it(
    ptq: Path,
) -> None:
    """The added term is the weight times the mean, over the inner tensors, of the student's
    squared error over FP32's power (the student's values: the QDQ file's same tensors in
    ONNX Runtime, which the torch copy reproduces); the held-out loss is the outputs' alone."""
    features = feature_tensors(onnx.load(DIGITS / "cnn.onnx"), onnx.load(ptq))
    options = FinetuneOptions(batch_size=16, threads=1, feature_weight=0.5)
    trainer = _trainer(ptq, options, features)
    plain = _trainer(ptq, FinetuneOptions(batch_size=16, threads=1), [])
    assert trainer.names == plain.names
    assert trainer.losses[f"{len(features)} inner tensors"] == "mse x 0.5 (training steps)"
    feed = next(trainer.training.batches(16))
    added = trainer._loss(feed, trainer._file_session(), through=True)
    added = float(added.detach() - plain._loss(feed, plain._file_session(), through=True))
    want = trainer.teacher.run(features, feed)
    got = session_with_outputs(onnx.load(ptq), features).run(features, feed)
    pairs = zip(got, want, strict=True)
    errors = [distance(torch.from_numpy(g), torch.from_numpy(w), None) for g, w in pairs]
    assert added > 0
    assert added == pytest.approx(0.5 * float(np.mean(errors)), rel=1e-3)
    assert trainer._held_out().loss == pytest.approx(plain._held_out().loss, rel=1e-6)


def test_a_feature_weight_needs_a_teacher_that_serves_inner_tensors(ptq: Path) -> None:
    with pytest.raises(SchemeError, match="feature_weight"):
        FinetuneOptions(feature_weight=-1.0)
    with pytest.raises(DataError, match="inner tensors"):
        _trainer(ptq, FinetuneOptions(feature_weight=0.1), [])


def test_cli_distils_inner_tensors_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tuned.onnx"
    args = ["finetune", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    args += [str(DIGITS / "calib.npz"), "--steps", "2", "--max-samples", "32"]
    assert main([*args, "--feature-weight", "0.1"]) == 0
    assert "inner tensors' mse x 0.1 (training steps)" in capsys.readouterr().out
    assert open_session(out).run(None, {"input": np.zeros((1, 1, 8, 8), np.float32)})
