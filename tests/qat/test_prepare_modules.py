"""`qdq.qat.prepare` on the module shapes users write: moved between devices, a layer called
twice, in-place activations, token sequences, square and biasless layers, BatchNorms without
affine parameters, submodules held in eval mode; and the mistakes it must name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import fx, nn

from qdq.config import QuantConfig
from qdq.errors import UsageError
from qdq.qat import export, prepare
from qdq.qat.layers import QuantizedLayer


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def quantized_layers(prepared: fx.GraphModule) -> list[QuantizedLayer]:
    """The layers `prepared` gave a weight grid."""
    return [
        m
        for m in prepared.modules()
        if isinstance(m, QuantizedLayer) and not isinstance(m.weight_quantizer, nn.Identity)
    ]


def file_agrees(prepared: fx.GraphModule, x: torch.Tensor, path: Path) -> float:
    """The largest difference between ONNX Runtime on the exported file and the module in
    eval mode, in steps of the output's 8-bit grid."""
    export(prepared, path, x[:1])
    with torch.no_grad():
        want = prepared.eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - want).max() / (np.ptp(want) / 255))


def test_a_prepared_module_moves_like_any_module():
    """`.to()`, `.cpu()` and `.float()` go through nn.Module._apply, which a layer's own
    helper of that name had shadowed: no prepared module could be trained on a GPU."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    prepared = prepare(model, torch.randn(2, 3, 8, 8))
    assert prepared.to("cpu").float().cpu() is prepared
    assert quantized_layers(prepared)


class CalledTwice(nn.Module):
    """One Conv called twice, a BatchNorm after its first call only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(self.conv(x))))


def test_a_layer_called_twice_folds_no_batchnorm_into_both_calls(tmp_path):
    model = CalledTwice()
    model.bn.running_mean.uniform_(-2, 2)
    model.bn.running_var.uniform_(0.1, 4)
    model.bn.weight.data.uniform_(0.2, 3)
    x = torch.randn(8, 4, 8, 8)
    prepared = prepare(model.eval(), x[:1], QuantConfig(), [x])
    with torch.no_grad():
        want, got = model(x), prepared.eval()(x)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert file_agrees(prepared, x, tmp_path / "twice.onnx") <= 2


def test_an_in_place_relu_prepares(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3))
    x = torch.randn(4, 3, 10, 10)
    prepared = prepare(model, x[:1], QuantConfig(), [x])
    assert len(quantized_layers(prepared)) == 2
    assert file_agrees(prepared, x, tmp_path / "inplace.onnx") <= 2


@pytest.mark.parametrize(
    ("case", "model", "shape"),
    [
        ("tokens", nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)), (8, 7, 5)),
        ("square", nn.Sequential(nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 3)), (8, 6)),
        ("no affine", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False),
                                    nn.ReLU(), nn.Conv2d(4, 2, 3)), (8, 3, 8, 8)),
    ],
)  # fmt: skip
def test_every_layer_is_quantized_and_the_file_agrees(tmp_path, case, model, shape):
    """A Linear on token sequences (exported as MatMul + Add), a square Linear (whose MatMul
    weight is its transpose, of the same shape), and a Conv before a BatchNorm without gamma
    and beta (folded with 1 and 0) had all been left float as "not a Linear module"."""
    x = torch.randn(*shape)
    prepared = prepare(model.eval(), x[:1], QuantConfig(), [x])
    assert len(quantized_layers(prepared)) == 2, case
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    prepared.train()
    for _ in range(5):
        optimizer.zero_grad()
        prepared(x).square().mean().backward()
        optimizer.step()
    assert file_agrees(prepared, x, tmp_path / "layers.onnx") <= 2


def test_calibration_takes_no_warm_up_step_and_modes_are_kept(tmp_path):
    """A BatchNorm warm-up counts training steps only; a submodule the user holds in eval
    mode (a frozen BatchNorm, a Dropout) stays so through prepare and export."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5),
    )  # fmt: skip
    model.train()
    model[4].eval()
    model[6].eval()
    x = torch.randn(8, 3, 8, 8)
    prepared = prepare(model, x[:1], QuantConfig(), list(x.split(2)))
    assert int(prepared.get_submodule("0").steps) == 0
    export(prepared, tmp_path / "modes.onnx", x[:1])
    flags = {name: prepared.get_submodule(name).training for name in ("", "0", "4", "6")}
    assert flags == {"": True, "0": True, "4": False, "6": False}


def test_mistakes_are_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare(model, x)
    with pytest.raises(UsageError, match="prepared already"):
        prepare(prepared, x)
    with pytest.raises(UsageError, match="names no node or op type"):
        prepare(model, x, QuantConfig(exclude=("conv1",)))
    with torch.inference_mode(), pytest.raises(UsageError, match="inference_mode"):
        prepare(model, x)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.boxes, self.scores = (
            nn.Conv2d(3, 4, 3),
            nn.Conv2d(4, 2, 1),
            nn.Conv2d(4, 3, 1),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = torch.relu(self.body(x))
        return {"boxes": self.boxes(y), "scores": self.scores(y)}


def test_a_dict_output_names_the_files_outputs_by_its_keys(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    path = export(prepare(TwoHeads(), x[:1], QuantConfig(), [x]), tmp_path / "heads.onnx", x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores"]


class Aliased(nn.Module):
    """One tensor read directly and through an Identity (a ResNet block's shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.shortcut, self.a = nn.Identity(), nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.shortcut(x)) + self.a(x)


def test_a_tensor_read_beside_an_identity_trains_on_the_files_grid(tmp_path):
    """Fake quantization had gone after the Identity only: readers of the tensor itself
    trained on float, 5-12 steps from the file."""
    x = torch.randn(8, 3, 8, 8)
    prepared = prepare(Aliased().eval(), x[:1], QuantConfig(), [x])
    reads = {n.target: n.args[0] for n in prepared.graph.nodes if n.target in ("a", "b")}
    assert all(str(arg.target).startswith("activation_quantizer") for arg in reads.values())
    assert file_agrees(prepared, x, tmp_path / "aliased.onnx") <= 1


@pytest.mark.parametrize("after", [nn.Dropout(0.2), nn.Identity()], ids=["dropout", "identity"])
def test_a_layer_before_a_dropout_or_identity_is_quantized(after):
    """It had been kept float as "not a torch Conv1d/2d/3d or Linear module"."""
    model = nn.Sequential(nn.Linear(6, 8), after, nn.ReLU(), nn.Linear(8, 3))
    prepared = prepare(model.eval(), torch.randn(4, 6))
    assert len(quantized_layers(prepared)) == 2


class SharedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_batchnorms_keep_their_mode_and_a_shared_one_is_not_folded():
    """A folded BatchNorm held in eval mode came back training (its statistics moved); one
    BatchNorm after two Convs had ended prepare in an AttributeError."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    model[1].eval()
    prepared = prepare(model, torch.randn(4, 3, 8, 8))
    assert not prepared.get_submodule("0.batchnorm").training
    shared = prepare(SharedNorm().eval(), torch.randn(2, 3, 4, 4))
    assert isinstance(shared.get_submodule("bn"), nn.BatchNorm2d)
