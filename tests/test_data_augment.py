"""Augmenter: seeded crop + flip of training batches, reused buffers, identity when disabled."""
import numpy as np
import pytest

from fastcnn.data import Augmenter, load_dataset, make_augmenter
from fastcnn.errors import DataError
from fastcnn.kernels.augment import crop_flip_reference


def batch(n=8, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(np.float32)


def test_matches_reference_for_its_choices():
    aug = Augmenter(crop_padding=2, horizontal_flip=True, seed=7)
    xb = batch()
    out = aug.apply(xb, epoch=3, batch_index=5)
    oy, ox, flips = aug.choices(len(xb), 3, 5)
    np.testing.assert_array_equal(out, crop_flip_reference(xb, oy, ox, flips, 2))
    assert out.dtype == np.float32 and out.shape == xb.shape
    assert oy.min() >= 0 and oy.max() <= 4 and ox.max() <= 4
    assert 0 < flips.sum() < len(flips) or len(flips) < 4


def test_deterministic_for_seed_epoch_batch():
    xb = batch(n=32)
    a = Augmenter(crop_padding=3, horizontal_flip=True, seed=1)
    b = Augmenter(crop_padding=3, horizontal_flip=True, seed=1)
    first = a.apply(xb, 2, 4).copy()
    a.apply(xb, 0, 0)                                    # other calls in between change nothing
    np.testing.assert_array_equal(b.apply(xb, 2, 4), first)
    np.testing.assert_array_equal(a.apply(xb, 2, 4), first)
    assert not np.array_equal(a.apply(xb, 2, 5), first)  # another batch, other choices
    assert not np.array_equal(a.apply(xb, 3, 4), first)  # another epoch
    c = Augmenter(crop_padding=3, horizontal_flip=True, seed=2)
    assert not np.array_equal(c.apply(xb, 2, 4), first)  # another seed
    ref = np.random.default_rng([1, 2, 4, 1])
    np.testing.assert_array_equal(a.choices(32, 2, 4)[0], ref.integers(0, 7, size=32))


def test_flip_only_and_crop_only():
    xb = batch(n=64)
    flip = Augmenter(horizontal_flip=True, seed=0)
    out = flip.apply(xb, 0, 0)
    flipped = np.all(out == xb[:, :, ::-1, :], axis=(1, 2, 3))
    kept = np.all(out == xb, axis=(1, 2, 3))
    assert np.all(flipped | kept) and 10 < flipped.sum() < 54
    crop = Augmenter(crop_padding=1, seed=0)
    oy, ox, flips = crop.choices(64, 0, 0)
    assert not flips.any()
    out = crop.apply(xb, 0, 0)
    np.testing.assert_array_equal(out, crop_flip_reference(xb, oy, ox, flips, 1))
    # where the crop reaches into the padding the pixels are zero
    s = int(np.flatnonzero(oy == 0)[0])
    np.testing.assert_array_equal(out[s, 0], 0)


def test_identity_when_disabled():
    xb = batch()
    aug = Augmenter()
    assert not aug.enabled
    assert aug.apply(xb, 0, 0) is xb
    out = np.empty_like(xb)
    assert aug.apply(xb, 0, 0, out=out) is out
    np.testing.assert_array_equal(out, xb)
    assert make_augmenter(None) is None
    assert make_augmenter({"crop_padding": 0, "horizontal_flip": False}) is None


def test_buffers_reused_and_out():
    aug = Augmenter(crop_padding=1, horizontal_flip=True)
    xb = batch(n=8)
    a = aug.apply(xb, 0, 0)
    b = aug.apply(xb, 0, 1)
    assert np.shares_memory(a, b)                       # one internal buffer
    small = aug.apply(xb[:3].copy(), 0, 2)              # the last, smaller batch of an epoch
    assert small.shape == (3, 6, 5, 3) and np.shares_memory(small, a)
    out = np.empty_like(xb)
    assert aug.apply(xb, 1, 0, out=out) is out
    with pytest.raises(ValueError, match="overlap"):
        aug.apply(xb, 0, 0, out=xb)
    with pytest.raises(ValueError, match="shape"):
        aug.apply(xb, 0, 0, out=np.empty((8, 6, 5, 1), np.float32))
    assert xb.dtype == np.float32


@pytest.mark.parametrize("kw", [dict(crop_padding=-1), dict(crop_padding=1.5), dict(horizontal_flip="yes"),
                                dict(seed=-1)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        Augmenter(**kw)


def test_load_dataset_augment():
    ds = load_dataset("synthetic", input_shape=(8, 8, 1), num_classes=2, num_train=8, num_test=4, seed=3,
                      augment={"crop_padding": 2, "horizontal_flip": True})
    assert isinstance(ds.augmenter, Augmenter) and ds.augmenter.seed == 3 and ds.augmenter.crop_padding == 2
    assert load_dataset("synthetic", input_shape=(8, 8, 1), num_classes=2, num_train=8).augmenter is None
    with pytest.raises(DataError, match="unknown key 'rotate'"):
        load_dataset("synthetic", input_shape=(8, 8, 1), num_classes=2, augment={"rotate": 10})
    with pytest.raises(DataError, match="crop_padding"):
        load_dataset("synthetic", input_shape=(8, 8, 1), num_classes=2, augment={"crop_padding": -2})
