"""The QAT API's arguments (torch): a wrong type, inputs the module cannot take, NaN
parameters, each a qdq error naming them before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdq.errors import DataError, ModelError, QdqError
from qdq.qat import export, prepare
from qdq.qat.finetune import FinetuneOptions, finetune_model

from conftest import DIGITS

CNN = str(DIGITS / "cnn.onnx")
CALIB = str(DIGITS / "calib.npz")

WRONG_TYPES = {
    "finetune options dict": (
        lambda: finetune_model(CNN, "/tmp/never.onnx", CALIB, options={"steps": 2}),
        "options must be FinetuneOptions",
    ),
    "finetune seed": (
        lambda: finetune_model(CNN, "/tmp/never.onnx", CALIB, seed="a"),
        "seed must be an integer",
    ),
    "finetune steps": (lambda: FinetuneOptions(steps=2.5), "steps` must be an integer"),
    "finetune threads": (lambda: FinetuneOptions(threads=0), "threads` must be >= 1"),
    "prepare freeze_bn_after": (
        lambda: prepare(nn.Linear(3, 2), torch.randn(1, 3), freeze_bn_after="x"),
        "freeze_bn_after must be an integer",
    ),
}


@pytest.mark.parametrize(("call", "message"), WRONG_TYPES.values(), ids=WRONG_TYPES)
def test_a_wrong_argument_is_a_qdq_error_naming_it(call, message):
    with pytest.raises(QdqError, match=message):
        call()


def test_prepare_and_export_name_what_the_module_fails_on(tmp_path):
    layer = nn.Linear(3, 2)
    with pytest.raises(DataError, match="fails on example_inputs: mat1 and mat2"):
        prepare(layer, torch.randn(1, 5))
    with pytest.raises(DataError, match="fails on calibration batch 0"):
        prepare(layer, torch.randn(1, 3), calibration=[torch.randn(4, 5)])
    with pytest.raises(DataError, match="float32 tensors"):
        prepare(layer, torch.randn(1, 3).double())
    prepared = prepare(layer, torch.randn(1, 3))
    with pytest.raises(DataError, match="fails on example_inputs"):
        export(prepared, tmp_path / "q.onnx", torch.randn(1, 7))
    assert not list(tmp_path.iterdir())


def test_nan_weights_are_named_before_and_after_training(tmp_path):
    broken = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"0\.weight hold NaN"):
        prepare(broken, torch.randn(1, 3))
    prepared = prepare(nn.Sequential(nn.Linear(3, 2)), torch.randn(8, 3))
    with torch.no_grad():
        for parameter in prepared.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ModelError, match="training diverged"):
        export(prepared, tmp_path / "q.onnx", torch.randn(1, 3))
    assert not list(tmp_path.iterdir())


def test_a_causal_masks_minus_inf_buffer_is_no_broken_weight(tmp_path):
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + self.mask.clamp(min=-1e4).sum()

    prepared = prepare(Masked(), torch.randn(2, 4))
    assert export(prepared, tmp_path / "q.onnx", torch.randn(1, 4)).exists()
