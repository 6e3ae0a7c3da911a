"""The torch copy computes each group ONNX Runtime fuses into a QLinearConv as ONNX Runtime does:
the same codes on every element, where float32 fake quantization lands a few ties apart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qdq.config import preset_config
from qdq.onnx.sessions import open_session
from qdq.pipeline import quantize_model
from qdq.qat.convert import QdqGraph
from qdq.qat.filecodes import dequantized, expose_codes

from conftest import DIGITS

# every layer the rules allow in int8: the most fused groups
CONFIG = preset_config("default", prefer="int8")


def _codes_against_onnx_runtime(path: Path, exact: bool) -> tuple[int, int, int]:
    """(fused groups, codes that differ from ONNX Runtime's, codes) on 256 test digits."""
    model = onnx.load(path)
    fused = list(QdqGraph(model, CONFIG.weights, CONFIG.activations).fused)
    for name in fused:  # ONNX Runtime still fuses a group whose output is also a graph output
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    x = np.load(DIGITS / "test.npz")["input"][:256]
    want = open_session(model).run(fused, {"input": x})
    graph = QdqGraph(model, CONFIG.weights, CONFIG.activations)
    if not exact:
        graph.fused = {}
    with torch.no_grad():
        got = graph({"input": torch.from_numpy(x)})[1:]
    scales = {n.output[0]: n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    differ = 0
    for name, ort_codes, value in zip(fused, want, got, strict=True):
        codes = graph.grids[graph.group[scales[name]]].codes(value).numpy()
        differ += int(np.sum(codes != ort_codes))
    return len(fused), differ, sum(w.size for w in want)


@pytest.mark.parametrize("name", ["cnn", "mobilenet"])
def test_fused_convolutions_give_onnx_runtimes_codes(name: str, tmp_path: Path) -> None:
    # Measured: fake quantization alone differs on 98 of 1.05M codes (cnn), 167 of 1.97M
    # (mobilenet, whose ReLU6 Clips ONNX Runtime drops into the QLinearConv).
    path = tmp_path / f"{name}.onnx"
    quantize_model(DIGITS / f"{name}.onnx", path, DIGITS / "calib.npz", CONFIG)
    groups, differ, total = _codes_against_onnx_runtime(path, exact=True)
    assert groups >= 3
    assert total > 10**6
    assert differ == 0
    assert _codes_against_onnx_runtime(path, exact=False)[1] > 0  # what the emulation fixes


def test_the_files_codes_carry_the_copy_past_float_ops(tmp_path: Path) -> None:
    # The recognizer's speed plan keeps its depthwise convolutions float: torch's and ONNX
    # Runtime's float sums round apart there, and the copies drift. Carrying ONNX Runtime's
    # codes (as `qdq finetune` trains), the copy's codes and outputs are the file's.
    # Measured on the 540 test digits at four contrasts: 84 of 17M codes differ without (on
    # the 540 alone 26 did, none since the percentile's one-sided ranges: a rare event).
    model = onnx.load(DIGITS / "mobilenet.onnx")
    depthwise = tuple(
        n.name for n in model.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute)
    )
    assert depthwise
    config = replace(CONFIG, exclude=depthwise)
    path = tmp_path / "float_depthwise.onnx"
    quantize_model(DIGITS / "mobilenet.onnx", path, DIGITS / "calib.npz", config)
    quantized = onnx.load(path)
    digits = np.load(DIGITS / "test.npz")["input"]
    x = np.concatenate([digits * np.float32(1 + 0.01 * k) for k in range(4)])
    plain = open_session(quantized).run(None, {"input": x})[0]
    grids = expose_codes(quantized)  # now also the torch copy's outputs
    values = open_session(quantized).run(None, {"input": x})
    assert len(grids) >= 5
    assert np.array_equal(values[0], plain)  # the same fused groups: the same outputs
    known = {name: dequantized(v, *grids[name]) for name, v in zip(grids, values[1:], strict=True)}
    graph = QdqGraph(quantized, config.weights, config.activations)
    scales = {
        n.output[0]: n.input[1] for n in quantized.graph.node if n.op_type == "QuantizeLinear"
    }

    def differ(got: list[torch.Tensor]) -> int:
        pairs = zip(grids, values[1:], got[1:], strict=True)
        return sum(
            int(np.sum(graph.grids[graph.group[scales[n]]].codes(g.detach()).numpy() != codes))
            for n, codes, g in pairs
        )

    feed = {"input": torch.from_numpy(x)}
    assert differ(graph(feed)) > 0  # what carrying fixes
    carried = graph(feed, known)
    assert differ(carried) == 0
    np.testing.assert_allclose(carried[0].detach().numpy(), plain, rtol=0, atol=1e-5)
    carried[0].square().sum().backward()  # the gradient still reaches every weight
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in graph.params.values())
