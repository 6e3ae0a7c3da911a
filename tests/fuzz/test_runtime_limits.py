"""Models on which ONNX Runtime itself stops: scales its int8 kernels refuse, a session build
that ends in a segmentation fault. qdq plans around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hostile import Workspace, X, quantize, run_contract, save
from onnx import numpy_helper


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.mark.parametrize("pool", ["GlobalAveragePool", "AveragePool"])
def test_a_pool_whose_mean_is_near_zero_on_every_sample_runs_in_int8(ws, pool):
    """A stride-2 2x2 ConvTranspose of normalised channels averages to 0: the pool's output
    range was so narrow that ONNX Runtime's int8 pool refused its scales ("parameter out of
    computation range"), an internal error; its grid now spans what the kernel takes."""
    rng = np.random.default_rng(0)
    attrs = {"kernel_shape": [16, 16]} if pool == "AveragePool" else {}
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("InstanceNormalization", ["c1", "g", "b"], ["n"]),
        onnx.helper.make_node("ConvTranspose", ["n", "wt"], ["ct"], strides=[2, 2]),
        onnx.helper.make_node(pool, ["ct"], ["p"], **attrs),
        onnx.helper.make_node("Flatten", ["p"], ["f"]),
        onnx.helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    weights = {"w1": rng.standard_normal((4, 3, 3, 3)) * 0.3, "g": np.ones(4), "b": np.zeros(4),
               "wt": rng.standard_normal((4, 6, 2, 2)) * 0.5, "w2": rng.standard_normal((5, 6)),
               "b2": rng.standard_normal(5)}  # fmt: skip
    graph = onnx.helper.make_graph(
        nodes,
        "pooled",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), ws.model)
    np.savez(ws.calib, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    out = ws.folder / "out.onnx"
    assert run_contract(ws, quantize(ws), out).code == 0
    assert ort.InferenceSession(str(out)).run(None, {"x": X[:2]})[0].shape == (2, 5)


def test_a_float16_vit_that_crashes_onnx_runtime_is_quantized_and_compared(tmp_path):
    """ONNX Runtime 1.32 ends in a segmentation fault building a session of this float16 ViT
    export (its MatMul-Transpose fusion); qdq ran the user's file in its output check, compare
    and report: exit -11, nothing said. Those sessions leave that fusion out."""
    torch = pytest.importorskip("torch")
    import subprocess
    import sys

    torch.manual_seed(0)

    class ViT(torch.nn.Module):
        def __init__(self, dim: int = 32) -> None:
            super().__init__()
            self.patches = torch.nn.Conv2d(3, dim, 4, 4)
            self.cls = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = torch.nn.Parameter(torch.randn(1, 65, dim) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(dim, 4, dim * 2, dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True)  # fmt: skip
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(dim, 10)

        def forward(self, x):
            x = self.patches(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            return self.head(self.encoder(x)[:, 0])

    model, x = ViT().eval().half(), torch.randn(16, 3, 32, 32).half()
    source, out, calib = tmp_path / "vit.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    torch.onnx.export(model, (x[:2],), source, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes={"x": {0: "N"}})  # fmt: skip
    np.savez(calib, x=x.numpy())
    for args in (["quantize", source, "-o", out, "--calib", calib], ["compare", source, out,
                 "--data", calib, "--latency-runs", "0"]):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "qdq.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
