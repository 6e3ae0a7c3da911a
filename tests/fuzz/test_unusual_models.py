"""Valid models of unusual shape, each once an internal error: no float output, outputs no node
makes, tensors named as qdq's own, a Loop reading outer weights, string and sequence outputs.
Each is quantized (or run) and checked against FP32, or refused in one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hostile import Workspace, X, matmul_model, model_with, quantize, refused, run_contract, save
from onnx import numpy_helper

from qdq.errors import DataError
from qdq.metrics import ErrorStats


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def _thresholded_model() -> onnx.ModelProto:
    """x[N, 4] -> MatMul -> Greater -> a bool mask: a valid model with no float32 output."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        onnx.helper.make_node("Greater", ["h", "half"], ["y"], name="gt"),
    ]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BOOL, ["N", 4])
    return model_with(nodes, [x], [y], [weight, half])


def test_a_model_with_no_float_output_is_judged_where_it_decides_and_finetune_refuses_it(ws):
    """Every check compares float outputs with FP32's; with none, quantize had ended in an
    internal error (exit 1) and so had finetune, then planned blind (qdq.passes.decided): now
    the values the mask thresholds are judged, and the file outputs the mask alone."""
    save(_thresholded_model(), ws.model)
    np.savez(ws.calib, x=np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32))
    out = ws.folder / "out.onnx"
    result = run_contract(ws, quantize(ws), out, codes=(0,))
    assert "the float tensors its outputs are decided from ('h')" in result.stdout, result.stdout
    assert "output SQNR against FP32" in result.stdout
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["y"]
    x = np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32)
    want, got = (ort.InferenceSession(p).run(None, {"x": x})[0] for p in (ws.model, out))
    assert got.dtype == bool
    assert (got == want).mean() > 0.9
    args = ["finetune", ws.model, "-o", ws.folder / "ft.onnx", "--calib", ws.calib]
    refused(ws, args, "has no float32 output", ws.folder / "ft.onnx")


