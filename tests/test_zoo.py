"""`qdq quantize-many`: every model of a manifest, done ones skipped, a failure isolated."""

from __future__ import annotations

import shutil

from qdq.cli import main

from conftest import DIGITS

MANIFEST = """
[defaults]
method = "minmax"

[[model]]
name = "cnn"
model = "cnn.onnx"
calib = "calib.npz"
output = "out/cnn_int8.onnx"

[[model]]
name = "broken"
model = "missing.onnx"
calib = "calib.npz"
output = "out/broken_int8.onnx"

[[model]]
name = "cnn4"
model = "cnn.onnx"
calib = "calib.npz"
output = "out/cnn4_int8.onnx"
options = { weight_bits = 4, exclude = ["Gemm"] }
"""


def test_a_failed_model_stops_no_other_and_a_rerun_skips_the_done(tmp_path, capsys):
    for name in ("cnn.onnx", "calib.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    (tmp_path / "out").mkdir()
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(MANIFEST)
    assert main(["quantize-many", str(manifest)]) == 0
    captured = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1] for line in captured.out.splitlines()[1:]}
    assert rows == {"cnn": "done", "broken": "failed", "cnn4": "done"}
    assert "1 of 3 models failed: broken" in captured.err
    assert (tmp_path / "out" / "cnn4_int8.onnx.report.txt").read_text().startswith("wrote")
    assert main(["quantize-many", str(manifest)]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"cnn": "skipped", "broken": "failed", "cnn4": "skipped"}


def test_a_manifest_without_required_keys_is_exit_2(tmp_path, capsys):
    manifest = tmp_path / "zoo.toml"
    manifest.write_text('[[model]]\nname = "a"\nmodel = "a.onnx"\n')
    assert main(["quantize-many", str(manifest)]) == 2
    assert "lacks ['calib', 'output']" in capsys.readouterr().err
