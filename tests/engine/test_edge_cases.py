"""The engine against ONNX Runtime where a review found them apart: weights computed at run
time, unnamed nodes sharing a weight, empty batches, NaN, per-row scales, a bias added after
the product, a Resize of codes, and outputs named as numpy.savez's own arguments."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.engine import Engine
from qdq.engine.cli import run_command
from qdq.errors import ModelError

U8, I8, F = TensorProto.UINT8, TensorProto.INT8, TensorProto.FLOAT
KERNELS = ["numpy", "compiled"]


def make(nodes: list, inputs: dict, outputs: list[str], constants: dict) -> onnx.ModelProto:
    """A model of `nodes` with `inputs` (name -> (elem type, shape)), opset 21 and
    com.microsoft 1."""
    graph = helper.make_graph(
        nodes,
        "edge",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def ort_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same(model: onnx.ModelProto, feeds: dict, engine: Engine | None = None) -> None:
    """The engine's float-requantization run equals ONNX Runtime's, bit for bit."""
    engine = engine or Engine(model, requant="float")
    got = engine.run(feeds)
    for output, want in zip(model.graph.output, ort_outputs(model, feeds), strict=True):
        np.testing.assert_array_equal(got[output.name], want, err_msg=output.name)


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_weight_computed_at_run_time_is_read_again_each_run(kernels):
    """The compiled convolution kept its prepared weight while the array was the same object,
    and a run-time weight comes in the same reused array with new values."""
    q = {"xs": np.float32(0.02), "xz": np.uint8(128), "ws": np.float32(0.02), "wz": np.int8(0),
         "ys": np.float32(0.05), "yz": np.uint8(128)}  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"]),
        helper.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["y"],
                         pads=[1] * 4),
    ]  # fmt: skip
    model = make(nodes, {"x": (F, [1, 4, 8, 8]), "w": (F, [6, 4, 3, 3])}, ["y"], q)
    engine = Engine(model, requant="float", kernels=kernels)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    first, second = (rng.standard_normal((6, 4, 3, 3)).astype(np.float32) for _ in range(2))
    for w in (first, second, first):
        assert_same(model, {"x": x, "w": w}, engine)


@pytest.mark.parametrize("kernels", KERNELS)
def test_unnamed_convolutions_sharing_a_weight_keep_their_own_geometry(kernels):
    w = np.random.default_rng(1).integers(-100, 100, (4, 1, 3, 3)).astype(np.int8)
    q = {"xs": np.float32(0.02), "xz": np.uint8(7), "ws": np.float32(0.01), "wz": np.int8(0),
         "ys": np.float32(0.05), "yz": np.uint8(100), "w": w}  # fmt: skip
    reads = ["xs", "xz", "w", "ws", "wz", "ys", "yz"]
    nodes = [
        helper.make_node("QLinearConv", ["x1", *reads], ["y1"], group=4),
        helper.make_node("QLinearConv", ["x2", *reads], ["y2"], group=1),
    ]
    model = make(nodes, {"x1": (U8, [1, 4, 6, 6]), "x2": (U8, [1, 1, 6, 6])}, ["y1", "y2"], q)
    rng = np.random.default_rng(2)
    feeds = {name: rng.integers(0, 256, (1, c, 6, 6)).astype(np.uint8)
             for name, c in (("x1", 4), ("x2", 1))}  # fmt: skip
    assert_same(model, feeds, Engine(model, requant="float", kernels=kernels))


@pytest.mark.parametrize("kernels", KERNELS)
def test_nan_and_empty_inputs_quantize_as_onnx_runtime_does(kernels):
    """NaN takes the lowest code; DynamicQuantizeLinear of nothing, or of zeros, has scale 1
    (an empty batch had ended in a traceback)."""
    for zero in (np.uint8(3), np.int8(3)):
        node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
        model = make([node], {"x": (F, [None])}, ["q"], {"s": np.float32(0.1), "z": zero})
        x = np.array([np.nan, np.inf, -np.inf, 1e30, 0.0, 2.5], np.float32)
        assert_same(model, {"x": x}, Engine(model, requant="float", kernels=kernels))
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["d", "ds", "dz"])
    model = make([node], {"x": (F, [None])}, ["d", "ds", "dz"], {})
    engine = Engine(model, requant="float", kernels=kernels)
    for x in ([], [0.0, 0.0], [-1.0, 0.5, 3.0]):
        assert_same(model, {"x": np.array(x, np.float32)}, engine)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(("group", "channels"), [(1, 3), (2, 4), (2, 2)])
def test_an_empty_batch_runs_through_a_convolution(kernels, group, channels):
    """Dense, grouped and depthwise with a multiplier (the compiled grouped kernel had tiled
    nothing by zero: a ValueError)."""
    shape = (4, channels // group, 3, 3)
    w = np.random.default_rng(1).integers(-100, 100, shape).astype(np.int8)
    q = {"xs": np.float32(0.02), "xz": np.uint8(7), "ws": np.float32(0.01), "wz": np.int8(0),
         "ys": np.float32(0.05), "yz": np.uint8(100), "w": w}  # fmt: skip
    reads = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    node = helper.make_node("QLinearConv", reads, ["y"], group=group)
    model = make([node], {"x": (U8, ["N", channels, 7, 7])}, ["y"], q)
    feeds = {"x": np.zeros((0, channels, 7, 7), np.uint8)}
    assert_same(model, feeds, Engine(model, requant="float", kernels=kernels))


def test_a_per_row_a_scale_scales_rows():
    """ONNX allows a_scale per row of A (b_scale is per column): codes as the real arithmetic
    gives them (ONNX Runtime refuses such a model, so the reference is written out)."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (4, 6)).astype(np.uint8)
    b = rng.integers(-50, 50, (6, 4)).astype(np.int8)
    a_scale = np.array([0.01, 0.02, 0.04, 0.08], np.float32)
    constants = {"as": a_scale, "az": np.uint8(128), "b": b, "bs": np.float32(0.02),
                 "bz": np.int8(0), "ys": np.float32(0.05), "yz": np.uint8(128)}  # fmt: skip
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    model = make([node], {"a": (U8, [4, 6])}, ["y"], constants)
    real = ((a.astype(np.float64) - 128) * a_scale[:, None]) @ (b.astype(np.float64) * 0.02)
    want = np.clip(np.rint(real / 0.05) + 128, 0, 255)
    for requant in ("float", "spec"):
        got = Engine(model, requant=requant).run({"a": a})["y"]
        assert np.abs(got.astype(np.int64) - want).max() <= 1, requant


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("terms", [5, 2048])
def test_a_bias_after_the_integer_product_adds_in_float32(kernels, terms):
    """The product is scaled as float32(sum) * scale, as ONNX Runtime does: past 2^24 (2048
    terms of large codes) float64 arithmetic had rounded 7 of 32 values the other way."""
    rng = np.random.default_rng(4)
    constants = {"b": rng.integers(100, 128, (terms, 6)).astype(np.int8),
                 "as": np.float32(0.0173), "bs": np.float32(0.0291), "az": np.uint8(3),
                 "bias": rng.standard_normal(6).astype(np.float32) * 10}  # fmt: skip
    node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "as", "bs", "az", "", "bias"],
                            ["y"], domain="com.microsoft")  # fmt: skip
    model = make([node], {"a": (U8, [10, terms])}, ["y"], constants)
    a = rng.integers(200, 256, (10, terms)).astype(np.uint8)
    assert_same(model, {"a": a}, Engine(model, requant="float", kernels=kernels))


