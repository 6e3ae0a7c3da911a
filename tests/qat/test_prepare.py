"""qdq.qat.prepare / export on the digits models: the prepared module trains, and the exported
QDQ file runs in ONNX Runtime's int8 kernels within 1 LSB of the module on every quantized
tensor."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import fx, nn

from qdq.config import QuantConfig
from qdq.errors import DataError, ModelError, SchemeError, UsageError
from qdq.onnx.graph import GraphIndex
from qdq.onnx.sessions import open_session
from qdq.plan.saturation import PAIR_CODES, reduction_rows
from qdq.qat import export, freeze_batchnorm, prepare
from qdq.qat.fakequant import FakeQuantize
from qdq.qat.layers import QuantizedLayer
from qdq.qat.prepare import float_copy
from qdq.qat.trace import to_onnx
from qdq.scheme import INT4_WEIGHTS, PerChannel, QScheme

from conftest import DIGITS

SPEC = importlib.util.spec_from_file_location("digits_train", DIGITS / "train.py")
TRAIN = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(TRAIN)


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fit images, fit labels, test images, test labels) as train.py splits them."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32)[:, None] / 16.0)
    labels = torch.from_numpy(data.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(images)))
    test, fit = order[:540], order[540:]
    return images[fit], labels[fit], images[test], labels[test]


FIT_X, FIT_Y, TEST_X, TEST_Y = digits()


def train(model: nn.Module, steps: int, lr: float = 3e-3) -> nn.Module:
    """`steps` Adam steps of 64 labelled images, as a user's own loop would run."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.randperm(len(FIT_X), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(steps):
        batch = order[(step * 64) % 1216 :][:64]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(FIT_X[batch]), FIT_Y[batch]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these layers are too small to split, and on a busy 2-core machine
    two threads ran a training step 10-20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp32() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"cnn": train(TRAIN.cnn(), 60), "mobilenet": train(TRAIN.mobilenet(), 60)}


def ort_run(path: Path, prepared: fx.GraphModule, x: torch.Tensor, tmp: Path) -> tuple:
    """ONNX Runtime's optimized (int8-kernel) run of the file: the codes at each planned
    tensor's QuantizeLinear, by the fx node it follows, the fused graph's op types, and the
    logits."""
    state = prepared.meta["qdq"]
    _, labels = to_onnx(float_copy(prepared, state.activations), (x[:1],))
    model = onnx.load(str(path))
    wanted = {name: f"{labels[name]}_quantized" for name in state.activations}
    for tensor in wanted.values():
        model.graph.output.append(onnx.ValueInfoProto(name=tensor))
    optimized = tmp / "optimized.onnx"
    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = open_session(model, level=level, optimized_path=optimized)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"input": x.numpy()}), strict=True))
    ops = {node.op_type for node in onnx.load(str(optimized)).graph.node}
    return {n: values[t].astype(np.int64) for n, t in wanted.items()}, ops, values["output"]


