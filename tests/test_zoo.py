"""`qdq quantize-many`: every model of a manifest, done ones skipped, a failure isolated."""

from __future__ import annotations

import shutil

import pytest

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
    assert main(["quantize-many", str(manifest)]) == 2  # not every model was quantized
    captured = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1] for line in captured.out.splitlines()[1:]}
    assert rows == {"cnn": "done", "broken": "failed", "cnn4": "done"}
    assert "1 of 3 models failed: broken" in captured.err
    assert captured.err.count("\n") == 1
    assert (tmp_path / "out" / "cnn4_int8.onnx.report.txt").read_text().startswith("wrote")
    assert main(["quantize-many", str(manifest)]) == 2
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"cnn": "skipped", "broken": "failed", "cnn4": "skipped"}


def test_a_manifest_without_required_keys_is_exit_2(tmp_path, capsys):
    manifest = tmp_path / "zoo.toml"
    manifest.write_text('[[model]]\nname = "a"\nmodel = "a.onnx"\n')
    assert main(["quantize-many", str(manifest)]) == 2
    assert "lacks ['calib', 'output']" in capsys.readouterr().err


def _entry(name: str, model: str, calib: str, output: str) -> str:
    return (
        f'[[model]]\nname = "{name}"\nmodel = "{model}"\ncalib = "{calib}"\noutput = "{output}"\n'
    )


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([("a", "cnn.onnx", "calib.npz", "b.onnx"), ("b", "b.onnx", "calib.npz", "bq.onnx")],
         "a's output"),
        ([("a", "cnn.onnx", "calib.npz", "same.onnx"), ("b", "cnn.onnx", "calib.npz", "same.onnx")],
         "b's output"),
        ([("a", "cnn.onnx", "calib.npz", "zoo.toml")], "the manifest"),
        ([("a", "cnn.onnx", "samples", "samples/q.onnx")], "a's calib"),
        ([("a", "cnn.onnx", "calib.npz", "out/")], "is a folder"),
    ],
)  # fmt: skip
def test_an_output_that_another_entry_reads_or_writes_is_refused_before_any_work(
    tmp_path, capsys, entries, words
):
    """Written in turn, it had overwritten another entry's model or the manifest (exit 0)."""
    for name in ("cnn.onnx", "calib.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    (tmp_path / "b.onnx").write_bytes((tmp_path / "cnn.onnx").read_bytes())
    (tmp_path / "samples").mkdir()
    manifest = tmp_path / "zoo.toml"
    manifest.write_text("".join(_entry(*e) for e in entries))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["quantize-many", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "text",
    ["model = 5\n", "defaults = 3\n" + _entry("a", "m.onnx", "c.npz", "q.onnx"),
     _entry("a", "m.onnx", "c.npz", "q.onnx") + "options = [1, 2]\n",
     '[[model]]\nname = "a"\nmodel = 5\ncalib = "c.npz"\noutput = "q.onnx"\n',
     # read silently before (sweep 4): a misspelt table or key, a name that is a table
     "[default]\nmethod = 'kl'\n" + _entry("a", "m.onnx", "c.npz", "q.onnx"),
     _entry("a", "m.onnx", "c.npz", "q.onnx") + "optons = { seed = 1 }\n",
     '[[model]]\nname = { a = 1 }\nmodel = "m.onnx"\ncalib = "c.npz"\noutput = "q.onnx"\n',
     '[[model]]\nname = "a\\nqdq: error: forged"\nmodel = "m.onnx"\ncalib = "c.npz"\n'
     'output = "q.onnx"\n'],
)  # fmt: skip
def test_a_manifest_with_values_of_the_wrong_type_is_exit_2(tmp_path, capsys, text):
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(text)
    assert main(["quantize-many", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdq: error: "), err
    assert err.count("\n") == 1, err


def test_a_failed_model_leaves_no_folders_behind(tmp_path, capsys):
    shutil.copy(DIGITS / "cnn.onnx", tmp_path / "cnn.onnx")
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(_entry("a", "cnn.onnx", "missing.npz", "new/deep/a.onnx"))
    assert main(["quantize-many", str(manifest)]) == 2
    assert not (tmp_path / "new").exists()


def test_an_output_path_that_does_not_resolve_is_exit_2(tmp_path, capsys):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(_entry("a", "cnn.onnx", "calib.npz", "loop1"))
    assert main(["quantize-many", str(manifest)]) == 2
    assert "does not resolve" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ('per_channel = "no"', "`per_channel` must be bool"),  # was read as true
        ("output_parts = [5]", "must be a tuple of strings"),  # an internal error
        ("exclude = [[1, 2]]", "must be a tuple of strings"),
        ('weight_bits = "four"', "`weight_bits` must be an integer"),
        ('weights = "int8"', "set through per_channel, weight_bits"),
    ],
)
def test_an_option_of_the_wrong_type_fails_its_model_in_one_line(tmp_path, capsys, options, words):
    shutil.copy(DIGITS / "cnn.onnx", tmp_path / "cnn.onnx")
    shutil.copy(DIGITS / "calib.npz", tmp_path / "calib.npz")
    manifest = tmp_path / "zoo.toml"
    entry = _entry("a", "cnn.onnx", "calib.npz", "out/a.onnx")
    manifest.write_text(entry + f"options = {{ {options} }}\n")
    assert main(["quantize-many", str(manifest)]) == 2
    out, err = capsys.readouterr()
    assert words in out, out
    assert "internal error" not in out + err
    assert not (tmp_path / "out").exists()


def test_an_image_folder_entry_takes_the_image_options(tmp_path, capsys):
    """They were refused as unknown QuantConfig fields, so pictures were read with mean 0."""
    from PIL import Image

    shutil.copy(DIGITS / "cnn.onnx", tmp_path / "cnn.onnx")
    (tmp_path / "pictures").mkdir()
    for i in range(8):
        Image.new("L", (8, 8), 30 * i).save(tmp_path / "pictures" / f"{i}.png")
    manifest = tmp_path / "zoo.toml"
    entry = _entry("a", "cnn.onnx", "pictures", "out/a.onnx")
    manifest.write_text(entry + "options = { mean = [0.5], std = [0.25], method = 'minmax' }\n")
    assert main(["quantize-many", str(manifest)]) == 0
    report = (tmp_path / "out" / "a.onnx.report.txt").read_text()
    assert "less mean [0.5], over std [0.25]" in report


def test_image_options_of_the_wrong_shape_fail_their_model_in_one_qdq_line(tmp_path, capsys):
    """`image_size = 224` (one number) gave Python's TypeError text."""
    shutil.copy(DIGITS / "cnn.onnx", tmp_path / "cnn.onnx")
    shutil.copy(DIGITS / "calib.npz", tmp_path / "calib.npz")
    manifest = tmp_path / "zoo.toml"
    entry = _entry("a", "cnn.onnx", "calib.npz", "out/a.onnx")
    manifest.write_text(entry + "options = { image_size = 224 }\n")
    assert main(["quantize-many", str(manifest)]) == 2
    assert "`size` must be two sizes >= 1" in capsys.readouterr().out


def test_a_model_whose_report_cannot_be_written_is_not_done(tmp_path, capsys):
    """The report marks a model done: where it cannot be written (a folder holds its name),
    the model fails and leaves no output, so a rerun does not skip it as done."""
    for name in ("cnn.onnx", "calib.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    (tmp_path / "out" / "a.onnx.report.txt").mkdir(parents=True)
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(_entry("a", "cnn.onnx", "calib.npz", "out/a.onnx"))
    for _ in range(2):
        assert main(["quantize-many", str(manifest)]) == 2
        out = capsys.readouterr().out
        assert "a's report" in out.splitlines()[1], out
        assert not (tmp_path / "out" / "a.onnx").exists()


def test_a_manifest_sets_the_seed_and_refuses_workers(tmp_path, capsys):
    for name in ("cnn.onnx", "calib.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    manifest = tmp_path / "zoo.toml"
    entry = _entry("a", "cnn.onnx", "calib.npz", "out/a.onnx")
    manifest.write_text(entry + 'options = { seed = 3, method = "minmax", prefer = "int8" }\n')
    assert main(["quantize-many", str(manifest)]) == 0
    manifest.write_text(entry + "options = { workers = 2 }\n")
    assert main(["quantize-many", str(manifest)]) == 2
    assert "give --workers" in capsys.readouterr().err


def test_an_interrupted_run_says_the_done_models_stay(tmp_path, capsys, monkeypatch):
    import signal

    import qdq.zoo
    from qdq.errors import Interrupted

    for name in ("cnn.onnx", "calib.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    manifest = tmp_path / "zoo.toml"
    entries = [_entry(n, "cnn.onnx", "calib.npz", f"out/{n}.onnx") for n in ("a", "b")]
    manifest.write_text("".join(entries) + '[defaults]\nmethod = "minmax"\n')
    real = qdq.zoo.quantize_model

    def second_interrupted(model, output, *args, **kwargs):
        if output.name == "b.onnx":
            raise Interrupted(signal.SIGTERM)
        return real(model, output, *args, **kwargs)

    monkeypatch.setattr(qdq.zoo, "quantize_model", second_interrupted)
    assert main(["quantize-many", str(manifest)]) == 128 + signal.SIGTERM
    assert "the models done before it are kept" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.onnx", "a.onnx.report.txt"]


def test_a_data_free_entry_needs_no_calib_and_a_misspelt_option_is_named(tmp_path, capsys):
    """A data-free model had no way in (`calib` required, then refused by data_free); an
    unknown option had failed its model in Python's words, and only when its turn came."""
    shutil.copy(DIGITS / "mobilenet_bn.onnx", tmp_path / "bn.onnx")
    manifest = tmp_path / "zoo.toml"
    entry = '[[model]]\nname = "a"\nmodel = "bn.onnx"\noutput = "out/a.onnx"\n'
    manifest.write_text(entry + "options = { data_free = true }\n")
    assert main(["quantize-many", str(manifest)]) == 0, capsys.readouterr()
    assert (tmp_path / "out" / "a.onnx").exists()
    manifest.write_text(entry + 'options = { data_free = true, methd = "kl" }\n')
    assert main(["quantize-many", str(manifest)]) == 2
    assert "unknown option 'methd'; did you mean method?" in capsys.readouterr().err
    manifest.write_text(entry + 'calib = "c.npz"\noptions = { data_free = true }\n')
    assert main(["quantize-many", str(manifest)]) == 2
    assert "data_free uses no calibration data; drop calib" in capsys.readouterr().err


def test_an_output_onto_another_models_weights_and_a_repeated_name_are_refused(tmp_path, capsys):
    """Entry a's output was entry b's external weights file: written, then b quantized from
    it "done"; two entries named alike had been refused without the name."""
    import onnx

    model = onnx.load(str(DIGITS / "cnn.onnx"))
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.weights",
              size_threshold=0)  # fmt: skip
    shutil.copy(DIGITS / "calib.npz", tmp_path / "calib.npz")
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(_entry("a", "ext.onnx", "calib.npz", "ext.weights")
                        + _entry("b", "ext.onnx", "calib.npz", "b.onnx"))  # fmt: skip
    before = (tmp_path / "ext.weights").read_bytes()
    assert main(["quantize-many", str(manifest)]) == 2
    assert "a's output" in capsys.readouterr().err
    assert (tmp_path / "ext.weights").read_bytes() == before
    manifest.write_text(_entry("a", "ext.onnx", "calib.npz", "a.onnx")
                        + _entry("a", "ext.onnx", "calib.npz", "a2.onnx"))  # fmt: skip
    assert main(["quantize-many", str(manifest)]) == 2
    assert "number 2: name 'a' is also number 1's" in capsys.readouterr().err