@pytest.mark.parametrize("requant", ["float", "spec"])
@pytest.mark.parametrize("shape", [(1, 9, 3), (2, 5, 3, 4), (2, 2, 3, 4, 5)])
def test_a_channels_last_global_pool_averages_the_spatial_axes(requant, shape):
    """Of any rank: the axes between batch and channels (a 3-D input had averaged its channels
    too, a 5-D one had kept an axis)."""
    constants = {"s": np.float32(0.02), "z": np.uint8(100), "ys": np.float32(0.01),
                 "yz": np.uint8(3)}  # fmt: skip
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "s", "z", "ys", "yz"], ["y"],
                            channels_last=1, domain="com.microsoft")  # fmt: skip
    model = make([node], {"x": (U8, list(shape))}, ["y"], constants)
    x = np.random.default_rng(5).integers(0, 256, shape).astype(np.uint8)
    assert_same(model, {"x": x}, Engine(model, requant=requant))


def test_a_resize_of_codes_is_no_float_node():
    constants = {"scales": np.array([1, 1, 2, 2], np.float32)}
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", name="up")
    model = make([node], {"x": (U8, [1, 2, 3, 3])}, ["y"], constants)
    engine = Engine(model, requant="float")
    assert_same(model, {"x": np.arange(18, dtype=np.uint8).reshape(1, 2, 3, 3)}, engine)
    assert engine.float_nodes == []


