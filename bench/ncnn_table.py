"""qdq's ranges in ncnn: the digits CNN in ncnn int8 with qdq's table vs ncnn's own KL recipe.

Run: pip install -e '.[bench]' && python bench/ncnn_table.py
Converts examples/digits/cnn.onnx with pnnx (float32 weights), quantizes it with qdq and
exports the ncnn table (`qdq export-table --format ncnn --ncnn-param`), builds ncnn's second
table as `ncnn2table method=kl` does (weights 127 / absmax per output channel, 31 / absmax for
3x3 stride-1 convolutions; activations by KL over 2048 bins of |x|, thresholds 128..2047),
applies each table as `ncnn2int8` would (`8=2` on each Convolution / InnerProduct, weight and
input scales after its weights; ncnn quantizes float weights at load), and reports the
accuracy of each ncnn net on the 540 held-out images. The pip packages ship neither ncnn2table
nor ncnn2int8, hence the reimplementation. No asserts.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import ncnn
import numpy as np

from qdq.report.tables import parse_ncnn_table, write_table

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
QUANTIZED = ("Convolution", "InnerProduct")  # what the digits CNN holds of ncnn2int8's layers
BINS, TARGET = 2048, 128


def convert(folder: Path) -> tuple[Path, Path]:
    """pnnx's ncnn files for the digits CNN, weights stored as float32."""
    model = folder / "cnn.onnx"
    model.write_bytes((DIGITS / "cnn.onnx").read_bytes())
    pnnx = Path(sys.executable).with_name("pnnx")
    command = [str(pnnx), str(model), "inputshape=[1,1,8,8]", "fp16=0"]
    subprocess.run(command, cwd=folder, check=True, capture_output=True)
    return folder / "cnn.ncnn.param", folder / "cnn.ncnn.bin"


def layers(param: Path) -> list[tuple[str, str, list[str], dict[str, str]]]:
    """(type, name, bottoms, params) per layer of an ncnn .param."""
    found = []
    for line in param.read_text().splitlines()[2:]:
        kind, name, bottoms, tops, *rest = line.split()
        blobs = rest[: int(bottoms) + int(tops)]
        params = dict(p.split("=", 1) for p in rest[len(blobs) :])
        found.append((kind, name, blobs[: int(bottoms)], params))
    return found


def run(param: Path, weights: Path, x: np.ndarray, blobs: list[str], int8: bool) -> list:
    """Each of `blobs` for every sample of `x`, from ncnn (int8 inference if asked)."""
    net = ncnn.Net()
    net.opt.use_int8_inference = int8
    net.opt.num_threads = 1
    net.load_param(str(param))
    net.load_model(str(weights))
    outputs = []
    for sample in x:
        extractor = net.create_extractor()
        extractor.input("in0", ncnn.Mat(np.ascontiguousarray(sample)))
        outputs.append([np.array(extractor.extract(b)[1]) for b in blobs])
    return outputs


def kl_scale(values: list[np.ndarray]) -> float:
    """ncnn2table's KL threshold of one blob, as 127 / threshold."""
    absmax = max(float(np.abs(v).max()) for v in values)
    histogram = np.zeros(BINS)
    for v in values:
        v = np.abs(v[v != 0])
        np.add.at(histogram, np.minimum((v / absmax * BINS).astype(int), BINS - 1), 1)
    histogram /= histogram.sum()
    cumulative = np.concatenate([[0.0], np.cumsum(histogram)])
    best, best_kl = TARGET, np.inf
    for threshold in range(TARGET, BINS):
        clip = histogram[:threshold] + 1e-4
        clip[-1] += histogram[threshold:].sum()
        per_bin = threshold / TARGET
        edges = np.arange(TARGET + 1) * per_bin  # merged bins' edges, in source bins
        mass = np.diff(np.interp(edges, np.arange(threshold + 1), cumulative[: threshold + 1]))
        density = mass / per_bin
        # spread each merged bin's density back over the source bins it overlaps
        integral = np.concatenate([[0.0], np.cumsum(density * per_bin)])
        expanded = np.diff(np.interp(np.arange(threshold + 1), edges, integral)) + 1e-4
        kl = float(np.sum(clip * np.log(clip / expanded)))
        if kl < best_kl:
            best, best_kl = threshold, kl
    return 127 / ((best + 0.5) * absmax / BINS)


