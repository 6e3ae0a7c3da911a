"""Calibration data in every accepted form gives the same samples, checked against the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qdq import data
from qdq.data import ImageOptions, InputSpec, Samples
from qdq.errors import DataError

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 3, 4, 5))]
X = np.random.default_rng(0).standard_normal((10, 3, 4, 5)).astype(np.float32)


def collect(samples: Samples, batch_size: int = 4) -> np.ndarray:
    return np.concatenate([feed["x"] for feed in samples.batches(batch_size)])


def test_npz_npy_and_npy_folders_give_the_same_samples(tmp_path):
    np.savez(tmp_path / "a.npz", anything=X)
    np.save(tmp_path / "a.npy", X)
    plain, batched = tmp_path / "plain", tmp_path / "batched"
    plain.mkdir()
    batched.mkdir()
    for i, sample in enumerate(X):
        np.save(plain / f"{i:03d}.npy", sample)
        np.save(batched / f"{i:03d}.npy", sample[None])
    for source in ("a.npz", "a.npy", "plain", "batched"):
        assert np.array_equal(collect(Samples(tmp_path / source, SPEC)), X), source


def test_npy_folders_tell_a_batch_axis_from_a_channel_axis_of_one(tmp_path):
    spec = [InputSpec("x", np.dtype(np.float32), (None, 1, 8, 8))]  # one channel: (1, 8, 8)
    images = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    for i, image in enumerate(images):
        np.save(tmp_path / f"{i}.npy", image)
    assert np.array_equal(collect(Samples(tmp_path, spec)), images)


def test_npy_files_of_several_shapes_are_read_one_at_a_time_each_as_it_is(tmp_path):
    """Clips of several lengths for a model with a free time axis: ONNX Runtime runs each,
    and qdq had refused the folder ("samples ... have different shapes")."""
    spec = [InputSpec("x", np.dtype(np.float32), (None, 1, None))]
    clips = [np.random.default_rng(i).random((1, 1, 50 + 7 * i), np.float32) for i in range(5)]
    for i, clip in enumerate(clips):  # with a batch axis of 1, or without
        np.save(tmp_path / f"{i}.npy", clip if i % 2 else clip[0])
    feeds = [feed["x"] for feed in Samples(tmp_path, spec).batches(4)]
    assert [f.shape for f in feeds] == [c.shape for c in clips]
    assert all(np.array_equal(f, c) for f, c in zip(feeds, clips, strict=True))


def test_batches_are_bounded_and_max_samples_and_seed_pick_a_subset(tmp_path):
    np.save(tmp_path / "a.npy", X)
    sizes = [len(f["x"]) for f in Samples(tmp_path / "a.npy", SPEC).batches(4)]
    assert sizes == [4, 4, 2]
    first = collect(Samples(tmp_path / "a.npy", SPEC, max_samples=3))
    assert np.array_equal(first, X[:3])
    picked = collect(Samples(tmp_path / "a.npy", SPEC, max_samples=3, seed=1))
    again = collect(Samples(tmp_path / "a.npy", SPEC, max_samples=3, seed=1))
    assert np.array_equal(picked, again)
    assert not np.array_equal(picked, first)


def test_a_leading_axis_fixed_at_1_gets_batches_of_1_and_other_fixed_ones_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", X)
    fixed = [InputSpec("x", np.dtype(np.float32), (1, 3, 4, 5))]
    batches = list(Samples(tmp_path / "a.npy", fixed).batches(4, first=2, last=5))
    assert [len(f["x"]) for f in batches] == [1, 1, 1]
    assert np.array_equal(np.concatenate([f["x"] for f in batches]), X[2:5])
    eight = [InputSpec("x", np.dtype(np.float32), (8, 3, 4, 5))]
    with pytest.raises(DataError, match=r"needs samples of shape \(8, 3, 4, 5\), got \(3, 4, 5\)"):
        Samples(tmp_path / "a.npy", eight)


def test_an_input_not_batched_on_its_leading_axis_takes_a_whole_tensor_per_sample(tmp_path):
    """Silero VAD's state, [2, batch, 128]: each sample holds the whole tensor, and samples go
    one per call; qdq had refused the model ("has its leading axis fixed at 2")."""
    spec = [*SPEC, InputSpec("state", np.dtype(np.float32), (2, None, 6))]
    states = np.random.default_rng(2).random((10, 2, 1, 6), np.float32)
    np.savez(tmp_path / "s.npz", x=X, state=states)
    feeds = list(Samples(tmp_path / "s.npz", spec).batches(4))
    assert [f["state"].shape for f in feeds] == [(2, 1, 6)] * 10
    assert np.array_equal(np.stack([f["state"] for f in feeds]), states)
    assert np.array_equal(np.concatenate([f["x"] for f in feeds]), X)


def test_a_scalar_input_takes_one_value_per_sample_fed_one_sample_a_call(tmp_path):
    """A sample rate or a threshold as a rank-0 input: its .npz array holds a value per
    sample; qdq had refused the model ("fold its value into the model")."""
    scalar = [*SPEC, InputSpec("rate", np.dtype(np.int64), ())]
    rates = np.arange(10) * 1000
    np.savez(tmp_path / "b.npz", x=X, rate=rates)
    feeds = list(Samples(tmp_path / "b.npz", scalar).batches(4))
    assert [f["rate"].shape for f in feeds] == [()] * 10
    assert [int(f["rate"]) for f in feeds] == rates.tolist()
    assert np.array_equal(np.concatenate([f["x"] for f in feeds]), X)


def test_a_free_axis_beside_a_batch_fixed_at_1_is_a_sequence_timed_in_one_call(tmp_path):
    frames = X.reshape(10, 60)
    state = np.arange(10, dtype=np.float32).reshape(10, 1)
    np.savez(tmp_path / "a.npz", frames=frames, state=state)
    spec = [
        InputSpec("frames", np.dtype(np.float32), (None, 60)),  # Silero VAD's frames
        InputSpec("state", np.dtype(np.float32), (1, 1)),  # one LSTM state: batch 1
    ]
    feed, count = Samples(tmp_path / "a.npz", spec).sequence(4, 1 << 20)
    assert count == 4
    assert np.array_equal(feed["frames"], frames[:4])
    assert np.array_equal(feed["state"], state[:1])
    feed, count = Samples(tmp_path / "a.npz", spec, max_samples=3).sequence(4, 1 << 20)
    assert (count, len(feed["frames"])) == (3, 3)
    feed, count = Samples(tmp_path / "a.npz", spec).sequence(4, 2 * 60 * 4)  # two frames' bytes
    assert (count, len(feed["frames"])) == (2, 2)
    # a batched model's free axis is its batch: timed on one sample, as a user calls it
    np.save(tmp_path / "b.npy", X)
    feed, count = Samples(tmp_path / "b.npy", SPEC).sequence(4, 1 << 20)
    assert count == 1
    assert np.array_equal(feed["x"], X[:1])


def test_image_folders_are_resized_scaled_and_normalized(tmp_path):
    pixels = np.zeros((8, 10, 3), np.uint8)
    pixels[..., 0] = 255  # pure red
    Image.fromarray(pixels).save(tmp_path / "red.png")
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, 4, 5))]
    options = ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = collect(Samples(tmp_path, spec, images=options))
    assert x.shape == (1, 3, 4, 5)
    assert np.allclose(x[0, 0], 1.0)  # (1 - 0.5) / 0.5
    assert np.allclose(x[0, 1:], -1.0)
    bgr = collect(Samples(tmp_path, spec, images=ImageOptions(channel_order="BGR")))
    assert np.allclose(bgr[0, 2], 1.0)
    nhwc = [InputSpec("x", np.dtype(np.float32), (None, 4, 5, 3))]
    assert collect(Samples(tmp_path, nhwc, images=ImageOptions(layout="NHWC"))).shape == (
        1, 4, 5, 3,
    )  # fmt: skip


def test_pictures_feed_a_uint8_input_as_whole_pixels(tmp_path):
    """A detector taking uint8 NHWC pixels: each picture's pixels as they are (the folder
    had been refused as float32 whatever the options); scaled ones are refused."""
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    spec = [InputSpec("x", np.dtype(np.uint8), (None, 4, 5, 3))]
    options = ImageOptions(value_scale=1.0, layout="NHWC")
    x = collect(Samples(tmp_path, spec, images=options))
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], pixels)
    with pytest.raises(DataError, match="give `value_scale` 1"):
        collect(Samples(tmp_path, spec, images=ImageOptions(layout="NHWC")))


def test_inputs_without_a_fixed_image_size_ask_for_one(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, None, None))]
    with pytest.raises(DataError, match="give `size`"):
        Samples(tmp_path, spec)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: np.save(p / "d.npy", X[:, :2]), "shape"),
        (lambda p: np.save(p / "d.npy", X.astype(np.int32)), "float32"),
        (lambda p: np.save(p / "d.npy", X[:0]), "no samples"),
        (lambda p: (p / "d.txt").write_text("1 2 3"), "expected an .npz"),
    ],
)
def test_bad_data_is_refused_before_any_work(tmp_path, make, words):
    make(tmp_path)
    source = next(tmp_path.iterdir())
    with pytest.raises(DataError, match=words):
        Samples(source, SPEC)


def test_multi_input_models_need_one_npz_array_per_input(tmp_path):
    specs = [*SPEC, InputSpec("mask", np.dtype(np.float32), (None, 4))]
    np.save(tmp_path / "a.npy", X)
    with pytest.raises(DataError, match="one array per input"):
        Samples(tmp_path / "a.npy", specs)
    np.savez(tmp_path / "b.npz", x=X, mask=np.ones((9, 4), np.float32))
    with pytest.raises(DataError, match="different sample counts"):
        Samples(tmp_path / "b.npz", specs)


def test_npz_arrays_no_input_takes_are_named_not_read(tmp_path):
    """A label array or a misspelt input name beside the inputs is said, not silently dropped."""
    specs = [*SPEC, InputSpec("mask", np.dtype(np.float32), (None, 4))]
    mask = np.ones((len(X), 4), np.float32)
    np.savez(tmp_path / "c.npz", x=X, mask=mask, label=np.arange(len(X)), Mask=mask)
    assert Samples(tmp_path / "c.npz", specs).read_notes() == [
        f"{tmp_path / 'c.npz'}: arrays ['label', 'Mask'] feed no model input; not read"
    ]
    np.savez(tmp_path / "d.npz", x=X, mask=mask)
    assert Samples(tmp_path / "d.npz", specs).read_notes() == []


def test_hidden_files_of_a_folder_are_not_samples(tmp_path):
    """A stale `.x.npy`, or macOS's `._0.png` beside the pictures it describes: not read, and
    said (the first had been a sample, the second had failed the whole folder)."""
    for i, sample in enumerate(X[:3]):
        np.save(tmp_path / f"{i:03d}.npy", sample)
    np.save(tmp_path / ".stale.npy", np.full_like(X[0], 1000.0))
    (tmp_path / "._000.npy").write_bytes(b"AppleDouble")
    samples = Samples(tmp_path, SPEC)
    assert samples.count == 3
    assert samples.read_notes() == [f"{tmp_path}: 2 hidden files (names starting '.'); not read"]


def test_pictures_beside_a_folders_npy_samples_are_named_not_read(tmp_path):
    """The .npy files are the samples; pictures among them had been dropped without a word."""
    for i, sample in enumerate(X[:3]):
        np.save(tmp_path / f"{i:03d}.npy", sample)
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"not read")
    samples = Samples(tmp_path, SPEC)
    assert samples.count == 3
    assert samples.read_notes() == [f"{tmp_path}: 2 pictures beside its .npy files; not read"]


def test_folders_are_read_lazily(tmp_path, monkeypatch):
    for i, sample in enumerate(X):
        np.save(tmp_path / f"{i:03d}.npy", sample)
    opened: list[Path] = []
    real_load = data.load_npy
    monkeypatch.setattr(data, "load_npy", lambda path: opened.append(path) or real_load(path))
    batches = Samples(tmp_path, SPEC).batches(2)
    opened.clear()
    next(batches)
    assert len(opened) == 2  # one batch read, not the whole folder


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_max_samples_bounds_memory_whatever_the_npz_holds(tmp_path, save):
    import tracemalloc

    spec = [InputSpec("x", np.dtype(np.float32), (None, 256, 256))]
    save(tmp_path / "big.npz", x=np.zeros((256, 256, 256), np.float32))  # 64 MiB of samples
    tracemalloc.start()
    try:
        samples = Samples(tmp_path / "big.npz", spec, max_samples=4)
        sizes = [len(feed["x"]) for feed in samples.batches(2)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sizes == [2, 2]
    assert peak < 8 * 2**20  # a few samples (256 KiB each) and 1 MiB reads, not 64 MiB


def test_picked_samples_come_back_in_order_from_a_compressed_npz(tmp_path):
    np.savez_compressed(tmp_path / "a.npz", x=X)
    picked = collect(Samples(tmp_path / "a.npz", SPEC, max_samples=5, seed=3))
    order = np.sort(np.random.default_rng(3).permutation(len(X))[:5])
    assert np.array_equal(picked, X[order])


def test_image_options_refuse_values_that_cannot_normalize():
    with pytest.raises(DataError, match="`std` must be non-zero"):
        ImageOptions(std=(1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="`value_scale` must be finite"):
        ImageOptions(value_scale=float("nan"))
    with pytest.raises(DataError, match="`size` must be two sizes >= 1"):
        ImageOptions(size=(0, 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_pictures_keep_their_levels(tmp_path, channels):
    """PIL's 16-bit -> 8-bit conversion clamps at 255: a 0..65535 ramp read mostly as white."""
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I;16")
    spec = [InputSpec("x", np.dtype(np.float32), (None, channels, 4, 4))]
    x = collect(Samples(tmp_path, spec))
    want = ramp.astype(np.float32) / 65535
    for c in range(channels):
        np.testing.assert_allclose(x[0, c], want, atol=1e-5)


