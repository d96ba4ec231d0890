"""Plain NumPy references of the convolution ops (the seed document's loops).

Slow and readable on purpose: an explicit zero padding, then one small einsum
per output pixel. Tests and benchmarks compare the Numba kernels of
``fastcnn.kernels.conv`` against these.

Layout as everywhere in fastcnn: activations NHWC, weights HWIO, bias (Cout,).
Cross-correlation with PyTorch semantics. ``padding`` is the 4-tuple
``(top, bottom, left, right)``; ``stride`` and ``dilation`` are (h, w) pairs.
"""
import numpy as np


def _pad(x, padding):
    top, bottom, left, right = padding
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _output_size(size, kernel, stride, pad_before, pad_after, dilation):
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def _window(oh, ow, kh, kw, stride, dilation):
    """Slices of the padded input that output pixel (oh, ow) looks at."""
    sh, sw = stride
    dh, dw = dilation
    rows = slice(oh * sh, oh * sh + dh * (kh - 1) + 1, dh)
    cols = slice(ow * sw, ow * sw + dw * (kw - 1) + 1, dw)
    return rows, cols


def conv2d_forward_ref(x, w, b, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """y[n, oh, ow, co] = b[co] + sum_{kh, kw, ci} xpad[n, oh*sh + kh*dh, ow*sw + kw*dw, ci] * w[kh, kw, ci, co]."""
    N, H, W, Cin = x.shape
    KH, KW, _, Cout = w.shape
    OH = _output_size(H, KH, stride[0], padding[0], padding[1], dilation[0])
    OW = _output_size(W, KW, stride[1], padding[2], padding[3], dilation[1])
    xp = _pad(x, padding)
    y = np.zeros((N, OH, OW, Cout), dtype=x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            rows, cols = _window(oh, ow, KH, KW, stride, dilation)
            patch = xp[:, rows, cols, :]                        # (N, KH, KW, Cin)
            y[:, oh, ow, :] = np.einsum("nhwc,hwco->no", patch, w)
    if b is not None:
        y += b
    return y


def conv2d_backward_input_ref(dy, w, x_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """dL/dx: every output pixel sends dy[n, oh, ow, :] @ w[kh, kw].T back to the input pixel it read."""
    N, H, W, Cin = x_shape
    _, OH, OW, _ = dy.shape
    KH, KW = w.shape[:2]
    top, bottom, left, right = padding
    dxp = np.zeros((N, H + top + bottom, W + left + right, Cin), dtype=dy.dtype)
    for oh in range(OH):
        for ow in range(OW):
            rows, cols = _window(oh, ow, KH, KW, stride, dilation)
            dxp[:, rows, cols, :] += np.einsum("no,hwco->nhwc", dy[:, oh, ow, :], w)
    return dxp[:, top:top + H, left:left + W, :].copy()


def conv2d_backward_weight_ref(x, dy, w_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """(dL/dw, dL/db): dw[kh, kw, ci, co] = sum over batch and output pixels of patch * dy; db = sum of dy."""
    KH, KW, Cin, Cout = w_shape
    _, OH, OW, _ = dy.shape
    xp = _pad(x, padding)
    dw = np.zeros(w_shape, dtype=x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            rows, cols = _window(oh, ow, KH, KW, stride, dilation)
            patch = xp[:, rows, cols, :]                        # (N, KH, KW, Cin)
            dw += np.einsum("nhwc,no->hwco", patch, dy[:, oh, ow, :])
    db = dy.sum(axis=(0, 1, 2))
    return dw, db
