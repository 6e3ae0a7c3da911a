"""Calibration tables: TensorRT's cache and ncnn's int8 table, golden files and round trips."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from qdq.cli import main
from qdq.config import RUN_PRESETS
from qdq.errors import ModelError
from qdq.pipeline import quantize_model
from qdq.report.tables import (
    Layer,
    Ranges,
    ncnn_layer_names,
    ncnn_table,
    parse_ncnn_table,
    parse_tensorrt_cache,
    read_ranges,
    symmetric_amax,
    tensorrt_cache,
)

from conftest import DIGITS

GOLDEN = Path(__file__).parent / "golden"
# amax 127 -> scale 1.0 = 0x3f800000; 2.54 -> 0.02 = 0x3ca3d70a; 63.5 -> 0.5 = 0x3f000000
RANGES = Ranges(
    {"x": 127.0, "input": 2.54, "relu1": 63.5},
    (
        # 127 / 1.27 = 100, 127 / 2.54 = 50; input 127 / 2.54 = 50
        Layer("conv1", "input", np.array([1.27, 2.54]), winograd=False),
        # 127 / 40 = 3.175; input 127 / 63.5 = 2
        Layer("fc", "relu1", np.array([40.0]), winograd=False),
    ),
)


def test_tensorrt_cache_matches_its_golden_file():
    assert tensorrt_cache(RANGES) == (GOLDEN / "tensorrt.cache").read_text()


def test_tensorrt_cache_reads_the_documented_example():
    # ONNX Runtime's TensorRT provider documents the cache with this line (tensorrt_execution_
    # provider_utils.h): 0x4000889d = 2^1 * (1 + 0x00889d / 2^23) = 2.008338
    scales = parse_tensorrt_cache("TRT-7103-EntropyCalibration2\ndata_0: 4000889d\n")
    assert scales == {"data_0": pytest.approx(2.008338, abs=1e-6)}


def test_tensorrt_cache_round_trips_scales_bit_for_bit():
    scales = parse_tensorrt_cache(tensorrt_cache(RANGES))
    for name, amax in RANGES.activations.items():
        assert scales[name] == np.float32(amax / 127)


def test_tensorrt_cache_keeps_names_with_colons_and_spaces():
    ranges = Ranges({"(Unnamed Layer* 4) [Fully Connected]_output": 127.0, "a:b": 127.0}, ())
    assert set(parse_tensorrt_cache(tensorrt_cache(ranges))) == set(ranges.activations)


def test_malformed_cache_line_is_refused_with_its_number():
    with pytest.raises(ModelError, match="line 2"):
        parse_tensorrt_cache("TRT-8601-EntropyCalibration2\nx 3f800000\n")


def test_ncnn_table_matches_its_golden_file():
    assert ncnn_table(RANGES) == (GOLDEN / "ncnn.table").read_text()


def test_ncnn_table_round_trips_scales():
    table = parse_ncnn_table(ncnn_table(RANGES, {"conv1": "convrelu_0"}))
    np.testing.assert_allclose(table["convrelu_0_param_0"], [100.0, 50.0])
    np.testing.assert_allclose(table["convrelu_0"], [50.0])
    np.testing.assert_allclose(table["fc"], [2.0])


def test_ncnn_winograd_convolutions_get_6_bit_weight_scales():
    # ncnn2table: a 3x3 stride-1 convolution runs as int8 Winograd, weights on 31 levels
    ranges = Ranges({"input": 127.0}, (Layer("c", "input", np.array([3.1]), winograd=True),))
    assert parse_ncnn_table(ncnn_table(ranges))["c_param_0"] == pytest.approx([10.0])


@pytest.mark.parametrize(
    ("scale", "zero_point", "dtype", "amax"),
    [
        (0.02, 0, np.uint8, 5.1),  # uint8 [0, 5.1]: all 255 codes above zero
        (0.02, 128, np.uint8, 2.56),  # uint8 [-2.56, 2.54]: the wider side
        (0.5, 0, np.int8, 63.5),  # symmetric int8: amax / 127 gives the scale back
        (0.02, -128, np.int8, 5.1),  # int8 asymmetric over [0, 5.1]
        (0.1, 20, np.int8, 14.8),  # int8 asymmetric over [-14.8, 10.7]: its code -128 too
    ],
)
def test_symmetric_amax_is_the_wider_side_of_the_grid(scale, zero_point, dtype, amax):
    got = symmetric_amax(np.float32(scale), np.array(zero_point, dtype), np.dtype(dtype))
    assert float(got) == pytest.approx(amax, rel=1e-6)


@pytest.fixture(scope="module")
def cnn_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tables") / "cnn_int8.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz")
    return out


def test_ranges_come_from_the_models_qdq_pairs(cnn_int8):
    model = onnx.load(str(cnn_int8))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    ranges = read_ranges(model)
    # the input's uint8 grid: amax = (255 - zp) * scale
    scale, zero_point = inits["input_scale"], inits["input_zero_point"]
    want = float(scale) * max(int(zero_point), 255 - int(zero_point))
    assert ranges.activations["input"] == pytest.approx(want)
    assert [layer.node for layer in ranges.layers] == ["/0/Conv", "/3/Conv", "/7/Conv", "/12/Gemm"]
    assert [len(layer.weight_amax) for layer in ranges.layers] == [16, 32, 64, 10]


def test_a_symmetric_int8_scale_passes_to_tensorrt_unchanged(tmp_path):
    out = tmp_path / "trt.onnx"
    config = replace(RUN_PRESETS["tensorrt"], smoothing=False)  # a table's file: unsmoothed
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    model = onnx.load(str(out))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    scales = parse_tensorrt_cache(tensorrt_cache(read_ranges(model)))
    assert scales["input"] == inits["input_scale"]


def test_ncnn_names_come_from_the_converters_param_file(cnn_int8):
    # the layer lines pnnx writes for examples/digits/cnn.onnx (in order, num_output in 0=)
    param = "\n".join(
        [
            "7767517",
            "7 7",
            "Input in0 0 1 in0",
            "Convolution convrelu_0 1 1 in0 1 0=16 1=3 6=144 9=1",
            "Convolution convrelu_1 1 1 1 2 0=32 1=3 6=4608 9=1",
            "Pooling maxpool2d_1 1 1 2 3 0=0 1=2",
            "Convolution convrelu_2 1 1 3 4 0=64 1=3 6=18432 9=1",
            "Pooling gap_0 1 1 4 5 0=1 4=1",
            "InnerProduct linear_8 1 1 5 out0 0=10 1=1 2=640",
        ]
    )
    names = ncnn_layer_names(param, read_ranges(onnx.load(str(cnn_int8))))
    assert names == {
        "/0/Conv": "convrelu_0",
        "/3/Conv": "convrelu_1",
        "/7/Conv": "convrelu_2",
        "/12/Gemm": "linear_8",
    }
    with pytest.raises(ModelError, match="convert the same model"):
        ncnn_layer_names(param.replace("0=32", "0=33"), read_ranges(onnx.load(str(cnn_int8))))


def test_export_table_command_writes_both_formats(cnn_int8, tmp_path):
    assert (
        main(["export-table", str(cnn_int8), "--format", "tensorrt", "-o", str(tmp_path / "c")])
        == 0
    )
    cache = (tmp_path / "c").read_text()
    assert cache.startswith("TRT-8601-EntropyCalibration2\ninput: ")
    assert main(["export-table", str(cnn_int8), "--format", "ncnn", "-o", str(tmp_path / "t")]) == 0
    assert set(parse_ncnn_table((tmp_path / "t").read_text())) >= {"/0/Conv_param_0", "/0/Conv"}


def test_export_table_refuses_a_model_qdq_did_not_write(tmp_path, capsys):
    out = tmp_path / "c"
    assert (
        main(["export-table", str(DIGITS / "cnn.onnx"), "--format", "tensorrt", "-o", str(out)])
        == 2
    )
    assert "qdq quantize" in capsys.readouterr().err
    assert not out.exists()


def test_quantize_writes_the_table_beside_the_model(tmp_path):
    model, table = tmp_path / "q.onnx", tmp_path / "q.cache"
    args = ["quantize", str(DIGITS / "cnn.onnx"), "-o", str(model)]
    args += ["--calib", str(DIGITS / "calib.npz"), "--table", f"tensorrt:{table}"]
    assert main(args) == 0
    assert parse_tensorrt_cache(table.read_text()) == parse_tensorrt_cache(
        tensorrt_cache(read_ranges(onnx.load(str(model))))
    )


@pytest.mark.parametrize("flag", ["onnx:t.cache", "tensorrt:", "tensorrt:q.onnx"])
def test_bad_table_flags_are_refused_before_any_work(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    args = ["quantize", str(DIGITS / "cnn.onnx"), "-o", "q.onnx"]
    assert main([*args, "--calib", str(DIGITS / "calib.npz"), "--table", flag]) == 2
    assert "--table" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("flag", [["--activation-dtype", "uint8"], ["--format", "qoperator"]])
def test_the_tensorrt_preset_refuses_flags_that_undo_its_format(tmp_path, capsys, flag):
    """uint8 activations (zero point 128) and QLinear ops are no file TensorRT parses."""
    args = ["quantize", str(DIGITS / "cnn.onnx"), "-o", str(tmp_path / "q.onnx")]
    args += ["--calib", str(DIGITS / "calib.npz"), "--preset", "tensorrt", *flag]
    assert main(args) == 2
    assert f"drop {' '.join(flag)} or the preset" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_hex_is_the_big_endian_float32():
    # the cache's digits are the float's bits, most significant first: 0.02 = 0x3ca3d70a
    assert struct.pack(">f", 0.02).hex() == "3ca3d70a"


def test_a_smoothed_model_gives_no_table_and_quantize_table_does_not_smooth(tmp_path, capsys):
    """SmoothQuant divides the digits transformer's MatMul inputs: a table named tensors the
    float model lacks (`..._smoothed`), with ranges of the divided tensors."""
    smoothed, plain = tmp_path / "smoothed.onnx", tmp_path / "plain.onnx"
    args = [str(DIGITS / "transformer.onnx"), "--calib", str(DIGITS / "calib.npz")]
    assert main(["quantize", args[0], "-o", str(smoothed), *args[1:]]) == 0
    assert any(n.name.endswith("_smooth") for n in onnx.load(str(smoothed)).graph.node)
    table = tmp_path / "t.cache"
    assert main(["export-table", str(smoothed), "--format", "tensorrt", "-o", str(table)]) == 2
    assert "--no-smoothing" in capsys.readouterr().err
    assert (
        main(["quantize", args[0], "-o", str(plain), *args[1:], "--table", f"tensorrt:{table}"])
        == 0
    )
    float_names = {name for n in onnx.load(str(DIGITS / "transformer.onnx")).graph.node
                   for name in (*n.input, *n.output)}  # fmt: skip
    assert set(parse_tensorrt_cache(table.read_text())) <= float_names