def test_tensors_named_as_qdqs_own_are_renamed_and_the_model_quantized(ws):
    """`x_quantized` beside `x` had made two definitions of one name (an internal error)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("w", (4, 3, 3, 3)), ("x_scale", (4, 4, 3, 3)))]  # fmt: skip
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w"], ["x_quantized"], name="conv"),
        onnx.helper.make_node("Relu", ["x_quantized"], ["x_dq"], name="relu"),
        onnx.helper.make_node("Conv", ["x_dq", "x_scale"], ["y"], name="conv2"),
    ]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 4, 4])
    save(model_with(nodes, [x], [y], inits), ws.model)
    out = ws.folder / "out.onnx"
    result = run_contract(ws, quantize(ws), out, codes=(0,))
    assert "renamed 3 tensors" in result.stdout, result.stdout
    want, got = (ort.InferenceSession(p).run(None, {"x": X})[0] for p in (ws.model, out))
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.99


def test_an_output_named_as_qdqs_own_tensors_is_refused(ws):
    model = onnx.load(ws.model)
    old = model.graph.output[0].name
    model.graph.output[0].name = "x_dq"  # the input is x
    for node in model.graph.node:
        node.output[:] = ["x_dq" if name == old else name for name in node.output]
    save(model, ws.model)
    refused(ws, quantize(ws), "rename them in the model")


@pytest.mark.parametrize("kind", ["input passed through", "constant"])
def test_an_output_no_node_makes_is_kept(ws, kind):
    """An output that is also the input, or folds to a constant, had made a file ONNX Runtime
    refuses (an internal error): both are kept exactly."""
    rng = np.random.default_rng(6)
    weight = numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w")
    const = numpy_helper.from_array(rng.normal(size=(1, 16)).astype(np.float32), "c")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8])
    if kind == "constant":  # y = c @ w; z = x @ w
        nodes = [onnx.helper.make_node("MatMul", ["c", "w"], ["y"], name="folded"),
                 onnx.helper.make_node("MatMul", ["x", "w"], ["z"], name="mm")]  # fmt: skip
        outputs = [y, onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 8])]
    else:  # outputs x itself and y = x @ w
        nodes, outputs = [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x, y]
    save(model_with(nodes, [x], outputs, [weight, const]), ws.model)
    np.savez(ws.calib, x=rng.normal(size=(32, 16)).astype(np.float32))
    out = ws.folder / "out.onnx"
    run_contract(ws, quantize(ws), out, codes=(0,))
    feed = {"x": rng.normal(size=(4, 16)).astype(np.float32)}
    want, got = (ort.InferenceSession(p).run(None, feed) for p in (ws.model, out))
    np.testing.assert_array_equal(got[0], want[0])  # the input, or the constant
    np.testing.assert_allclose(got[1], want[1], atol=0.1 * np.abs(want[1]).max())


def test_a_loop_whose_body_reads_an_outer_weight_is_quantized_and_run(ws):
    """The body's outer initializer was dropped from the quantized file and from the engine's
    one-node session (internal errors in quantize, finetune and run)."""
    h, rng = onnx.helper, np.random.default_rng(7)
    f32 = onnx.TensorProto.FLOAT
    body = h.make_graph(
        [h.make_node("MatMul", ["s_in", "w"], ["s_m"], name="body_mm"),
         h.make_node("Relu", ["s_m"], ["s_out"], name="body_relu"),
         h.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id")],
        "body",
        [h.make_tensor_value_info("iter", onnx.TensorProto.INT64, []),
         h.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         h.make_tensor_value_info("s_in", f32, ["N", 8])],
        [h.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         h.make_tensor_value_info("s_out", f32, ["N", 8])],
    )  # fmt: skip
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.normal(size=(8, 8)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(3, np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "w0"], ["x0"], name="pre"),
        h.make_node("Loop", ["trip", "cond", "x0"], ["y"], body=body, name="loop"),
    ]
    x, y = (h.make_tensor_value_info(n, f32, ["N", 8]) for n in "xy")
    save(model_with(nodes, [x], [y], inits), ws.model)
    np.savez(ws.calib, x=rng.normal(size=(32, 8)).astype(np.float32))
    out = ws.folder / "out.onnx"
    run_contract(ws, quantize(ws), out, codes=(0,))
    feed = {"x": rng.normal(size=(4, 8)).astype(np.float32)}
    want, got = (ort.InferenceSession(p).run(None, feed)[0] for p in (ws.model, out))
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    ran = ws.folder / "y.npz"
    run_contract(ws, ["run", ws.model, "--inputs", ws.calib, "-o", ran], ran, codes=(0,))


def test_a_model_without_nodes_is_said_to_compute_nothing(ws):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    save(model_with([], [x], [x]), ws.model)
    refused(ws, quantize(ws), "without nodes")


def test_run_writes_string_outputs_that_need_no_pickle_to_read(ws):
    """An object array had been written as a pickle, which qdq's own readers refuse."""
    cast = onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.STRING, name="cast")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.STRING, ["N", 4])
    save(model_with([cast], [x], [y]), ws.model)
    np.savez(ws.folder / "x.npz", x=np.ones((2, 4), np.float32))
    out = ws.folder / "y.npz"
    args = ["run", ws.model, "--inputs", ws.folder / "x.npz", "-o", out, "--engine", "ort"]
    run_contract(ws, args, out, codes=(0,))
    with np.load(out, allow_pickle=False) as saved:
        assert saved["y"].tolist() == [["1"] * 4] * 2


