"""`qdq finetune` on the digits CNN: the torch copy agrees with ONNX Runtime, fine-tuning
raises the 4-bit output SQNR that PTQ leaves, and the file is the one `qdq quantize` writes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qdq.cli import main
from qdq.config import preset_config
from qdq.errors import ModelError
from qdq.onnx.sessions import Use, open_session
from qdq.pipeline import quantize_model
from qdq.qat import finetune
from qdq.qat.convert import QdqGraph
from qdq.qat.finetune import FinetuneOptions, finetune_model
from qdq.qat.write import write_back

from conftest import DIGITS, digits_cnn_sqnr

# 4-bit weights, every layer int8 (no float layer bought back): where PTQ is poor (~18 dB).
CONFIG = preset_config("default", weight_bits=4, sequential_bias_correction=False, prefer="speed")
OPTIONS = FinetuneOptions(steps=150, lr=0.01, batch_size=16, evaluate_every=25, threads=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(PTQ model, fine-tuned model) of the digits CNN at 4-bit weights."""
    folder = tmp_path_factory.mktemp("finetune")
    ptq, tuned = folder / "ptq.onnx", folder / "tuned.onnx"
    quantize_model(DIGITS / "cnn.onnx", ptq, DIGITS / "calib.npz", CONFIG)
    finetune_model(DIGITS / "cnn.onnx", tuned, DIGITS / "calib.npz", CONFIG, OPTIONS, seed=0)
    return ptq, tuned


def _sqnr(want: np.ndarray, got: np.ndarray) -> float:
    want = want.astype(np.float64)
    return float(10 * np.log10(np.sum(want**2) / max(np.sum((want - got) ** 2), 1e-30)))


def test_torch_copy_runs_as_onnx_runtime_runs_the_qdq_file(pair: tuple[Path, Path]) -> None:
    x = np.load(DIGITS / "test.npz")["input"][:64]
    graph = QdqGraph(onnx.load(pair[0]), CONFIG.weights, CONFIG.activations)
    with torch.no_grad():
        got = graph({"input": torch.from_numpy(x)})[0].numpy()
    want = open_session(pair[0]).run(None, {"input": x})[0]
    assert _sqnr(want, got) > 40  # fake quantization == the int8 kernels, up to 1-LSB ties


def test_finetuning_raises_4bit_output_sqnr_over_ptq(pair: tuple[Path, Path]) -> None:
    # Measured on the 540 test images, none of which training saw: PTQ 18.3 dB, tuned 22-23.
    ptq, tuned = digits_cnn_sqnr(pair[0]), digits_cnn_sqnr(pair[1])
    assert tuned > ptq + 2.0, (ptq, tuned)


def test_finetuned_file_is_fused_exactly_as_ptq(pair: tuple[Path, Path], tmp_path: Path) -> None:
    models = [onnx.load(p) for p in pair]
    assert [n.op_type for n in models[0].graph.node] == [n.op_type for n in models[1].graph.node]
    shapes = [{t.name: (t.data_type, tuple(t.dims)) for t in m.graph.initializer} for m in models]
    assert shapes[0] == shapes[1]
    fused = []
    for i, path in enumerate(pair):
        optimized = tmp_path / f"optimized{i}.onnx"
        open_session(path, Use.REWRITE, optimized_path=optimized)
        fused.append(Counter(n.op_type for n in onnx.load(optimized).graph.node))
    assert fused[0] == fused[1]
    assert fused[0]["QLinearConv"] > 0


def test_finetuning_ternary_weights_keeps_their_codes_and_raises_sqnr(tmp_path: Path) -> None:
    # Measured on the 540 test images: PTQ 5.2 dB (93.1% of labels), tuned 7.1 dB (96.3%).
    config = preset_config("default", weight_grid="ternary", sequential_bias_correction=False)
    ptq, tuned = tmp_path / "ptq.onnx", tmp_path / "tuned.onnx"
    quantize_model(DIGITS / "cnn.onnx", ptq, DIGITS / "calib.npz", config)
    finetune_model(DIGITS / "cnn.onnx", tuned, DIGITS / "calib.npz", config, OPTIONS, seed=0)
    assert digits_cnn_sqnr(tuned) > digits_cnn_sqnr(ptq) + 1.0
    model = onnx.load(tuned)
    weights = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    codes = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    int8 = [codes[w] for w in weights if w in codes and codes[w].dtype == np.int8]
    assert len(int8) == 4  # the CNN's four weights, on the {-1, 0, 1} grid times their scales
    assert all(set(np.unique(c)) <= {-1, 0, 1} for c in int8)


def test_scales_after_a_relu6_stay_where_onnx_runtime_drops_the_clip(tmp_path: Path) -> None:
    """A ReLU6 output's grid spans [0, 6] exactly; a scale learned a hair larger would keep the
    Clip in ONNX Runtime, and the Conv before it would run in float (EfficientNet-Lite0 lost 3
    of 48 QLinearConvs that way). The learned scale is held at the largest that fuses."""
    ptq = tmp_path / "ptq.onnx"
    config = preset_config("default", prefer="int8")
    quantize_model(DIGITS / "mobilenet.onnx", ptq, DIGITS / "calib.npz", config)
    graph = QdqGraph(onnx.load(ptq), config.weights, config.activations)
    bounded = [g for g in graph.grids.values() if g.max_scale is not None]
    assert len(bounded) == 7  # one per Clip
    with torch.no_grad():
        for grid in bounded:
            grid.scale.mul_(1.01)
    fused = []
    for i, model in enumerate([onnx.load(ptq), write_back(onnx.load(ptq), graph)]):
        optimized = tmp_path / f"optimized{i}.onnx"
        open_session(model, Use.REWRITE, optimized_path=optimized)
        fused.append(Counter(n.op_type for n in onnx.load(optimized).graph.node))
    assert fused[1] == fused[0]
    assert fused[0]["QLinearConv"] == 7


