"""Plain NumPy references of the convolution ops (the seed document's loops).

Slow and readable on purpose: an explicit zero padding, then one small einsum
per output pixel. Tests and benchmarks compare the Numba kernels of
``fastcnn.kernels.conv`` and ``fastcnn.kernels.depthwise`` against these
(grouped and depthwise references at the end).

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


def _windows(OH, OW, kh, kw, stride, dilation):
    """Each output pixel (oh, ow) with the slices of the padded input it looks at (rows, cols)."""
    sh, sw = stride
    dh, dw = dilation
    for oh in range(OH):
        for ow in range(OW):
            yield (oh, ow, slice(oh * sh, oh * sh + dh * (kh - 1) + 1, dh),
                   slice(ow * sw, ow * sw + dw * (kw - 1) + 1, dw))


def conv2d_forward_ref(x, w, b, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """y[n, oh, ow, co] = b[co] + sum_{kh, kw, ci} xpad[n, oh*sh + kh*dh, ow*sw + kw*dw, ci] * w[kh, kw, ci, co]."""
    N, H, W, Cin = x.shape
    KH, KW, _, Cout = w.shape
    OH = _output_size(H, KH, stride[0], padding[0], padding[1], dilation[0])
    OW = _output_size(W, KW, stride[1], padding[2], padding[3], dilation[1])
    xp = _pad(x, padding)
    y = np.zeros((N, OH, OW, Cout), dtype=x.dtype)
    for oh, ow, rows, cols in _windows(OH, OW, KH, KW, stride, dilation):
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
    for oh, ow, rows, cols in _windows(OH, OW, KH, KW, stride, dilation):
        dxp[:, rows, cols, :] += np.einsum("no,hwco->nhwc", dy[:, oh, ow, :], w)
    return dxp[:, top:top + H, left:left + W, :].copy()


def conv2d_backward_weight_ref(x, dy, w_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """(dL/dw, dL/db): dw[kh, kw, ci, co] = sum over batch and output pixels of patch * dy; db = sum of dy."""
    KH, KW, Cin, Cout = w_shape
    _, OH, OW, _ = dy.shape
    xp = _pad(x, padding)
    dw = np.zeros(w_shape, dtype=x.dtype)
    for oh, ow, rows, cols in _windows(OH, OW, KH, KW, stride, dilation):
        patch = xp[:, rows, cols, :]                        # (N, KH, KW, Cin)
        dw += np.einsum("nhwc,no->hwco", patch, dy[:, oh, ow, :])
    db = dy.sum(axis=(0, 1, 2))
    return dw, db


# --------------------------------------------------------------------------
# Grouped and depthwise convolution
# --------------------------------------------------------------------------
# Grouped (PyTorch's ``groups``): x (N, H, W, Cin), w (KH, KW, Cin / groups, Cout); output
# channel o sees the input channels of group g = o // (Cout / groups), i.e. x[..., g*Cin/groups:
# (g + 1)*Cin/groups], through w[..., o]. The references split the channels and run the plain
# references above per group. Depthwise (groups = Cin, channel multiplier m = Cout / Cin, w (KH, KW,
# 1, Cin*m)) has its own references, written element-wise along the channels: output channel
# c*m + j reads input channel c.


def _groups_of(cin, cout, groups):
    if cin % groups or cout % groups:
        raise ValueError(f"groups {groups} must divide the input channels ({cin}) and the output channels ({cout})")
    return cin // groups, cout // groups


def grouped_conv2d_forward_ref(x, w, b, groups, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """y = concat over groups g of conv2d(x[..., g*cig:(g+1)*cig], w[..., g*cog:(g+1)*cog]) + b."""
    cig, cog = _groups_of(x.shape[3], w.shape[3], groups)
    assert w.shape[2] == cig, (w.shape, cig)
    y = np.concatenate([conv2d_forward_ref(x[..., g * cig:(g + 1) * cig], w[..., g * cog:(g + 1) * cog], None,
                                           stride, padding, dilation) for g in range(groups)], axis=3)
    if b is not None:
        y += b
    return y


def grouped_conv2d_backward_input_ref(dy, w, x_shape, groups, stride=(1, 1), padding=(0, 0, 0, 0),
                                      dilation=(1, 1)):
    """dL/dx, group by group: each group's input channels get only its own output channels' gradient."""
    cig, cog = _groups_of(x_shape[3], w.shape[3], groups)
    return np.concatenate([conv2d_backward_input_ref(dy[..., g * cog:(g + 1) * cog], w[..., g * cog:(g + 1) * cog],
                                                     (*x_shape[:3], cig), stride, padding, dilation)
                           for g in range(groups)], axis=3)


def grouped_conv2d_backward_weight_ref(x, dy, w_shape, groups, stride=(1, 1), padding=(0, 0, 0, 0),
                                       dilation=(1, 1)):
    """(dL/dw (KH, KW, Cin/groups, Cout), dL/db), group by group."""
    cig, cog = _groups_of(x.shape[3], w_shape[3], groups)
    parts = [conv2d_backward_weight_ref(x[..., g * cig:(g + 1) * cig], dy[..., g * cog:(g + 1) * cog],
                                        (*w_shape[:2], cig, cog), stride, padding, dilation) for g in range(groups)]
    return np.concatenate([p[0] for p in parts], axis=3), np.concatenate([p[1] for p in parts])


def _expand(x, m):
    """x (..., C) -> (..., C*m) with channel c*m + j = x[..., c]."""
    return np.repeat(x, m, axis=-1)


def depthwise_forward_ref(x, w, b, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """y[n, oh, ow, c*m + j] = b[c*m + j] + sum_{kh, kw} xpad[n, oh*sh + kh*dh, ow*sw + kw*dw, c]
                                                        * w[kh, kw, 0, c*m + j]

    m = Cout / C is the channel multiplier.
    """
    N, H, W, C = x.shape
    KH, KW, one, Cm = w.shape
    assert one == 1 and Cm % C == 0, w.shape
    OH = _output_size(H, KH, stride[0], padding[0], padding[1], dilation[0])
    OW = _output_size(W, KW, stride[1], padding[2], padding[3], dilation[1])
    xp = _expand(_pad(x, padding), Cm // C)
    y = np.zeros((N, OH, OW, Cm), dtype=x.dtype)
    for oh, ow, rows, cols in _windows(OH, OW, KH, KW, stride, dilation):
        y[:, oh, ow, :] = np.einsum("nhwo,hwo->no", xp[:, rows, cols, :], w[:, :, 0, :])
    if b is not None:
        y += b
    return y


def depthwise_backward_input_ref(dy, w, x_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """dL/dx: dy[n, oh, ow, c*m + j] * w[kh, kw, 0, c*m + j] sent back to input channel c of the pixel read."""
    N, H, W, C = x_shape
    _, OH, OW, Cm = dy.shape
    KH, KW = w.shape[:2]
    m = Cm // C
    top, bottom, left, right = padding
    dxp = np.zeros((N, H + top + bottom, W + left + right, Cm), dtype=dy.dtype)
    for oh, ow, rows, cols in _windows(OH, OW, KH, KW, stride, dilation):
        dxp[:, rows, cols, :] += np.einsum("no,hwo->nhwo", dy[:, oh, ow, :], w[:, :, 0, :])
    dxp = dxp.reshape(*dxp.shape[:3], C, m).sum(axis=4)
    return dxp[:, top:top + H, left:left + W, :].copy()


def depthwise_backward_weight_ref(x, dy, w_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """(dL/dw (KH, KW, 1, C*m), dL/db): dw[kh, kw, 0, c*m + j] = sum of xpad[.., c] * dy[.., c*m + j] over the
    batch and output pixels; db = sum of dy."""
    KH, KW, one, Cm = w_shape
    _, OH, OW, _ = dy.shape
    xp = _expand(_pad(x, padding), Cm // x.shape[3])
    dw = np.zeros(w_shape, dtype=x.dtype)
    for oh, ow, rows, cols in _windows(OH, OW, KH, KW, stride, dilation):
        dw[:, :, 0, :] += np.einsum("nhwo,no->hwo", xp[:, rows, cols, :], dy[:, oh, ow, :])
    return dw, dy.sum(axis=(0, 1, 2))
