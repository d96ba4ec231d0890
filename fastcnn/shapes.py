"""Output sizes and padding of window layers (convolution, pooling).

PyTorch's convention throughout: pixels left over at the bottom/right edge are
dropped; only an output size below 1 is an error.
"""


def window_output_size(size, kernel, stride, pad_before, pad_after, dilation=1):
    """Output length along one axis: floor((size + pads - dilation*(k-1) - 1) / stride) + 1.

    May return a value < 1; callers turn that into an error naming the layer.
    """
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def same_padding(kernel, dilation=1, stride=1, size=None):
    """(before, after) padding of TensorFlow/Keras ``same``: output size ceil(size / stride).

    Total padding max((out - 1)*stride + dilation*(k - 1) + 1 - size, 0), half (rounded
    down) before, the odd pixel after (bottom/right). With stride 1 that is dilation*(k-1)
    whatever the size (PyTorch's ``same``); another stride needs the input ``size``.
    """
    if stride == 1:
        total = dilation * (kernel - 1)
    else:
        if size is None:
            raise ValueError("same padding with a stride other than 1 depends on the input size")
        out = -(-size // stride)
        total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def pair(value):
    """An int or a 2-sequence as a (h, w) tuple of ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair, got {list(value)!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)