def test_run_writes_outputs_named_as_savez_arguments(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], [name]) for name in ("file", "allow_pickle")]
    model = make(nodes, {"x": (F, [2, 3])}, [], {})
    model.graph.output.extend(
        helper.make_tensor_value_info(name, F, [2, 3]) for name in ("file", "allow_pickle")
    )
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 3), np.float32))
    for engine in ("integer", "ort"):
        run_command(str(tmp_path / "m.onnx"), str(tmp_path / "x.npz"), str(tmp_path / "y.npz"),
                    engine, "fixed", 32)  # fmt: skip
        with np.load(tmp_path / "y.npz") as written:
            assert sorted(written.files) == ["allow_pickle", "file"]


def test_an_op_onnx_runtime_cannot_run_is_named():
    """A custom op the engine hands to ONNX Runtime alone: its raw Fail had come through."""
    node = helper.make_node("Foo", ["x"], ["y"], domain="my.domain")
    model = make([node], {"x": (F, [2])}, ["y"], {})
    model.opset_import.append(helper.make_opsetid("my.domain", 1))
    with pytest.raises(ModelError, match=r"node '' \(Foo\): ONNX Runtime cannot run it"):
        Engine(model).run({"x": np.zeros(2, np.float32)})


def test_unnamed_nodes_keep_their_own_accumulator_counts():
    w = np.full((4, 4), 127, np.int8)
    q = {"s": np.float32(1.0), "z": np.uint8(0), "w": w, "ws": np.float32(1.0),
         "wz": np.int8(0), "ys": np.float32(1.0), "yz": np.uint8(0)}  # fmt: skip
    reads = ["s", "z", "w", "ws", "wz", "ys", "yz"]
    nodes = [helper.make_node("QLinearMatMul", [x, *reads[:2], *reads[2:]], [y])
             for x, y in (("a", "y1"), ("b", "y2"))]  # fmt: skip
    model = make(nodes, {"a": (U8, [2, 4]), "b": (U8, [2, 4])}, ["y1", "y2"], q)
    engine = Engine(model, accumulator_bits=16)
    engine.run({"a": np.full((2, 4), 255, np.uint8), "b": np.zeros((2, 4), np.uint8)})
    counts = {o.node: o.overflows for o in engine.overflows()}
    assert len(counts) == 2
    assert sorted(counts.values()) == [0, 8]


def test_run_names_arrays_no_input_takes_and_unnamed_float_nodes(tmp_path):
    """`qdq run` had dropped a misspelt array without a word (the other commands name it),
    and listed an unnamed float node as " (Tanh)"."""
    model = make([helper.make_node("Tanh", ["x"], ["y"])], {"x": (F, [2, 3])}, [], {})
    model.graph.output.append(helper.make_tensor_value_info("y", F, [2, 3]))
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 3), np.float32), lables=np.zeros(2))
    said = run_command(str(tmp_path / "m.onnx"), str(tmp_path / "x.npz"),
                       str(tmp_path / "y.npz"), "integer", "fixed", 32)  # fmt: skip
    assert "arrays ['lables'] feed no model input" in said
    assert "node #0 (Tanh)" in said
