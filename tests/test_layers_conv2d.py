"""conv2d's `padding: same` with any stride (TensorFlow/Keras rule)."""
import math

import numpy as np
import pytest

from fastcnn.layers import Conv2D
from fastcnn.shapes import same_padding, window_output_size


@pytest.mark.parametrize("size", [1, 2, 5, 7, 8, 28, 31, 32])
@pytest.mark.parametrize("kernel, stride, dilation", [(1, 1, 1), (3, 1, 1), (4, 1, 1), (3, 2, 1), (1, 2, 1),
                                                      (5, 2, 1), (2, 3, 1), (3, 2, 2), (7, 4, 1), (3, 3, 3)])
def test_same_padding_rule(size, kernel, stride, dilation):
    before, after = same_padding(kernel, dilation, stride, size)
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)  # TensorFlow's formula
    assert (before, after) == (total // 2, total - total // 2)
    assert window_output_size(size, kernel, stride, before, after, dilation) == out


def test_stride_1_does_not_need_the_size():
    assert same_padding(4) == (1, 2) and same_padding(3, dilation=2) == (2, 2)
    with pytest.raises(ValueError):
        same_padding(3, 1, 2)


@pytest.mark.parametrize("shape, kernel, stride", [((7, 8, 2), 3, 2), ((28, 28, 1), 3, 2), ((9, 6, 3), (4, 3), (2, 3)),
                                                   ((5, 5, 4), 1, 2)])
def test_strided_same_layer_matches_explicit_padding(shape, kernel, stride, rng):
    layer = Conv2D(4, kernel, stride=stride, padding="same")
    layer.build(shape, rng, np.float64)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    assert layer.out_shape == (math.ceil(shape[0] / sh), math.ceil(shape[1] / sw), 4)
    top, bottom, left, right = layer.pads
    x = rng.standard_normal((2, *shape))
    y = layer.forward(x, training=True)
    # Reference: pad explicitly (zeros), then a valid strided correlation in NumPy.
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    w = layer.params["weight"].data
    ref = np.zeros_like(y)
    for oh in range(y.shape[1]):
        for ow in range(y.shape[2]):
            patch = xp[:, oh * sh:oh * sh + kh, ow * sw:ow * sw + kw, :]
            ref[:, oh, ow, :] = np.einsum("nhwc,hwco->no", patch, w) + layer.params["bias"].data
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert layer.describe().endswith("same")
