"""Freezing oscillating weights while fine-tuning: a weight whose code flips back and forth is
held at the code it took most, and stays there however the optimizer pushes it."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from qdq.config import preset_config
from qdq.pipeline import quantize_model
from qdq.qat.convert import QdqGraph
from qdq.qat.oscillation import OscillationFreezer

from conftest import DIGITS

CONFIG = preset_config("default", weight_bits=4, sequential_bias_correction=False, prefer="speed")


@pytest.fixture(scope="module")
def ptq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oscillation") / "ptq.onnx"
    quantize_model(DIGITS / "cnn.onnx", path, DIGITS / "calib.npz", CONFIG)
    return path


@pytest.fixture
def graph(ptq: Path) -> QdqGraph:
    return QdqGraph(onnx.load(ptq), CONFIG.weights, CONFIG.activations)


def _with_first_code(grid, codes: torch.Tensor, code: float) -> torch.Tensor:
    """The weight whose codes are `codes` with the first one set to `code`."""
    changed = codes.clone().flatten()
    changed[0] = code
    return grid.dequantize(changed.reshape(codes.shape))


def test_a_weight_flipping_between_two_codes_is_frozen_at_the_one_it_held_most(graph):
    name = next(iter(graph.weight_of))
    param, grid = graph.weight_param(name), graph.grids[graph.weight_of[name]]
    freezer = OscillationFreezer(graph, threshold=0.05)
    codes = grid.codes(param.detach())
    own = float(codes.flatten()[0])
    near = own + 1 if own < grid.qmax else own - 1
    low, high = _with_first_code(grid, codes, own), _with_first_code(grid, codes, near)
    # an optimizer that pushes weight 0 across the boundary to the next code and back, two
    # steps out of three on its own code: it turns back every time; the others never move
    for step in range(60):
        with torch.no_grad():
            param.copy_(high if step % 3 == 2 else low)
        freezer.update()
        if freezer.frozen():
            break
    assert freezer.frozen() == 1
    for _ in range(3):  # pushed to the next code again, it is put back on its own
        with torch.no_grad():
            param.copy_(high)
        freezer.update()
        now = grid.codes(param.detach()).flatten()
        assert float(now[0]) == own
        assert torch.equal(now[1:], codes.flatten()[1:])  # the others go where pushed


def test_weights_that_move_one_way_are_never_frozen(graph):
    freezer = OscillationFreezer(graph, threshold=0.01)
    param = graph.weight_param(next(iter(graph.weight_of)))
    for _ in range(50):  # a drift crosses boundaries without turning back
        with torch.no_grad():
            param.mul_(1.01)
        freezer.update()
    assert freezer.frozen() == 0
