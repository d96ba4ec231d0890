"""2-D max and average pooling and global average pooling on NHWC tensors,
forward and backward.

Max pooling semantics (PyTorch's): padding counts as -inf, so only real pixels can win;
ties go to the FIRST maximum in row-major window order; a NaN wins over any number (the
LAST NaN of the window, as torch's ``val > max || isnan(val)``), so a window holding NaN
outputs NaN; the backward pass scatters each output gradient to its winner, overlapping
windows accumulate.
"""
import numpy as np
from numba import njit, prange

from .activation import FASTMATH  # fastmath without 'nnan'/'ninf': the NaN test must not fold away


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def maxpool2d_forward(x, y, argmax, pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """x (N,H,W,C) -> y (N,OH,OW,C); argmax int32 (N,OH,OW,C) = flat input index ih*W+iw.

    The output size is taken from y.shape (bottom/right padding implied).
    A window holding no real pixel (only possible with padding >= pool size)
    gets -inf and argmax -1.
    """
    N, H, W, C = x.shape
    OH = y.shape[1]
    OW = y.shape[2]
    for t in prange(N * OH):
        n = t // OH
        oh = t - n * OH
        h0 = oh * stride_h - pad_top
        hs = max(h0, 0)
        he = min(h0 + pool_h, H)
        for ow in range(OW):
            w0 = ow * stride_w - pad_left
            ws = max(w0, 0)
            we = min(w0 + pool_w, W)
            yr = y[n, oh, ow]
            ar = argmax[n, oh, ow]
            if hs >= he or ws >= we:
                for c in range(C):
                    yr[c] = -np.inf
                    ar[c] = -1
                continue
            # Start from the first real pixel of the window (row-major order);
            # a later pixel replaces it only if strictly greater: first max wins.
            xr = x[n, hs, ws]
            first = np.int32(hs * W + ws)
            for c in range(C):
                yr[c] = xr[c]
                ar[c] = first
            for ih in range(hs, he):
                for iw in range(ws, we):
                    if ih == hs and iw == ws:
                        continue
                    xr = x[n, ih, iw]
                    idx = np.int32(ih * W + iw)
                    for c in range(C):
                        v = xr[c]
                        better = (v > yr[c]) | (v != v)  # NaN wins (the last one), as torch
                        yr[c] = v if better else yr[c]
                        ar[c] = idx if better else ar[c]


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def maxpool2d_backward(dy, argmax, dx):
    """dx (N,H,W,C) overwritten: zeroed, then each dy added at its argmax.

    Parallel over the batch: one thread scatters one image, so no race.
    """
    N, H, W, C = dx.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    zero = dx.dtype.type(0)
    dx3 = dx.reshape((N, H * W, C))
    for n in prange(N):
        dxn = dx3[n]
        for p in range(H * W):
            row = dxn[p]
            for c in range(C):
                row[c] = zero
        for oh in range(OH):
            for ow in range(OW):
                dyr = dy[n, oh, ow]
                ar = argmax[n, oh, ow]
                for c in range(C):
                    idx = ar[c]
                    if idx >= 0:
                        dxn[idx, c] += dyr[c]


# ------------------------------------------------------------ average pooling
# PyTorch's AvgPool2d without padding (so count_include_pad does not matter):
# y = sum of the pool_h x pool_w window / (pool_h * pool_w); output size
# floor((H - pool) / stride) + 1, left-over pixels at the bottom/right dropped.


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def avgpool2d_forward(x, y, pool_h, pool_w, stride_h, stride_w):
    """x (N,H,W,C) -> y (N,OH,OW,C), the mean of each window. Output size from y.shape."""
    N, H, W, C = x.shape
    OH = y.shape[1]
    OW = y.shape[2]
    zero = x.dtype.type(0)
    inv = x.dtype.type(1.0 / (pool_h * pool_w))
    for t in prange(N * OH):
        n = t // OH
        oh = t - n * OH
        h0 = oh * stride_h
        for ow in range(OW):
            w0 = ow * stride_w
            yr = y[n, oh, ow]
            for c in range(C):
                yr[c] = zero
            for ih in range(h0, h0 + pool_h):
                for iw in range(w0, w0 + pool_w):
                    xr = x[n, ih, iw]
                    for c in range(C):
                        yr[c] += xr[c]
            for c in range(C):
                yr[c] *= inv


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def avgpool2d_backward(dy, dx, pool_h, pool_w, stride_h, stride_w):
    """dx (N,H,W,C) overwritten: each input pixel gets the sum of dy over the windows holding it,
    divided by the window area (overlapping windows accumulate; pixels in no window get 0).

    A gather, not a scatter: parallel over batch x input rows, each dx row written by one thread.
    """
    N, H, W, C = dx.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    zero = dx.dtype.type(0)
    inv = dx.dtype.type(1.0 / (pool_h * pool_w))
    for t in prange(N * H):
        n = t // H
        ih = t - n * H
        # Windows oh with oh*stride_h <= ih < oh*stride_h + pool_h.
        oh_lo = max((ih - pool_h) // stride_h + 1, 0)
        oh_hi = min(ih // stride_h, OH - 1)
        for iw in range(W):
            ow_lo = max((iw - pool_w) // stride_w + 1, 0)
            ow_hi = min(iw // stride_w, OW - 1)
            dxr = dx[n, ih, iw]
            for c in range(C):
                dxr[c] = zero
            for oh in range(oh_lo, oh_hi + 1):
                for ow in range(ow_lo, ow_hi + 1):
                    dyr = dy[n, oh, ow]
                    for c in range(C):
                        dxr[c] += dyr[c]
            for c in range(C):
                dxr[c] *= inv


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def global_avgpool_forward(x, y):
    """x (N,H,W,C) -> y (N,C): the mean over H and W."""
    N, H, W, C = x.shape
    zero = x.dtype.type(0)
    inv = x.dtype.type(1.0 / (H * W))
    for n in prange(N):
        yr = y[n]
        for c in range(C):
            yr[c] = zero
        for h in range(H):
            for w in range(W):
                xr = x[n, h, w]
                for c in range(C):
                    yr[c] += xr[c]
        for c in range(C):
            yr[c] *= inv


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def global_avgpool_backward(dy, dx):
    """dy (N,C) -> dx (N,H,W,C) overwritten with dy / (H*W) at every pixel."""
    N, H, W, C = dx.shape
    inv = dx.dtype.type(1.0 / (H * W))
    for t in prange(N * H):
        n = t // H
        h = t - n * H
        dyr = dy[n]
        for w in range(W):
            dxr = dx[n, h, w]
            for c in range(C):
                dxr[c] = dyr[c] * inv
