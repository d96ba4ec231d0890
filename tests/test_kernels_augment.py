"""The crop_flip kernel against its NumPy reference."""
import numpy as np
import pytest

from fastcnn.kernels.augment import crop_flip, crop_flip_reference


def _case(rng, shape, pad, dtype=np.float32):
    n = shape[0]
    x = rng.standard_normal(shape).astype(dtype)
    oy = rng.integers(0, 2 * pad + 1, n).astype(np.int64)
    ox = rng.integers(0, 2 * pad + 1, n).astype(np.int64)
    flips = rng.integers(0, 2, n).astype(np.uint8)
    return x, oy, ox, flips


@pytest.mark.parametrize("shape,pad", [
    ((6, 8, 8, 3), 2),
    ((5, 7, 5, 1), 3),      # non-square, one channel
    ((4, 4, 6, 2), 0),      # no padding: identity or flip
    ((4, 3, 3, 2), 5),      # padding wider than the image: whole rows/columns of zeros
])
def test_matches_reference(shape, pad):
    rng = np.random.default_rng(0)
    x, oy, ox, flips = _case(rng, shape, pad)
    out = np.full_like(x, np.nan)                    # every element must be written
    crop_flip(x, out, oy, ox, flips, pad)
    np.testing.assert_array_equal(out, crop_flip_reference(x, oy, ox, flips, pad))
    assert out.dtype == np.float32


def test_float64():
    rng = np.random.default_rng(1)
    x, oy, ox, flips = _case(rng, (3, 5, 4, 2), 1, np.float64)
    out = np.empty_like(x)
    crop_flip(x, out, oy, ox, flips, 1)
    np.testing.assert_array_equal(out, crop_flip_reference(x, oy, ox, flips, 1))


def test_centre_crop_flip_and_corners():
    x = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2) + 1   # no zeros in the image
    out = np.empty_like(x)
    p = 2
    # sample 0: centred (offset = pad), flipped; sample 1: top-left corner of the padded image
    crop_flip(x, out, np.array([p, 0]), np.array([p, 0]), np.array([1, 0], np.uint8), p)
    np.testing.assert_array_equal(out[0], x[0, :, ::-1, :])
    np.testing.assert_array_equal(out[1, :2], 0)                  # two padding rows on top
    np.testing.assert_array_equal(out[1, :, :2], 0)               # two padding columns on the left
    np.testing.assert_array_equal(out[1, 2:, 2:], x[1, :1, :2])   # the image's top-left corner
