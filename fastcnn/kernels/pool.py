"""2-D max pooling on NHWC tensors, forward and backward.

Semantics (PyTorch's): padding counts as -inf, so only real pixels can win;
ties go to the FIRST maximum in row-major window order; the backward pass
scatters each output gradient to its winner, overlapping windows accumulate.
"""
import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
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
                        better = v > yr[c]
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