def test_cli_finetunes_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tuned.onnx"
    args = ["finetune", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    code = main([*args, str(DIGITS / "calib.npz"), "--steps", "4", "--max-samples", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fine-tuned 4 steps" in printed
    assert "PTQ -> fine-tuned" in printed
    open_session(out).run(None, {"input": np.load(DIGITS / "test.npz")["input"][:2]})


def test_cli_distils_the_output_parts_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tuned.onnx"
    args = ["finetune", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    args += [str(DIGITS / "calib.npz"), "--steps", "2", "--max-samples", "32"]
    assert main([*args, "--output-parts", "logits:1:0-5,5-10"]) == 0
    printed = capsys.readouterr().out
    assert "'logits' mse per part (logits[:, 0:5], logits[:, 5:10])" in printed
    assert "'logits[:, 5:10]'" in printed  # the held-out SQNR, per part


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "0"], "--lr must be in (0, 256]"),
        (["--patience", "0"], "--patience"),
        (["--freeze-oscillations", "1.5"], "--freeze-oscillations must be in (0, 1)"),
        (["--margin-weight", "-1"], "--margin-weight must be >= 0"),
        (["--margin-weight", "1", "--class-logits", "nope"], "not float outputs"),
        (["--class-logits", "logits"], "give either too"),
        (["--weight-bits", "9"], "--weight-bits 9"),
        (["--output-parts", "nope:1:0-4"], "nope"),
    ],
)
def test_cli_refuses_bad_flags_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    out = tmp_path / "tuned.onnx"
    args = ["finetune", str(DIGITS / "cnn.onnx"), "-o", str(out)]
    assert main([*args, "--calib", str(DIGITS / "calib.npz"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_missing_calibration_data(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tuned.onnx"
    code = main(["finetune", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib", "nope.npz"])
    assert code == 2
    assert "nope.npz does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_a_file_that_scores_lower_in_onnx_runtime_is_not_written(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch copy rounds a few ties unlike ONNX Runtime, so its held-out loss can fall
    while the file's SQNR falls too: the user then gets PTQ's model, never a worse one."""
    scores = iter([20.0, 19.0])  # ONNX Runtime's held-out SQNR: PTQ, then fine-tuned
    monkeypatch.setattr(finetune, "_output_sqnr", lambda *_: {"logits": next(scores)})
    options = FinetuneOptions(steps=25, lr=0.01, batch_size=16, evaluate_every=25, threads=1)
    out = tmp_path / "tuned.onnx"
    report = finetune_model(
        DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", CONFIG, options, seed=0, start=pair[0]
    )
    assert report.kept_ptq
    assert "wrote the PTQ model" in report.summary(out)
    written, ptq = (onnx.load(p).graph.initializer for p in (out, pair[0]))
    assert [t.SerializeToString() for t in written] == [t.SerializeToString() for t in ptq]


def test_a_start_quantized_from_another_model_is_refused(tmp_path: Path) -> None:
    """The quantized MobileNet as the digits CNN's start: it was trained to mimic the CNN and
    written as the CNN's fine-tuned model, rc 0."""
    other = tmp_path / "mobilenet_int8.onnx"
    quantize_model(DIGITS / "mobilenet.onnx", other, DIGITS / "calib.npz", CONFIG)
    out = tmp_path / "tuned.onnx"
    with pytest.raises(ModelError, match="was not quantized from this model"):
        finetune_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", CONFIG, start=other)
    assert not out.exists()
    # the same graph with other weights (another checkpoint): its names all match
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    for weight in model.graph.initializer:
        weight.CopyFrom(numpy_helper.from_array(-1.7 * numpy_helper.to_array(weight), weight.name))
    onnx.save(model, tmp_path / "v2.onnx")
    quantize_model(tmp_path / "v2.onnx", other, DIGITS / "calib.npz", CONFIG)
    with pytest.raises(ModelError, match="not quantized from this model's weights"):
        finetune_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", CONFIG, start=other)
    assert not out.exists()


def test_a_start_of_another_form_or_grid_is_refused(tmp_path: Path) -> None:
    """A QOperator start was said to come from another model; a 4-bit one was fine-tuned under
    an 8-bit config."""
    cnn, calib, out = DIGITS / "cnn.onnx", DIGITS / "calib.npz", tmp_path / "t.onnx"
    options = FinetuneOptions(steps=2)
    qoperator, four_bit = tmp_path / "qop.onnx", tmp_path / "four.onnx"
    quantize_model(cnn, qoperator, calib, CONFIG, output_format="qoperator")
    with pytest.raises(ModelError, match="is not a QDQ file"):
        finetune_model(cnn, out, calib, CONFIG, options, start=qoperator)
    quantize_model(cnn, four_bit, calib, CONFIG)
    with pytest.raises(ModelError, match="holds uniform:4 weights"):
        finetune_model(cnn, out, calib, preset_config("default"), options, start=four_bit)


def test_an_fp32_output_of_nan_is_refused_before_training(tmp_path):
    """The square root of a negative sum: FP32 gives NaN, and training on it had made NaN
    weights and let numpy's cast warning out before writing PTQ's file."""
    from onnx import TensorProto, helper, numpy_helper

    from qdq.errors import DataError

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
             helper.make_node("Sqrt", ["g"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "nan_output", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w")])  # fmt: skip
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 8)).astype(np.float32))
    with pytest.raises(DataError, match="holds NaN or Inf on the training samples"):
        finetune_model(tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "c.npz",
                       options=FinetuneOptions(steps=2, threads=1))  # fmt: skip
    assert not (tmp_path / "o.onnx").exists()
