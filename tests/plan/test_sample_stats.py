"""The running mean and largest sample that bias correction and pair-safe weights read."""

import numpy as np

from qdq.plan.sample_stats import PENDING, SampleStats


def test_lone_samples_batches_and_shards_give_every_samples_mean_and_largest():
    """A batch-1 model hands its samples one at a time (summed in groups before they join the
    total), a batched one in batches, and shards merge: the mean and the largest sample are
    those of all the samples, whatever the split, including lone samples not yet settled."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(PENDING + 30, 4, 5)).astype(np.float32)
    first, later = SampleStats(), SampleStats()
    for sample in x[: PENDING + 3]:  # a group settled, three pending
        first.update(sample[None])
    first.update(x[PENDING + 3 : PENDING + 10])  # a batch after pending samples
    for sample in x[PENDING + 10 : PENDING + 12]:  # pending when the shards merge
        first.update(sample[None])
    later.update(x[PENDING + 12 : PENDING + 16])
    for sample in x[PENDING + 16 :]:
        later.update(sample[None])
    first.merge(later)
    assert first.count == len(x)
    np.testing.assert_allclose(first.mean, x.astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(first.peak, x.max(axis=0))


def test_samples_of_different_shapes_have_no_mean():
    stats = SampleStats()
    stats.update(np.ones((1, 3, 4), np.float32))
    stats.update(np.ones((1, 3, 5), np.float32))
    assert stats.mean is None
    assert stats.peak is None


def test_lone_float16_samples_are_summed_without_overflow():
    stats = SampleStats()
    for _ in range(PENDING + 4):
        stats.update(np.full((1, 3), 5000, np.float16))
    np.testing.assert_array_equal(stats.mean, [5000.0] * 3)


def test_a_float16_batch_is_summed_wide_enough():
    """32 float16 samples of 5000 summed in float16 overflow to inf (a batch had been summed
    in its own type; lone samples already were widened)."""
    x = np.full((32, 3), 5000, np.float16)
    stats = SampleStats()
    stats.update(x)
    np.testing.assert_array_equal(stats.mean, [5000, 5000, 5000])