def test_an_integer_input_beside_a_float_one_named_like_its_scale_is_fine(ws):
    """`length` (int64) beside `length_scale` (float): qdq adds no scale beside an integer."""
    h = onnx.helper
    nodes = [
        h.make_node("Cast", ["length"], ["lf"], to=onnx.TensorProto.FLOAT, name="cast"),
        h.make_node("Add", ["lf", "length_scale"], ["s"], name="add"),
        h.make_node("MatMul", ["s", "w"], ["y"], name="mm"),
    ]
    w = numpy_helper.from_array(
        np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32), "w"
    )
    inputs = [
        h.make_tensor_value_info("length", onnx.TensorProto.INT64, ["N", 4]),
        h.make_tensor_value_info("length_scale", onnx.TensorProto.FLOAT, ["N", 4]),
    ]
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])
    save(model_with(nodes, inputs, [y], [w]), ws.model)
    rng = np.random.default_rng(9)
    np.savez(ws.calib, length=rng.integers(0, 9, (32, 4)),
             length_scale=rng.normal(size=(32, 4)).astype(np.float32))  # fmt: skip
    run_contract(ws, quantize(ws), ws.folder / "out.onnx", codes=(0,))


def test_run_writes_a_sequence_output_as_before(ws):
    """ONNX Runtime returns a list for a sequence: no dtype to look at."""
    h = onnx.helper
    node = h.make_node("SequenceConstruct", ["x"], ["s"], name="seq")
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    s = h.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, None)
    save(model_with([node], [x], [s]), ws.model)
    np.savez(ws.folder / "x.npz", x=np.ones((2, 4), np.float32))
    out = ws.folder / "y.npz"
    args = ["run", ws.model, "--inputs", ws.folder / "x.npz", "-o", out, "--engine", "ort"]
    run_contract(ws, args, out, codes=(0,))


def test_compare_measures_a_one_column_output_beside_labels(ws):
    """Labels beside an output that is no class scores ([N, 1]) are not checked as classes."""
    w = numpy_helper.from_array(
        np.random.default_rng(10).normal(size=(4, 1)).astype(np.float32), "w"
    )
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])
    save(model_with([node], [x], [y], [w]), ws.model)
    data = np.random.default_rng(11).normal(size=(32, 4)).astype(np.float32)
    np.savez(ws.calib, x=data, label=np.arange(32) % 2)
    out = ws.folder / "q.onnx"
    assert ws.run("quantize", ws.model, "-o", out, "--calib", ws.calib).code == 0
    run_contract(ws, ["compare", ws.model, out, "--data", ws.calib], None, codes=(0,))


def test_a_convolution_with_no_output_channels_is_kept_float(ws):
    """Its empty output reached the output-part search's reductions (exit 1)."""
    w = numpy_helper.from_array(np.zeros((0, 3, 3, 3), np.float32), "w")
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 0, 6, 6])
    save(model_with([node], [x], [y], [w]), ws.model)
    np.savez(ws.calib, x=np.random.default_rng(12).random((32, 3, 8, 8), np.float32))
    result = run_contract(ws, quantize(ws), ws.folder / "out.onnx", codes=(0,))
    assert "weight 'w' is empty" in result.stdout


def test_finetune_learns_from_the_float_output_beside_a_mask(ws):
    """A bool output beside the float one reached the loss's subtraction (exit 1)."""
    model = _thresholded_model()
    model.graph.output.append(onnx.helper.make_tensor_value_info("h", 1, ["N", 4]))
    save(model, ws.model)
    np.savez(ws.calib, x=np.random.default_rng(13).standard_normal((32, 4)).astype(np.float32))
    out = ws.folder / "ft.onnx"
    args = ["finetune", ws.model, "-o", out, "--calib", ws.calib, "--steps", "2"]
    assert ws.run(*args).code == 0  # (torch leaves its compiler's cache folder in the temp one)
    assert [o.name for o in ort.InferenceSession(out).get_outputs()] == ["y", "h"]


