"""`qdq finetune`'s ranking term (`--margin-weight`): on Softmax outputs, found in the graph,
and on class logits the user declares (`--class-logits`)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from qdq.cli import main
from qdq.config import preset_config
from qdq.data import Samples, model_inputs
from qdq.onnx.sessions import open_session
from qdq.pipeline import quantize_model
from qdq.qat import finetune_trainer
from qdq.qat.finetune import FinetuneOptions
from qdq.qat.finetune_loss import distance, flip_margin

from conftest import DIGITS


def _cnn_softmax(folder: Path) -> Path:
    """The digits CNN with a Softmax appended: its output `probs` is a distribution."""
    model = onnx.load(DIGITS / "cnn.onnx")
    logits = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Softmax", [logits], ["probs"], axis=1))
    model.graph.output[0].name = "probs"
    onnx.save(model, folder / "cnn_softmax.onnx")
    return folder / "cnn_softmax.onnx"


@pytest.mark.parametrize(
    ("softmax", "on", "off", "label", "plain"),
    [
        # a Softmax output: KL, and the term beside it with a weight
        (True, ["--margin-weight", "1"], ["--margin-weight", "0"], "'probs' kl", "kl"),
        # no Softmax tells that the CNN's `logits` are class scores: the user says so
        (
            False,
            ["--margin-weight", "1", "--class-logits", "logits"],
            ["--margin-weight", "1"],
            "'logits' mse",
            "mse",
        ),
    ],
)
def test_cli_adds_the_margin_term_where_it_reads_a_ranking(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    softmax: bool,
    on: list[str],
    off: list[str],
    label: str,
    plain: str,
) -> None:
    model = _cnn_softmax(tmp_path) if softmax else DIGITS / "cnn.onnx"
    out = tmp_path / "tuned.onnx"
    args = ["finetune", str(model), "-o", str(out), "--calib"]
    args += [str(DIGITS / "calib.npz"), "--steps", "2", "--max-samples", "32"]
    assert main([*args, *on]) == 0
    assert f"{label} + margin" in capsys.readouterr().out
    assert main([*args, *off]) == 0
    printed = capsys.readouterr().out
    assert label in printed
    assert f"{plain} + margin" not in printed


def test_declared_class_logits_add_the_margin_hinge_to_the_loss(tmp_path: Path) -> None:
    """`class_logits`: the digits CNN's logits take the ranking hinge beside their error, on
    the file's outputs as ONNX Runtime runs them (2-bit weights flip some ranks: a hinge > 0)."""
    config = preset_config(
        "default", weight_bits=2, sequential_bias_correction=False, prefer="speed"
    )
    quantize_model(DIGITS / "cnn.onnx", tmp_path / "ptq.onnx", DIGITS / "calib.npz", config)
    model = onnx.load(DIGITS / "cnn.onnx")
    samples = Samples(DIGITS / "calib.npz", model_inputs(model))
    teacher, quantized = open_session(model), onnx.load(tmp_path / "ptq.onnx")
    options = FinetuneOptions(batch_size=64, margin_weight=2.0, class_logits=("logits",))
    trainer = finetune_trainer.Trainer(quantized, teacher, samples, config, options, 64, 0)
    feed = next(trainer.held.batches(64))
    want, got = (torch.from_numpy(s.run(None, feed)[0]) for s in (teacher, open_session(quantized)))
    hinge = float(flip_margin(got, want, -1))
    assert hinge > 0
    direct = float(distance(got, want, None)) + 2.0 * hinge
    assert trainer._held_out().loss == pytest.approx(direct, rel=1e-5)