def lsb_errors(prepared: fx.GraphModule, x: torch.Tensor, ort_codes: dict) -> dict[str, int]:
    """Per planned tensor, the largest code difference between the module and ONNX Runtime
    when both read the same input codes: each fake quantizer is fed the module's float op
    output and passes ONNX Runtime's codes on, so one op's rounding does not cascade."""
    state, errors = prepared.meta["qdq"], {}

    class Forced(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            out = super().run_node(node)
            if node.name not in state.activations:
                return out
            quantizer = prepared.get_submodule(state.activations[node.name])
            theirs = torch.from_numpy(ort_codes[node.name]).float()
            errors[node.name] = int((quantizer.codes(out) - theirs).abs().max())
            return (theirs - quantizer.zero_point) * quantizer.scale  # its quantizer keeps it

    with torch.no_grad():
        Forced(prepared.eval()).run(x)
    return errors


@pytest.mark.parametrize(
    ("name", "config", "steps"),
    [
        ("cnn", QuantConfig(), 15),
        ("mobilenet", QuantConfig(weights=INT4_WEIGHTS), 15),
        # ternary weights start at 30% of the test images and need longer: after 15 steps they
        # read 80% on one Xeon and over 90% on others (float rounding moves the trajectory)
        ("cnn", QuantConfig(weight_grid="ternary"), 30),
    ],
)
def test_exported_file_matches_the_trained_module_within_one_lsb(
    fp32, tmp_path, name, config, steps
):
    prepared = prepare(fp32[name], FIT_X[:1], config, FIT_X[:256].split(128), freeze_bn_after=10)
    train(prepared, steps, lr=1e-3)  # scales, weights and BatchNorm statistics all move
    path = export(prepared, tmp_path / "qat.onnx", FIT_X[:1])

    x = TEST_X[:256]
    codes, ops, logits = ort_run(path, prepared, x, tmp_path)
    errors = lsb_errors(prepared, x, codes)
    assert len(errors) >= 6  # the input, each conv's (Relu's) output, the pool, the flatten
    assert max(errors.values()) <= 1, errors
    # ONNX Runtime runs it with its int8 kernels, as it runs `qdq quantize` output
    assert {"QLinearConv", "QGemm", "QLinearGlobalAveragePool"} <= ops
    assert "Conv" not in ops
    with torch.no_grad():
        torch_logits = prepared(x).numpy()
    assert np.mean(logits.argmax(1) == torch_logits.argmax(1)) >= 0.99
    assert np.mean(logits.argmax(1) == TEST_Y[:256].numpy()) >= 0.9


def test_trained_codes_stay_pair_safe_where_x86_kernels_would_saturate(fp32, tmp_path):
    # training moves weights past their pair-safe scales; the module trains on, and the file
    # holds, codes no two neighbours of whose int8 sums add past 128 (qdq.plan.saturation)
    config = QuantConfig(saturation="avoid")
    prepared = prepare(fp32["cnn"], FIT_X[:1], config, [FIT_X[:128]], freeze_bn_after=0)
    train(prepared, 10, lr=2e-2)
    model = onnx.load(str(export(prepared, tmp_path / "qat.onnx", FIT_X[:1])))
    index = GraphIndex(model)
    checked = 0
    for node in index.nodes:
        if node.op_type == "DequantizeLinear" and index.is_constant(node.input[0]):
            user = index.sole_consumer(node.output[0])
            codes = index.constant(node.input[0])
            if user is not None and codes.dtype == np.int8:
                rows = reduction_rows(user, codes.astype(np.int64))
                if rows is not None:
                    pairs = np.pad(rows, ((0, 0), (0, rows.shape[1] % 2))).reshape(-1, 2)
                    assert np.maximum(pairs, 0).sum(1).max() <= PAIR_CODES
                    assert np.maximum(-pairs, 0).sum(1).max() <= PAIR_CODES
                    checked += 1
    assert checked == 4  # three convs and the classifier
    codes, _, _ = ort_run(tmp_path / "qat.onnx", prepared, TEST_X[:256], tmp_path)
    assert max(lsb_errors(prepared, TEST_X[:256], codes).values()) <= 1


def test_weight_codes_in_the_file_are_the_grid_torch_trained_on(fp32, tmp_path):
    prepared = prepare(fp32["cnn"], FIT_X[:1], QuantConfig(weight_grid="binary"), [FIT_X[:128]])
    model = onnx.load(str(export(prepared, tmp_path / "binary.onnx", FIT_X[:1])))
    weights = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1
    ]
    assert len(weights) == 4  # three convs and the classifier
    assert all(set(np.unique(w)) == {-1, 1} for w in weights)


def test_batchnorm_statistics_freeze_after_the_warm_up(fp32):
    prepared = prepare(fp32["cnn"], FIT_X[:1], QuantConfig(), [FIT_X[:128]], freeze_bn_after=3)
    layer = prepared.get_submodule("0")
    means = []
    prepared.train()
    for batch in FIT_X[:384].split(64):
        prepared(batch)
        means.append(layer.batchnorm.running_mean.clone())
    assert not torch.equal(means[0], means[1])  # warm-up: batch statistics, running ones move
    assert all(torch.equal(means[2], m) for m in means[3:])  # frozen after 3 steps
    with torch.no_grad():  # frozen, training computes what eval (and the file) computes
        assert torch.equal(prepared.train()(TEST_X[:32]), prepared.eval()(TEST_X[:32]))


def test_freeze_batchnorm_ends_the_warm_up_now(fp32):
    prepared = prepare(fp32["cnn"], FIT_X[:1], QuantConfig(), [FIT_X[:128]])
    freeze_batchnorm(prepared)
    with torch.no_grad():
        assert torch.equal(prepared.train()(TEST_X[:32]), prepared.eval()(TEST_X[:32]))