def test_grayscale_images_feed_a_one_channel_input(tmp_path):
    Image.fromarray(np.full((6, 6, 3), 255, np.uint8)).save(tmp_path / "white.png")
    spec = [InputSpec("x", np.dtype(np.float32), (None, 1, 4, 4))]
    x = collect(Samples(tmp_path, spec))
    assert x.shape == (1, 1, 4, 4)
    assert np.allclose(x, 1.0)  # 255 * (1/255)
    # what was done to the pictures is said, so that a wrong folder or option shows
    assert Samples(tmp_path, spec).read_notes() == [
        f"{tmp_path}: pictures read as grayscale 4x4 (resized), pixels times 0.00392157, "
        "less mean [0.0], over std [1.0], NCHW"
    ]
    np.save(tmp_path / "arrays.npy", np.ones((2, 1, 4, 4), np.float32))
    assert Samples(tmp_path / "arrays.npy", spec).read_notes() == []


@pytest.mark.parametrize(
    ("values", "spec", "words"),
    [
        (np.array([[5], [2**33 + 5]], np.int64), ("x", np.int32), "outside its range"),
        (np.array([[7], [-1], [300]]), ("x", np.uint8), r"sample 1 .*\[0, 255\]"),
        (np.full((3, 1), 1e300), ("x", np.float32), r"beyond its range \(up to 3.4e\+38\)"),
    ],
)
def test_values_the_input_type_cannot_hold_are_refused(tmp_path, values, spec, words):
    """int64 2^33 + 5 had been fed to an int32 input as 5, -1 to a uint8 one as 255, and a
    finite 1e300 was called NaN or Inf."""
    np.save(tmp_path / "d.npy", values)
    specs = [InputSpec(spec[0], np.dtype(spec[1]), (None, 1))]
    with pytest.raises(DataError, match=words):
        list(Samples(tmp_path / "d.npy", specs).batches(4))