def _with_extra_output(node: onnx.NodeProto, output: onnx.ValueInfoProto) -> onnx.ModelProto:
    """x[N, 4] -> MatMul -> y[N, 4], and `node` reading y into the extra `output`."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])
    mm = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return model_with([mm, node], [x], [y, output], [weight])


@pytest.mark.parametrize(
    ("node", "output"),
    [  # each ended in an internal error of quantize, compare or report (sweep 4)
        (
            onnx.helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0, name="sum"),
            onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []),
        ),
        (
            onnx.helper.make_node("Cast", ["y"], ["s"], to=onnx.TensorProto.STRING, name="cast"),
            onnx.helper.make_tensor_value_info("s", onnx.TensorProto.STRING, ["N", 4]),
        ),
        (
            onnx.helper.make_node("SequenceConstruct", ["y", "y"], ["s"], name="seq"),
            onnx.helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, ["N", 4]),
        ),
    ],
    ids=["a scalar output", "a string output", "a sequence output"],
)
def test_quantize_compare_and_report_take_an_odd_second_output(ws, node, output):
    save(_with_extra_output(node, output), ws.model)
    np.savez(ws.calib, x=np.random.default_rng(16).standard_normal((32, 4)).astype(np.float32))
    out, report = ws.folder / "out.onnx", ws.folder / "r.html"
    run_contract(ws, quantize(ws), out, codes=(0,))
    run_contract(ws, ["compare", ws.model, out, "--data", ws.calib], None, codes=(0,))
    run_contract(ws, ["report", ws.model, out, "--data", ws.calib, "-o", report], report, (0,))


def test_an_output_empty_on_every_sample_is_no_class_score(ws):
    """(0, 4) rows (a detector finding nothing) were taken for class scores: 0 / 0 (exit 1)."""
    starts, ends, axes = (numpy_helper.from_array(np.array([v]), n) for v, n in
                          ((0, "starts"), (0, "ends"), (0, "axes")))  # fmt: skip
    node = onnx.helper.make_node("Slice", ["y", "starts", "ends", "axes"], ["e"], name="none")
    model = _with_extra_output(node, onnx.helper.make_tensor_value_info("e", 1, [0, 4]))
    model.graph.initializer.extend([starts, ends, axes])
    save(model, ws.model)
    np.savez(ws.calib, x=np.random.default_rng(17).standard_normal((32, 4)).astype(np.float32))
    out = ws.folder / "out.onnx"
    run_contract(ws, quantize(ws), out, codes=(0,))
    run_contract(ws, ["compare", ws.model, out, "--data", ws.calib], None, codes=(0,))


def test_compare_refuses_outputs_of_another_shape(ws):
    """A 'quantized' model with the float model's names but a wider output declared: numpy's
    broadcast error (exit 1); ErrorStats alone had compared the first elements. (An output
    whose size the data sets may differ batch by batch: tests/report/test_compare_edges.py.)"""

    def matmul(columns: int) -> onnx.ModelProto:
        weight = numpy_helper.from_array(np.ones((4, columns), np.float32), "w")
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", columns])
        return model_with([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y], [weight])

    save(matmul(4), ws.model)
    other = save(matmul(6), ws.folder / "other.onnx")
    np.savez(ws.calib, x=np.ones((4, 4), np.float32))
    args = ["compare", ws.model, other, "--data", ws.calib]
    refused(ws, args, "is [None, 4] in the float model and [None, 6] in the other")
    with pytest.raises(DataError, match="compared with FP32's of shape"):
        ErrorStats().update(np.zeros(4), np.ones(5))


def test_labels_beyond_a_symbolic_class_axis_are_refused(ws):
    """y[N, "K"]: the check read the declared size only, and printed 14% accuracy."""
    save(matmul_model(classes="K"), ws.model)
    np.savez(ws.calib, x=X[:, 0, 0, :4].copy(), label=np.arange(len(X)) % 10)
    refused(ws, ["compare", ws.model, ws.model, "--data", ws.calib], "has 4 classes", None)


def test_an_input_named_label_is_the_models(ws):
    """compare took the model's own input `label` for labels and refused its data."""
    save(matmul_model(name="label"), ws.model)
    np.savez(ws.calib, label=X[:, 0, 0, :4].copy())
    run_contract(ws, ["compare", ws.model, ws.model, "--data", ws.calib], None, codes=(0,))


