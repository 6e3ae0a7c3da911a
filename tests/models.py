"""Small ONNX models built in code, each shaped like a way real models break quantization (output
heads: head_models.py, built on the helpers here)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _rng() -> np.random.Generator:
    """A fresh generator per model, so that its weights do not depend on the tests run before it
    (one module-level generator made a test's outcome depend on the order tests ran in)."""
    return np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _value(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _two_convs() -> list[onnx.TensorProto]:
    """Weights of conv1 (3 -> 8), conv2 (8 -> 16) and fc (16 -> 5)."""
    rng = _rng()
    return [
        _init("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3),
        _init("b1", rng.standard_normal(8) * 0.1),
        _init("w2", rng.standard_normal((16, 8, 3, 3)) * 0.2),
        _init("b2", rng.standard_normal(16) * 0.1),
        _init("w3", rng.standard_normal((5, 16))),
        _init("b3", rng.standard_normal(5) * 0.1),
    ]


def conv_net(opset: int = 17, middle: str | None = None) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Relu -> [middle op] -> Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    last = "r1"
    if middle:
        nodes.append(helper.make_node(middle, ["r1"], ["m"], name="middle"))
        last = "m"
    nodes += [
        helper.make_node("Conv", [last, "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"),
    ]
    x, y = _value("x", ["N", 3, 8, 8]), _value("y", ["N", 5])
    return _model(nodes, [x], [y], _two_convs(), opset)


def silu_net() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> x * Sigmoid(x) (SiLU, as YOLO writes it) -> Conv -> GAP -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="gate"),
        helper.make_node("Mul", ["c1", "s1"], ["m1"], name="silu"),
        helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"),
    ]
    return _model(nodes, [_value("x", ["N", 3, 8, 8])], [_value("y", ["N", 5])], _two_convs())


def hard_swish_tail() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> HardSwish -> Conv -> HardSwish -> MaxPool -> GAP -> Gemm: the PP-OCR
    classifier's tail, HardSwish written as x * HardSigmoid(x). ONNX Runtime has no int8
    HardSigmoid, so the int8 ops around it stay in NCHW layout."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("HardSigmoid", ["c1"], ["h1"], name="gate1"),
        helper.make_node("Mul", ["c1", "h1"], ["m1"], name="hswish1"),
        helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("HardSigmoid", ["c2"], ["h2"], name="gate2"),
        helper.make_node("Mul", ["c2", "h2"], ["m2"], name="hswish2"),
        helper.make_node("MaxPool", ["m2"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="mp"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"),
    ]
    return _model(nodes, [_value("x", ["N", 3, 8, 8])], [_value("y", ["N", 5])], _two_convs())


def gelu_max_pool() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Reshape to [N,16,64] -> bias Add per channel -> GELU (tanh form,
    written out in 9 nodes as jax2tf does) -> ReduceMax over positions -> Gemm: Magika's
    convolution block, whose bias Add comes after shape ops (there a Slice and a Squeeze), so
    it does not fold into the Conv and each channel's GELU is shifted."""
    gelu = [
        helper.make_node("Mul", ["a", "a"], ["a2"], name="square"),
        helper.make_node("Mul", ["a2", "a"], ["a3"], name="cube"),
        helper.make_node("Mul", ["a3", "k"], ["a3k"], name="cubic"),
        helper.make_node("Add", ["a", "a3k"], ["inner"], name="inner"),
        helper.make_node("Mul", ["inner", "root"], ["arg"], name="scale"),
        helper.make_node("Tanh", ["arg"], ["t"], name="tanh"),
        helper.make_node("Add", ["t", "one"], ["t1"], name="plus_one"),
        helper.make_node("Mul", ["a", "t1"], ["at"], name="times_x"),
        helper.make_node("Mul", ["at", "half"], ["gelu"], name="half"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b0"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Reshape", ["c1", "rows"], ["r"], name="rows"),
        helper.make_node("Add", ["r", "bias"], ["a"], name="bias"),
        *gelu,
        helper.make_node("ReduceMax", ["gelu"], ["f"], axes=[2], keepdims=0, name="max"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"),
    ]
    rng = _rng()
    inits = [
        _init("w1", rng.standard_normal((16, 3, 3, 3)) * 0.6),
        _init("b0", np.zeros(16)),
        numpy_helper.from_array(np.array([0, 16, 64]), "rows"),
        _init("bias", rng.uniform(-0.5, 0.3, (1, 16, 1))),
        _init("k", 0.044715),
        _init("root", np.sqrt(2 / np.pi)),
        _init("one", 1.0),
        _init("half", 0.5),
        _init("w3", rng.standard_normal((5, 16))),
        _init("b3", rng.standard_normal(5) * 0.1),
    ]
    return _model(nodes, [_value("x", ["N", 3, 8, 8])], [_value("y", ["N", 5])], inits)


def masked_attention() -> onnx.ModelProto:
    """scores = q k^T + mask, where the mask is built at run time from a 0/1 input times
    -3.4e38 (as exporters do), then Softmax and a weighted sum."""
    rng = _rng()
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Sub", ["one", "keep"], ["masked"], name="invert"),
        helper.make_node("Mul", ["masked", "lowest"], ["bias"], name="to_lowest"),
        helper.make_node("Unsqueeze", ["bias", "axis1"], ["bias3"], name="unsqueeze"),
        helper.make_node("Add", ["scores", "bias3"], ["biased"], name="add_mask"),
        helper.make_node("Softmax", ["biased"], ["attn"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["attn", "x"], ["y"], name="mix"),
    ]
    inits = [
        _init("wq", rng.standard_normal((8, 8)) * 0.5),
        _init("wk", rng.standard_normal((8, 8)) * 0.5),
        _init("one", np.array(1.0)),
        _init("lowest", np.array(np.finfo(np.float32).min)),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    inputs = [_value("x", ["N", 6, 8]), _value("keep", ["N", 6])]
    return _model(nodes, inputs, [_value("y", ["N", 6, 8])], inits)


def conv_transpose_net() -> onnx.ModelProto:
    """x[N,4,4,4] -> ConvTranspose (weight [Cin, Cout, k, k]: channels on axis 1) -> Relu."""
    rng = _rng()
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], strides=[2, 2], name="up"),
        helper.make_node("Relu", ["t"], ["y"], name="relu"),
    ]
    inits = [_init("w", rng.standard_normal((4, 6, 2, 2))), _init("b", rng.standard_normal(6))]
    return _model(nodes, [_value("x", ["N", 4, 4, 4])], [_value("y", ["N", 6, 8, 8])], inits)


def embedding(vocabulary: int = 2000, width: int = 32, spiky: bool = False) -> onnx.ModelProto:
    """ids[N,8] (int64) -> Gather from a constant table -> MatMul -> y[N,8,4]: a text model's
    first layer. `spiky`: a few table entries 50x the rest, which one int8 grid cannot serve."""
    rng = _rng()
    table = rng.standard_normal((vocabulary, width)) * 0.05
    if spiky:
        table[:3, :3] = 10.0
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
    ]
    inits = [_init("table", table), _init("w", rng.standard_normal((width, 4)))]
    ids = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 8])
    return _model(nodes, [ids], [_value("y", ["N", 8, 4])], inits)


