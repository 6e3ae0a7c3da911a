"""Small ONNX models of output heads, built in code: what detectors, classifiers and
recognizers write, and how they decode it (boxes beside scores, probabilities per step, a box
side as an expected value), each shaped like a way real heads break quantization."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models import _init, _model, _rng, _value


def detector_head() -> onnx.ModelProto:
    """Boxes in pixels (thousands) and class scores clipped to [0, 1], joined by one Concat that
    a shape op reads (heads reshape before decoding; a Flatten keeps the test's (N, 10))."""
    rng = _rng()
    nodes = [
        helper.make_node("Gemm", ["x", "wb", "bb"], ["boxes"], name="box_fc"),
        helper.make_node("Gemm", ["x", "wc", "bc"], ["logits"], name="cls_fc"),
        helper.make_node("Clip", ["logits", "zero", "one"], ["probs"], name="clip"),
        helper.make_node("Concat", ["boxes", "probs"], ["joined"], axis=1, name="head"),
        helper.make_node("Flatten", ["joined"], ["y"], axis=1, name="flatten"),
    ]
    inits = [
        _init("wb", rng.standard_normal((16, 4)) * 320),
        _init("bb", np.zeros(4)),
        _init("wc", rng.standard_normal((16, 6)) * 0.2),
        _init("bc", np.full(6, 0.5)),
        _init("zero", np.array(0.0)),
        _init("one", np.array(1.0)),
    ]
    return _model(nodes, [_value("x", ["N", 16])], [_value("y", ["N", 10])], inits)


def classifier_head() -> onnx.ModelProto:
    """x[N,16] -> Gemm -> Flatten -> Softmax: logits pass a shape op on their way to a float op,
    as in PP-OCR's text-direction classifier (whose Softmax-11 became Flatten/Softmax/Reshape)."""
    rng = _rng()
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc"),
        helper.make_node("Flatten", ["logits"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Softmax", ["flat"], ["y"], axis=1, name="softmax"),
    ]
    inits = [_init("w", rng.standard_normal((16, 4)) * 0.5), _init("b", np.zeros(4))]
    return _model(nodes, [_value("x", ["N", 16])], [_value("y", ["N", 4])], inits)


def yolo_head(classes: int = 3) -> onnx.ModelProto:
    """x[N,3,8,8] -> a YOLO-style head (N, 4 + classes, 64): per position, a box (cx, cy, w, h)
    in pixels (positive, up to hundreds) and sigmoid class scores, joined on axis 1 as YOLOv8's."""
    rng = _rng()
    nodes = [
        helper.make_node("Conv", ["x", "wb", "bb"], ["b0"], pads=[1, 1, 1, 1], name="box_conv"),
        helper.make_node("Abs", ["b0"], ["b1"], name="box_abs"),
        helper.make_node("Mul", ["b1", "pixels"], ["boxes"], name="to_pixels"),
        helper.make_node("Conv", ["x", "wc", "bc"], ["c0"], pads=[1, 1, 1, 1], name="cls_conv"),
        helper.make_node("Sigmoid", ["c0"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["joined"], axis=1, name="head"),
        helper.make_node("Reshape", ["joined", "shape"], ["y"], name="flatten"),
    ]
    inits = [
        _init("wb", rng.standard_normal((4, 3, 3, 3)) * 0.3),
        _init("bb", np.full(4, 0.5)),
        _init("pixels", np.array(40.0)),
        _init("wc", rng.standard_normal((classes, 3, 3, 3)) * 0.5),
        _init("bc", np.full(classes, -1.0)),
        numpy_helper.from_array(np.array([0, 4 + classes, -1], np.int64), "shape"),
    ]
    inputs = [_value("x", ["N", 3, 8, 8])]
    return _model(nodes, inputs, [_value("y", ["N", 4 + classes, 64])], inits)


def step_softmax(op: str, constant: np.ndarray, steps: int, classes: int) -> onnx.ModelProto:
    """x[N, steps, classes] -> Softmax(x `op` constant) over the classes: per step, class
    probabilities, as a CTC recognizer's head writes them (`op` Mul with a scalar: a sharper or
    softer copy of the same decisions; MatMul with a matrix: a linear head)."""
    nodes = [
        helper.make_node(op, ["x", "c"], ["logits"], name="head"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    shape = ["N", steps, classes]
    return _model(nodes, [_value("x", shape)], [_value("probs", shape)], [_init("c", constant)])


def two_heads() -> onnx.ModelProto:
    """x[1, 3, 8, 8] -> two convolutions -> a box head and a score head, each an output, as a
    detector's heads write them."""
    rng = _rng()
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "W0"], ["a0"], pads=[1, 1, 1, 1], name="body0"),
        node("Relu", ["a0"], ["a"], name="relu0"),
        node("Conv", ["a", "W1"], ["b0"], pads=[1, 1, 1, 1], name="body1"),
        node("Relu", ["b0"], ["b"], name="relu1"),
        node("Conv", ["b", "Wbox"], ["boxes"], name="box_head"),
        node("Conv", ["b", "Wcls"], ["c"], name="score_head"),
        node("Sigmoid", ["c"], ["scores"], name="sigmoid"),
    ]
    shapes = {"W0": (4, 3, 3, 3), "W1": (4, 4, 3, 3), "Wbox": (4, 4, 1, 1), "Wcls": (2, 4, 1, 1)}
    inits = [_init(n, rng.standard_normal(shape)) for n, shape in shapes.items()]
    outputs = [_value("boxes", [1, 4, 8, 8]), _value("scores", [1, 2, 8, 8])]
    return _model(nodes, [_value("x", [1, 3, 8, 8])], outputs, inits)


def dfl_head(bins: int = 4, classes: int = 2) -> onnx.ModelProto:
    """x[N, 3, 8, 8] -> a body convolution -> box logits (4 sides x `bins`) and class logits,
    joined and split again as YOLOv8's head does, each side decoded as the expected bin of a
    Softmax (a 1x1 convolution by 0..bins-1) -> y[N, 4 + classes, 64]: the sides in pixels of
    the grid, then the sigmoid scores."""
    rng = _rng()
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "Wbody", "bbody"], ["f0"], pads=[1, 1, 1, 1], name="body"),
        node("Relu", ["f0"], ["f"], name="relu"),
        node("Conv", ["f", "Wbox", "bbox"], ["box"], name="box_conv"),
        node("Conv", ["f", "Wcls", "bcls"], ["cls"], name="cls_conv"),
        node("Concat", ["box", "cls"], ["joined"], axis=1, name="join"),
        node("Reshape", ["joined", "flat"], ["rows"], name="flatten"),
        node("Split", ["rows", "sizes"], ["logits", "cls_rows"], axis=1, name="split"),
        node("Reshape", ["logits", "sides"], ["by_side"], name="to_sides"),
        node("Transpose", ["by_side"], ["by_bin"], perm=[0, 2, 1, 3], name="bins_first"),
        node("Softmax", ["by_bin"], ["p"], axis=1, name="softmax"),
        node("Conv", ["p", "Wdfl"], ["expected"], name="dfl"),
        node("Reshape", ["expected", "decoded_shape"], ["sides_out"], name="decoded"),
        node("Sigmoid", ["cls_rows"], ["scores"], name="sigmoid"),
        node("Concat", ["sides_out", "scores"], ["y"], axis=1, name="head"),
    ]
    channels = 4 * bins
    inits = [
        _init("Wbody", rng.standard_normal((8, 3, 3, 3)) * 0.5),
        _init("bbody", rng.standard_normal(8) * 0.1),
        _init("Wbox", rng.standard_normal((channels, 8, 1, 1))),
        _init("bbox", rng.standard_normal(channels)),
        _init("Wcls", rng.standard_normal((classes, 8, 1, 1))),
        _init("bcls", np.full(classes, -1.0)),
        _init("Wdfl", np.arange(bins).reshape(1, bins, 1, 1)),
        numpy_helper.from_array(np.array([0, channels + classes, -1], np.int64), "flat"),
        numpy_helper.from_array(np.array([channels, classes], np.int64), "sizes"),
        numpy_helper.from_array(np.array([0, 4, bins, -1], np.int64), "sides"),
        numpy_helper.from_array(np.array([0, 4, -1], np.int64), "decoded_shape"),
    ]
    inputs = [_value("x", ["N", 3, 8, 8])]
    return _model(nodes, inputs, [_value("y", ["N", 4 + classes, 64])], inits)


def expected_rows() -> onnx.ModelProto:
    """x[N, 8] -> logits -> per row a Softmax over 4 bins, weighed from the left of a MatMul
    (bins[1, 4] @ probabilities[N, 4 bins, 4 sides]) -> y[N, 1, 4]: 4 expected values."""
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "W"], ["logits"], name="logits"),
        node("Reshape", ["logits", "sides"], ["by_side"], name="to_sides"),
        node("Softmax", ["by_side"], ["p"], axis=-1, name="softmax"),
        node("Transpose", ["p"], ["by_bin"], perm=[0, 2, 1], name="bins_first"),
        node("MatMul", ["bins", "by_bin"], ["y"], name="expect"),
    ]
    inits = [
        _init("W", _rng().standard_normal((8, 16))),
        numpy_helper.from_array(np.array([0, 4, 4], np.int64), "sides"),
        _init("bins", np.arange(4).reshape(1, 4)),
    ]
    return _model(nodes, [_value("x", ["N", 8])], [_value("y", ["N", 1, 4])], inits)