def test_a_bad_sample_is_named_by_its_place_in_the_data(tmp_path):
    x = X.copy()
    x[7, 0, 1, 1] = np.nan
    np.save(tmp_path / "d.npy", x)
    for seed in (None, 3):
        with pytest.raises(DataError, match=r"sample 7 \(from 0\) holds NaN"):
            list(Samples(tmp_path / "d.npy", SPEC, seed=seed).batches(4))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_pictures_of_32_bit_or_float_pixels_are_refused(tmp_path, mode):
    """PIL's conversion clamps them at 255 (a 0..65535 ramp read as two levels, a 0..1 one
    as two), and no scale is theirs to assume."""
    ramp = np.linspace(0, 65535 if mode == "I" else 1, 16).reshape(4, 4)
    Image.fromarray(ramp.astype(np.int32 if mode == "I" else np.float32), mode).save(
        tmp_path / "ramp.tif"
    )
    spec = [InputSpec("x", np.dtype(np.float32), (None, 1, 4, 4))]
    with pytest.raises(DataError, match="on no scale qdq knows"):
        collect(Samples(tmp_path, spec))


def test_an_empty_path_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    """`--calib "$CALIB"` with CALIB unset had calibrated on whatever .npy files the working
    folder held (Path("") is "."); an empty model path had been named "." in its error."""
    from qdq.errors import ModelError
    from qdq.onnx.model import load_model
    from qdq.outputs import check_output

    np.save(tmp_path / "stray.npy", np.zeros((1, 4), np.float32))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data path is empty"):
        Samples("", [InputSpec("x", np.dtype(np.float32), (None, 4))])
    with pytest.raises(ModelError, match="model path is empty"):
        load_model("")
    check_output(tmp_path / "q.onnx", ["", None])  # its readers say it is empty, not -o


def test_upper_case_suffixes_are_read_and_a_folder_of_folders_is_named(tmp_path):
    """X.NPY and a folder of S0.NPY had been refused (pictures' suffixes were not); a folder of
    class subfolders said only that it held no files."""
    spec = [InputSpec("x", np.dtype(np.float32), (None, 4))]
    np.save(tmp_path / "A.npy", np.ones((3, 4), np.float32))
    (tmp_path / "A.npy").rename(tmp_path / "A.NPY")
    assert collect(Samples(tmp_path / "A.NPY", spec)).shape == (3, 4)
    folder = tmp_path / "upper"
    folder.mkdir()
    np.save(folder / "s0.npy", np.ones(4, np.float32))
    (folder / "s0.npy").rename(folder / "S0.NPY")
    assert collect(Samples(folder, spec)).shape == (1, 4)
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="its subfolders are not read"):
        Samples(tmp_path / "classes", spec)