def attention_block(tokens: int = 8, width: int = 16) -> onnx.ModelProto:
    """A post-norm transformer block with every shape fixed (batch 1), as a pooled sentence
    encoder exports: ONNX Runtime fuses the FFN's MatMul + Add into Gemm with Reshapes at once,
    and the attention projections only once they read int8 (issue: "Attempt to replace the
    existing tensor" when its generated names met the first pass's)."""
    rng = _rng()

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return _init(name, rng.standard_normal(shape) * 0.3)

    inits = [w("scale", width), w("shift", width), w("W1", width, 2 * width), w("b1", 2 * width)]
    inits += [w("W2", 2 * width, width), w("b2", width)]
    inits += [w(f"W{n}", width, width) for n in "qkvo"] + [w(f"b{n}", width) for n in "qkvo"]
    node = helper.make_node
    nodes = [node("LayerNormalization", ["x", "scale", "shift"], ["ln"], axis=-1)]
    for n in "qkv":
        nodes += [node("MatMul", ["ln", f"W{n}"], [f"{n}0"]), node("Add", [f"{n}0", f"b{n}"], [n])]
    nodes += [
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["s"]),
        node("Softmax", ["s"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["a"]),
        node("MatMul", ["a", "Wo"], ["o0"]),
        node("Add", ["o0", "bo"], ["o"]),
        node("Add", ["o", "ln"], ["r"]),
        node("MatMul", ["r", "W1"], ["h0"]),
        node("Add", ["h0", "b1"], ["h1"]),
        node("Relu", ["h1"], ["h"]),
        node("MatMul", ["h", "W2"], ["f0"]),
        node("Add", ["f0", "b2"], ["y"]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"{n.op_type}_{i}"
    shape = [1, tokens, width]
    return _model(nodes, [_value("x", shape)], [_value("y", shape)], inits)


def frame_net(mask: bool = False) -> onnx.ModelProto:
    """frames[steps,60], state[1,16] -> out[steps,4]: frames on a free axis beside one recurrent
    state fixed at batch 1, as in Silero VAD's sequence model; three linear layers per frame,
    the state added after the second's ReLU (added to a MatMul's output, ONNX Runtime fuses
    the two into a Gemm whose bias is no constant, which runs float). With `mask`, also
    mask[1,steps], which weights the frames (so the model takes no run of frames with one
    sample's mask)."""
    rng = _rng()
    first = "masked" if mask else "frames"
    nodes = [
        helper.make_node("MatMul", [first, "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["g2"], name="relu_fc2"),
        helper.make_node("Add", ["g2", "state"], ["s2"], name="with_state"),
        helper.make_node("Relu", ["s2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["out"], name="fc3"),
    ]
    inputs = [_value("frames", ["steps", 60]), _value("state", [1, 16])]
    if mask:
        nodes.insert(0, helper.make_node("MatMul", ["mask", "frames"], ["masked"], name="weigh"))
        inputs.append(_value("mask", [1, "steps"]))
    inits = [
        _init("w1", rng.standard_normal((60, 32)) * 0.2),
        _init("w2", rng.standard_normal((32, 16)) * 0.3),
        _init("w3", rng.standard_normal((16, 4)) * 0.3),
    ]
    return _model(nodes, inputs, [_value("out", ["steps", 4])], inits)


def branched(model: onnx.ModelProto, tail: int = 1) -> onnx.ModelProto:
    """`model`'s network inside an If on a scalar int64 input `mode` >= 1, as Silero VAD puts
    its 16 kHz network inside an If on its sample rate, and its last `tail` nodes inside a
    second If (on `mode` == 1) within that branch; each else branch is the same computation
    with its weights halved (their own names, their own initializers)."""
    graph = model.graph
    body, late_nodes = list(graph.node[:-tail]), list(graph.node[-tail:])
    out = graph.output[0].name
    outer = {"input", *(o for node in body for o in node.output)}

    def halved(node: onnx.NodeProto, suffix: str, kept: set[str]) -> onnx.NodeProto:
        """A copy reading and writing its own names (`suffix`) but those `kept`."""
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [n if n in kept else n + suffix for n in node.input]
        copy.output[:] = [n + suffix for n in node.output]
        return copy

    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    taken = [onnx.NodeProto() for _ in late_nodes]
    for copy, node in zip(taken, late_nodes, strict=True):
        copy.CopyFrom(node)
    taken[-1].output[:] = ["inner_a"]
    late = [halved(node, "_h", outer) for node in late_nodes]
    late[-1].output[:] = ["inner_b"]
    read = {n for node in late_nodes for n in node.input if n in weights}
    typed = [_value(n, None) for n in ("inner_a", "inner_b", "net_a", out + "_e")]
    inner = helper.make_node(
        "If",
        ["exactly_one"],
        ["net_a"],
        then_branch=helper.make_graph(taken, "inner_then", [], [typed[0]]),
        else_branch=helper.make_graph(late, "inner_else", [], [typed[1]]),
        name="inner_if",
    )
    then_inits = [*graph.initializer, *(_init(n + "_h", weights[n] / 2) for n in sorted(read))]
    then_inits.append(numpy_helper.from_array(np.array(1, np.int64), "inner_one"))
    equal = helper.make_node("Equal", ["mode", "inner_one"], ["exactly_one"], name="equal")
    then_branch = helper.make_graph([*body, equal, inner], "then", [], [typed[2]], then_inits)
    other = [halved(node, "_e", {"input"}) for node in graph.node]
    other_inits = [_init(t.name + "_e", weights[t.name] / 2) for t in graph.initializer]
    else_branch = helper.make_graph(other, "else", [], [typed[3]], other_inits)
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    nodes = [
        helper.make_node("GreaterOrEqual", ["mode", "one"], ["at_least_one"], name="at_least"),
        helper.make_node(
            "If",
            ["at_least_one"],
            [out],
            then_branch=then_branch,
            else_branch=else_branch,
            name="if",
        ),
    ]
    mode = helper.make_tensor_value_info("mode", TensorProto.INT64, [])
    return _model(nodes, [graph.input[0], mode], [graph.output[0]], [one])


def spectrum_model(hidden: bool = True) -> onnx.ModelProto:
    """A waveform x[1, 1, 256] -> two strided convolutions (a spectrum's real and imaginary
    parts, as DNSMOS computes its STFT) -> log power -> two convolutions (one without
    `hidden`): the first two layers both read the input."""
    rng = _rng()
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "Wre"], ["re"], strides=[16], name="stft_real"),
        node("Conv", ["x", "Wim"], ["im"], strides=[16], name="stft_imag"),
        node("Mul", ["re", "re"], ["re2"], name="square_re"),
        node("Mul", ["im", "im"], ["im2"], name="square_im"),
        node("Add", ["re2", "im2"], ["power"], name="power"),
        node("Add", ["power", "eps"], ["floored"], name="floor"),
        node("Log", ["floored"], ["log"], name="log"),
    ]
    inits = [_init(n, rng.standard_normal((8, 1, 32))) for n in ("Wre", "Wim")]
    inits.append(_init("eps", np.array(1e-6)))
    if hidden:
        nodes.append(node("Conv", ["log", "W1"], ["h0"], pads=[1, 1], name="conv1"))
        nodes.append(node("Relu", ["h0"], ["h"], name="relu"))
        inits.append(_init("W1", rng.standard_normal((4, 8, 3))))
    nodes.append(node("Conv", ["h" if hidden else "log", "W2"], ["y"], name="conv2"))
    inits.append(_init("W2", rng.standard_normal((2, 4 if hidden else 8, 1))))
    return _model(nodes, [_value("x", [1, 1, 256])], [_value("y", [1, 2, 15])], inits)


def constant_q_model() -> onnx.ModelProto:
    """A waveform x[1, 1, 256] -> a constant-Q transform of two octaves, as basic-pitch
    computes one: the high octave's kernel on the waveform, the low octave's behind a strided
    low-pass convolution -> both octaves' power, concatenated -> Log -> two convolutions."""
    rng = np.random.default_rng(1)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "Whigh"], ["high"], strides=[32], name="cqt_high"),
        node("Conv", ["x", "Wlp"], ["half"], strides=[2], name="lowpass"),
        node("Conv", ["half", "Wlow"], ["low"], strides=[16], name="cqt_low"),
        node("Concat", ["high", "low"], ["bins"], axis=1, name="octaves"),
        node("Mul", ["bins", "bins"], ["power"], name="power"),
        node("Add", ["power", "eps"], ["floored"], name="floor"),
        node("Log", ["floored"], ["log"], name="log"),
        node("Conv", ["log", "W1"], ["h0"], pads=[1, 1], name="conv1"),
        node("Relu", ["h0"], ["h"], name="relu"),
        node("Conv", ["h", "W2"], ["y"], name="conv2"),
    ]
    shapes = {"Whigh": (4, 1, 32), "Wlp": (1, 1, 2), "Wlow": (4, 1, 16)}
    inits = [_init(n, rng.standard_normal(shape)) for n, shape in shapes.items()]
    inits.append(_init("eps", np.array(1e-6)))
    inits += [
        _init("W1", rng.standard_normal((4, 8, 3))),
        _init("W2", rng.standard_normal((2, 4, 1))),
    ]
    return _model(nodes, [_value("x", [1, 1, 256])], [_value("y", [1, 2, 8])], inits)
