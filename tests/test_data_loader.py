"""BatchLoader (seeded epochs, resume mid-epoch) and split_validation."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcnn.data import BatchLoader, split_validation


def data(n, shape=(2, 3, 1)):
    x = np.arange(n * int(np.prod(shape)), dtype=np.float64).reshape((n,) + shape)
    y = np.arange(n, dtype=np.int32)
    return x, y


def ids(batches):
    return [yb.tolist() for _, yb in batches]


def test_every_sample_once_per_epoch_and_types():
    x, y = data(103)
    loader = BatchLoader(x, y, batch_size=10, seed=5)
    assert len(loader) == 11
    seen = []
    for xb, yb in loader.epoch_batches(0):
        assert xb.dtype == np.float32 and xb.flags.c_contiguous and xb.shape[1:] == (2, 3, 1)
        assert yb.dtype == np.int64 and len(xb) == len(yb)
        np.testing.assert_array_equal(xb, x[yb].astype(np.float32))  # images stay with their labels
        seen.extend(yb.tolist())
    assert sorted(seen) == list(range(103))
    assert seen != list(range(103))  # shuffled


def test_order_is_a_function_of_seed_and_epoch():
    x, y = data(50)
    a = BatchLoader(x, y, 8, seed=1)
    b = BatchLoader(x, y, 8, seed=1)
    assert ids(a.epoch_batches(3)) == ids(b.epoch_batches(3))
    list(a.epoch_batches(0))  # iterating other epochs first changes nothing
    assert ids(a.epoch_batches(3)) == ids(b.epoch_batches(3))
    assert ids(a.epoch_batches(0)) != ids(a.epoch_batches(1))
    assert ids(a.epoch_batches(0)) != ids(BatchLoader(x, y, 8, seed=2).epoch_batches(0))
    expected = np.random.default_rng([1, 3]).permutation(50)
    assert sum(ids(a.epoch_batches(3)), []) == expected.tolist()


def test_no_shuffle():
    x, y = data(25)
    loader = BatchLoader(x, y, 10, shuffle=False)
    assert ids(loader.epoch_batches(7)) == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


def test_last_partial_batch_and_drop_last():
    x, y = data(25)
    keep = BatchLoader(x, y, 10, seed=0)
    drop = BatchLoader(x, y, 10, seed=0, drop_last=True)
    assert len(keep) == 3 and len(drop) == 2
    assert [len(b) for b in ids(keep.epoch_batches(0))] == [10, 10, 5]
    assert [len(b) for b in ids(drop.epoch_batches(0))] == [10, 10]
    assert ids(drop.epoch_batches(0)) == ids(keep.epoch_batches(0))[:2]
    assert len(BatchLoader(x, y, 25, drop_last=True)) == 1
    assert len(BatchLoader(x, y, 26, drop_last=True)) == 0
    assert len(BatchLoader(x, y, 26)) == 1


def test_batches_are_fresh_arrays():
    x, y = data(20)
    for shuffle in (True, False):
        loader = BatchLoader(x, y, 4, shuffle=shuffle)
        batches = list(loader.epoch_batches(0))
        first = batches[0][0].copy()
        for xb, yb in batches[1:]:
            xb[...] = -1
            yb[...] = -1
        np.testing.assert_array_equal(batches[0][0], first)
        batches[0][0][...] = -7
        assert np.all(loader.x >= 0) and np.all(loader.y >= 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), batch_size=st.integers(1, 20), drop_last=st.booleans(),
       shuffle=st.booleans(), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 1000), data_=st.data())
def test_resume_yields_exactly_the_tail(n, batch_size, drop_last, shuffle, seed, epoch, data_):
    x, y = data(n, shape=(1,))
    loader = BatchLoader(x, y, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    full = ids(loader.epoch_batches(epoch))
    assert len(full) == len(loader)
    assert len(loader) == (n // batch_size if drop_last else -(-n // batch_size))
    flat = sum(full, [])
    assert len(set(flat)) == len(flat)
    if not drop_last:
        assert sorted(flat) == list(range(n))
    start = data_.draw(st.integers(0, len(loader)))
    assert ids(loader.epoch_batches(epoch, start=start)) == full[start:]


def test_bad_arguments():
    x, y = data(10)
    with pytest.raises(ValueError):
        BatchLoader(x, y, 0)
    with pytest.raises(ValueError):
        BatchLoader(x, y[:5], 2)
    loader = BatchLoader(x, y, 3)
    with pytest.raises(ValueError):
        list(loader.epoch_batches(0, start=5))
    with pytest.raises(ValueError):
        list(loader.epoch_batches(-1))


def test_dtype_option():
    x, y = data(6)
    xb, _ = next(BatchLoader(x, y, 4, dtype=np.float64).epoch_batches(0))
    assert xb.dtype == np.float64


# ---------------------------------------------------------------- split_validation

def test_split_validation_disjoint_sizes_seeded():
    x, y = data(100)
    xt, yt, xv, yv = split_validation(x, y, 0.1, seed=0)
    assert len(xv) == len(yv) == 10 and len(xt) == len(yt) == 90
    assert set(yt.tolist()).isdisjoint(yv.tolist())
    assert sorted(yt.tolist() + yv.tolist()) == list(range(100))
    np.testing.assert_array_equal(xv, x[yv])  # images stay with their labels
    np.testing.assert_array_equal(xt, x[yt])
    again = split_validation(x, y, 0.1, seed=0)
    np.testing.assert_array_equal(again[3], yv)
    other = split_validation(x, y, 0.1, seed=1)
    assert other[3].tolist() != yv.tolist()
    assert yv.tolist() != list(range(90, 100))  # random, not the tail
    assert xt.flags.c_contiguous and xv.flags.c_contiguous


def test_split_validation_rounding_and_minimum():
    x, y = data(10)
    assert len(split_validation(x, y, 0.25, 0)[3]) == 2      # round(2.5) -> 2 (banker's)
    assert len(split_validation(x, y, 0.26, 0)[3]) == 3
    assert len(split_validation(x, y, 0.01, 0)[3]) == 1      # at least one
    assert len(split_validation(x, y, 0.9, 0)[3]) == 9
    for bad in (0, 1, 0.0, 1.0, -0.1, 1.5, True):
        with pytest.raises(ValueError):
            split_validation(x, y, bad, 0)
    with pytest.raises(ValueError):
        split_validation(x, y, 0.99, 0)  # nothing left to train on


def test_reuse_gives_the_same_batches_without_new_arrays():
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3, 1, 1)
    y = np.arange(50)
    fresh = BatchLoader(x, y, 16, seed=3)
    reused = BatchLoader(x, y, 16, seed=3, reuse=True)
    buffers = set()
    for (xa, ya), (xb, yb) in zip(fresh.epoch_batches(2), reused.epoch_batches(2)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert xb.flags.c_contiguous
        buffers.add(xb.__array_interface__["data"][0])
    assert len(buffers) == 1  # every batch lives in the one buffer


def test_a_batch_size_beyond_the_data_allocates_only_the_data():
    x = np.arange(5 * 3 * 2 * 1, dtype=np.float32).reshape(5, 3, 2, 1)
    y = np.arange(5)
    loader = BatchLoader(x, y, batch_size=10 ** 9, shuffle=False, reuse=True)  # 10**9 images would be 24 GB
    (xb, yb), = list(loader.epoch_batches(0))
    np.testing.assert_array_equal(xb, x)
    np.testing.assert_array_equal(yb, y)
    assert loader._x_buffer.shape[0] == 5 and loader._y_buffer.shape[0] == 5