def test_adam_cannot_push_a_learned_scale_to_zero(fp32):
    """Adam moves a parameter by about its rate per step whatever its size: the input's scale
    (1/255) held as is crosses 0 in one step at lr 0.01, and a clamped scale has no gradient
    left (its layer dies). Held as a log, each step changes a scale by a ratio."""
    prepared = prepare(fp32["cnn"], FIT_X[:1], QuantConfig(), [FIT_X[:128]])
    quantizers = [m for m in prepared.modules() if isinstance(m, FakeQuantize)]
    assert len(quantizers) == 5 + 4  # activation grids (shared ones once) and weight grids
    before = [q.scale.detach().clone() for q in quantizers]
    optimizer = torch.optim.Adam(prepared.parameters(), lr=0.01)
    for _ in range(5):  # every scale pushed down as hard as Adam goes
        optimizer.zero_grad()
        sum(q.scale.sum() for q in quantizers).backward()
        optimizer.step()
    for q, old in zip(quantizers, before, strict=True):
        assert torch.allclose(q.scale, old * np.exp(-0.05), rtol=1e-3)


def test_an_unsupported_layer_stays_float_and_the_rest_is_quantized(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    ).eval()  # fmt: skip
    prepared = prepare(model, FIT_X[:1], QuantConfig(), [FIT_X[:64]])
    assert "ConvTranspose" in caplog.text
    path = export(prepared.eval(), tmp_path / "mixed.onnx", FIT_X[:1])
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 2
    assert "ConvTranspose" in ops
    transpose = next(n for n in graph.node if n.op_type == "ConvTranspose")
    assert not transpose.input[1].endswith("_dq")  # its weight stays float
    with torch.no_grad():
        want = prepared(TEST_X[:16]).numpy()
    got = ort.InferenceSession(str(path)).run(None, {"input": TEST_X[:16].numpy()})[0]
    step = float(np.ptp(want)) / 255
    assert np.abs(got - want).max() <= 2 * step


def test_the_users_module_is_left_as_it_was(fp32):
    before = {k: v.clone() for k, v in fp32["cnn"].state_dict().items()}
    prepared = prepare(fp32["cnn"], FIT_X[:1], QuantConfig(), [FIT_X[:64]])
    train(prepared, 2)
    after = fp32["cnn"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(fp32["cnn"][1], nn.BatchNorm2d)


def test_bad_inputs_raise_typed_errors(fp32, tmp_path):
    with pytest.raises(ModelError, match=r"torch\.nn\.Module"):
        prepare("model.onnx", FIT_X[:1])
    with pytest.raises(DataError, match="float32 tensors"):
        prepare(fp32["cnn"], FIT_X[:1].long())
    with pytest.raises(SchemeError, match="QuantConfig"):
        prepare(fp32["cnn"], FIT_X[:1], {"weight_bits": 4})
    with pytest.raises(SchemeError, match="symmetric signed"):
        prepare(fp32["cnn"], FIT_X[:1], QuantConfig(weights=QScheme(8, granularity=PerChannel(0))))
    with pytest.raises(UsageError, match="prepare returned"):
        export(fp32["cnn"], tmp_path / "x.onnx", FIT_X[:1])

    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(ModelError, match="cannot trace"):
        prepare(Branchy(), FIT_X[:1])


def test_a_clear_error_without_torch():
    code = "import sys; sys.modules['torch'] = None; import qdq.qat"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "UsageError: qdq.qat needs PyTorch" in done.stderr
    assert "pip install 'qdq[torch]'" in done.stderr


def test_a_batchnorm_channel_with_gamma_zero_trains_without_nan(fp32):
    """Pruned or zero-initialised BatchNorms have gamma = 0: the warm-up's un-scaling of that
    channel divided by 0."""
    model = copy.deepcopy(fp32["cnn"])
    batchnorm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        batchnorm.weight[0] = 0.0
    prepared = prepare(model, FIT_X[:1], QuantConfig(), [FIT_X[:128]]).train()
    assert torch.isfinite(prepared(FIT_X[:64])).all()


def test_a_lone_linear_layer_is_fake_quantized_and_exported_in_int8(tmp_path):
    """Traced from the top, a bare nn.Linear had been its functional call, kept float with
    "Gemm is not a torch ... Linear module"."""
    torch.manual_seed(0)
    layer, x = nn.Linear(3, 2), torch.randn(16, 3)
    prepared = prepare(layer, x[:1], calibration=[x])
    assert any(isinstance(m, QuantizedLayer) for m in prepared.modules())
    path = tmp_path / "linear.onnx"
    export(prepared, path, x[:1])
    weights = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear"]
    assert weights