def test_an_output_of_minus_inf_is_explained_without_a_warning(ws):
    """Log of a ReLU's zeros: a raw numpy warning on stderr, and 'nan dB' unexplained."""
    model = matmul_model()
    model.graph.node[0].output[0] = "m"
    model.graph.node.extend([onnx.helper.make_node("Relu", ["m"], ["r"]),
                             onnx.helper.make_node("Log", ["r"], ["y"])])  # fmt: skip
    save(model, ws.model)
    np.savez(ws.calib, x=np.random.default_rng(18).standard_normal((32, 4)).astype(np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_contract(ws, quantize(ws), ws.folder / "out.onnx", codes=(0,))
    assert "'y' is NaN or Inf" in result.stdout
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_bfloat16_output_is_refused_in_one_line(ws):
    """ONNX Runtime's Python API returns no bfloat16 array (exit 1 in compare and run)."""
    model = matmul_model()
    model.graph.node.append(onnx.helper.make_node("Cast", ["y"], ["b"], to=16))
    model.graph.output.append(onnx.helper.make_tensor_value_info("b", 16, ["N", 4]))
    save(model, ws.model)
    np.savez(ws.calib, x=np.ones((4, 4), np.float32))
    refused(ws, ["compare", ws.model, ws.model, "--data", ws.calib], "are bfloat16", None)


def test_two_nodes_of_one_name_are_refused_naming_the_users_file(ws):
    """compare ended in an internal error; quantize named its own temporary copy."""
    model = matmul_model()
    model.graph.node[0].name = "n"
    model.graph.node.append(onnx.helper.make_node("Relu", ["y"], ["r"], name="n"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("r", 1, ["N", 4]))
    save(model, ws.model)
    np.savez(ws.calib, x=np.ones((4, 4), np.float32))
    refused(ws, ["compare", ws.model, ws.model, "--data", ws.calib], f"{ws.model} names", None)
    refused(ws, quantize(ws), f"{ws.model} names more than one node ['n']")


def test_two_constants_of_one_name_are_taken_as_onnx_runtime_takes_them(ws):
    """silero_vad's OpenVINO export names 15 Constants 'F0::anon': ONNX Runtime runs it (it
    makes Constants initializers before its check), and qdq refused it as a broken model."""
    model = matmul_model()
    shift = onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [4], [0.5] * 4)
    for name in ("c1", "c2"):
        model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [name], value=shift))
        model.graph.node[0].name = "anon"
    model.graph.node.extend([
        onnx.helper.make_node("Add", ["y", "c1"], ["s"], name="add1"),
        onnx.helper.make_node("Add", ["s", "c2"], ["z"], name="add2"),
    ])  # fmt: skip
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", 1, ["N", 4]))
    save(model, ws.model)
    np.savez(ws.calib, x=np.random.default_rng(3).standard_normal((16, 4)).astype(np.float32))
    out = ws.folder / "out.onnx"
    run_contract(ws, quantize(ws), out, codes=(0,))
    x = np.ones((2, 4), np.float32)
    want = ort.InferenceSession(ws.model).run(["z"], {"x": x})[0]
    got = ort.InferenceSession(out).run(["z"], {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_an_input_with_a_default_that_quantize_freezes_is_said(ws, caplog):
    """An IR 4+ graph input with an initializer (an overridable default) vanished from the
    quantized model without a word."""
    model = matmul_model()
    model.graph.input.append(onnx.helper.make_tensor_value_info("w", 1, [4, 4]))
    save(model, ws.model)
    np.savez(ws.calib, x=np.ones((8, 4), np.float32))
    run_contract(ws, quantize(ws), ws.folder / "out.onnx", codes=(0,))
    assert "1 graph inputs have initializers (w)" in caplog.text
    assert [i.name for i in ort.InferenceSession(ws.folder / "out.onnx").get_inputs()] == ["x"]