def ncnn_recipe(param: Path, weights: Path, calib: np.ndarray) -> dict[str, np.ndarray]:
    """ncnn2table method=kl's table for the float net."""
    net_layers = [entry for entry in layers(param) if entry[0] in QUANTIZED]
    data = read_weights(param, weights)
    table = {}
    for kind, name, _, params in net_layers:
        w, _ = data[name]
        rows = w.reshape(int(params["0"]), -1)
        winograd = kind == "Convolution" and params.get("1") == "3" and params.get("3", "1") == "1"
        table[f"{name}_param_0"] = (31 if winograd else 127) / np.abs(rows).max(axis=1)
    outputs = run(param, weights, calib, [b[0] for _, _, b, _ in net_layers], int8=False)
    for i, (_, name, _, _) in enumerate(net_layers):
        table[name] = np.array([kl_scale([o[i] for o in outputs])])
    return table


def read_weights(param: Path, weights: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """(weights, bias) per quantizable layer, from pnnx's float32 .bin (tag 0, raw floats)."""
    raw, offset, found = weights.read_bytes(), 0, {}
    for kind, name, _, params in layers(param):
        if kind not in QUANTIZED:
            continue
        size = int(params["6" if kind == "Convolution" else "2"])
        (tag,) = struct.unpack_from("<I", raw, offset)
        if tag != 0:
            raise SystemExit(f"{name}: weights stored with tag {tag:#x}; convert with fp16=0")
        w = np.frombuffer(raw, np.float32, size, offset + 4)
        offset += 4 + 4 * size
        bias = None
        if params.get("5" if kind == "Convolution" else "1", "0") == "1":
            bias = np.frombuffer(raw, np.float32, int(params["0"]), offset)
            offset += 4 * bias.size
        found[name] = (w, bias)
    return found


def int8_net(param: Path, weights: Path, table: dict[str, np.ndarray], stem: Path):
    """The net with `table` applied as ncnn2int8 applies it (weights quantized at load)."""
    data = read_weights(param, weights)
    lines, blob = param.read_text().splitlines(), bytearray()
    for i, (kind, name, _, _) in enumerate(layers(param), start=2):
        if kind not in QUANTIZED:
            continue
        lines[i] += " 8=2"
        w, bias = data[name]
        blob += struct.pack("<I", 0) + w.tobytes() + (bias.tobytes() if bias is not None else b"")
        blob += table[f"{name}_param_0"].astype(np.float32).tobytes()
        blob += table[name].astype(np.float32).tobytes()
    stem.with_suffix(".param").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".bin").write_bytes(bytes(blob))
    return stem.with_suffix(".param"), stem.with_suffix(".bin")


def accuracy(param: Path, weights: Path, x: np.ndarray, y: np.ndarray, int8: bool) -> float:
    logits = np.stack([o[0].reshape(-1) for o in run(param, weights, x, ["out0"], int8)])
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    from qdq.pipeline import quantize_model

    calib = np.load(DIGITS / "calib.npz")["input"]
    test = np.load(DIGITS / "test.npz")
    x, y = test["input"], test["label"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        param, weights = convert(folder)
        quantize_model(DIGITS / "cnn.onnx", folder / "q.onnx", DIGITS / "calib.npz")
        write_table(folder / "q.onnx", folder / "qdq.table", "ncnn", param)
        qdq_table = parse_ncnn_table((folder / "qdq.table").read_text())
        own_table = ncnn_recipe(param, weights, calib)
        rows = [("ncnn fp32", accuracy(param, weights, x, y, False))]
        for label, table in (
            ("ncnn int8, ncnn2table KL", own_table),
            ("ncnn int8, qdq", qdq_table),
        ):
            net = int8_net(param, weights, table, folder / label.split()[-1])
            rows.append((label, accuracy(*net, x, y, True)))
    for label, value in rows:
        print(f"{label:<28} {value:.4f}")


if __name__ == "__main__":
    main()
