"""Train the bundled digits models and write them with their data (needs the `torch` extra).

Run once from the repository root: python examples/digits/train.py
Writes cnn.onnx, mobilenet.onnx (depthwise-separable; mobilenet_bn.onnx keeps its BatchNorm
nodes), transformer.onnx, calib.npz (256 training images) and test.npz (the 540 held-out images
with labels). Deterministic for a given torch build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
TEST_SIZE = 540
CALIB_SIZE = 256


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU6(),
    ]  # fmt: skip


def mobilenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        *separable(16, 32, 1), *separable(32, 64, 2), *separable(64, 64, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class Transformer(nn.Module):
    """Each image row is a token: 8 tokens of 8 pixels, two GELU encoder layers, mean pooling."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.randn(8, width) * 0.1)
        layer = nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(-1, 8, 8)) + self.position
        return self.head(self.encoder(tokens).mean(dim=1))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 60) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    test, fit = order[:TEST_SIZE], order[TEST_SIZE:]
    np.savez_compressed(HERE / "calib.npz", input=images[fit[:CALIB_SIZE]])
    np.savez_compressed(HERE / "test.npz", input=images[test], label=labels[test])
    x, y = torch.from_numpy(images[fit]), torch.from_numpy(labels[fit])
    for name, build in (("cnn", cnn), ("mobilenet", mobilenet), ("transformer", Transformer)):
        model = train(build(), x, y)
        with torch.no_grad():
            accuracy = model(torch.from_numpy(images[test])).argmax(1).numpy() == labels[test]
        print(f"{name}: test accuracy {accuracy.mean():.4f}")
        export(model, x[:1], HERE / f"{name}.onnx", torch.onnx.TrainingMode.EVAL)
        if name == "mobilenet":  # BatchNorm kept as nodes, for data-free quantization
            export(model, x[:1], HERE / "mobilenet_bn.onnx", torch.onnx.TrainingMode.PRESERVE)


def export(model: nn.Module, example: torch.Tensor, path: Path, mode: object) -> None:
    """ONNX opset 17 with a dynamic batch; EVAL folds BatchNorm into Conv, PRESERVE keeps it."""
    torch.onnx.export(
        model, (example,), path, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
        training=mode,
    )  # fmt: skip


if __name__ == "__main__":
    main()
