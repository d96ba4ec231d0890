"""Fully connected layer: y = x @ w + b and its gradients.

x (N,I), w (I,O), b (O,), y (N,O). Inner loops run over the contiguous O
axis. Rows of the batch are processed in blocks of ROWS so that each row of w,
once loaded into the L1 cache, is reused ROWS times.
"""
import numpy as np
from numba import njit, prange

ROWS = 4


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def dense_forward(x, w, b, y):
    """y (N,O) = x @ w + b."""
    N, I = x.shape
    O = w.shape[1]
    nblocks = (N + ROWS - 1) // ROWS
    for blk in prange(nblocks):
        n0 = blk * ROWS
        n1 = min(n0 + ROWS, N)
        for n in range(n0, n1):
            yr = y[n]
            for o in range(O):
                yr[o] = b[o]
        if n1 - n0 == 4:
            # 4 rows x 4 inputs per pass: 8 loads and 4 stores per 16 FMAs.
            y0 = y[n0]
            y1 = y[n0 + 1]
            y2 = y[n0 + 2]
            y3 = y[n0 + 3]
            x0 = x[n0]
            x1 = x[n0 + 1]
            x2 = x[n0 + 2]
            x3 = x[n0 + 3]
            I4 = I - I % 4
            for i in range(0, I4, 4):
                w0 = w[i]
                w1 = w[i + 1]
                w2 = w[i + 2]
                w3 = w[i + 3]
                a00 = x0[i]
                a01 = x0[i + 1]
                a02 = x0[i + 2]
                a03 = x0[i + 3]
                a10 = x1[i]
                a11 = x1[i + 1]
                a12 = x1[i + 2]
                a13 = x1[i + 3]
                a20 = x2[i]
                a21 = x2[i + 1]
                a22 = x2[i + 2]
                a23 = x2[i + 3]
                a30 = x3[i]
                a31 = x3[i + 1]
                a32 = x3[i + 2]
                a33 = x3[i + 3]
                for o in range(O):
                    v0 = w0[o]
                    v1 = w1[o]
                    v2 = w2[o]
                    v3 = w3[o]
                    y0[o] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                    y1[o] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                    y2[o] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                    y3[o] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
            for i in range(I4, I):
                wr = w[i]
                a0 = x0[i]
                a1 = x1[i]
                a2 = x2[i]
                a3 = x3[i]
                for o in range(O):
                    wv = wr[o]
                    y0[o] += a0 * wv
                    y1[o] += a1 * wv
                    y2[o] += a2 * wv
                    y3[o] += a3 * wv
        else:
            for i in range(I):
                wr = w[i]
                for n in range(n0, n1):
                    a = x[n, i]
                    yr = y[n]
                    for o in range(O):
                        yr[o] += a * wr[o]


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def dense_backward_input(dy, w, dx):
    """dx (N,I) = dy @ w.T: dx[n,i] = sum_o dy[n,o] * w[i,o]."""
    N, O = dy.shape
    I = w.shape[0]
    zero = dx.dtype.type(0)
    nblocks = (N + ROWS - 1) // ROWS
    for blk in prange(nblocks):
        n0 = blk * ROWS
        n1 = min(n0 + ROWS, N)
        if n1 - n0 == 4:
            g0 = dy[n0]
            g1 = dy[n0 + 1]
            g2 = dy[n0 + 2]
            g3 = dy[n0 + 3]
            for i in range(I):
                wr = w[i]
                s0 = zero
                s1 = zero
                s2 = zero
                s3 = zero
                for o in range(O):
                    wv = wr[o]
                    s0 += g0[o] * wv
                    s1 += g1[o] * wv
                    s2 += g2[o] * wv
                    s3 += g3[o] * wv
                dx[n0, i] = s0
                dx[n0 + 1, i] = s1
                dx[n0 + 2, i] = s2
                dx[n0 + 3, i] = s3
        else:
            for n in range(n0, n1):
                g = dy[n]
                for i in range(I):
                    wr = w[i]
                    s = zero
                    for o in range(O):
                        s += g[o] * wr[o]
                    dx[n, i] = s


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def dense_backward_weight(x, dy, dw, db):
    """dw (I,O) = x.T @ dy, db (O,) = dy.sum(0); both overwritten.

    Parallel over blocks of ROWS rows of dw: each row is owned by one
    iteration (no partial buffers); a block shares each loaded row of dy.
    """
    N, I = x.shape
    O = dy.shape[1]
    zero = dw.dtype.type(0)
    nblocks = (I + ROWS - 1) // ROWS
    for blk in prange(nblocks):
        i0 = blk * ROWS
        i1 = min(i0 + ROWS, I)
        for i in range(i0, i1):
            dwr = dw[i]
            for o in range(O):
                dwr[o] = zero
        if i1 - i0 == 4:
            d0 = dw[i0]
            d1 = dw[i0 + 1]
            d2 = dw[i0 + 2]
            d3 = dw[i0 + 3]
            # 4 rows of dw x 4 batch rows per pass: 8 loads and 4 stores per 16 FMAs.
            N4 = N - N % 4
            for n in range(0, N4, 4):
                g0 = dy[n]
                g1 = dy[n + 1]
                g2 = dy[n + 2]
                g3 = dy[n + 3]
                a00 = x[n, i0]
                a01 = x[n + 1, i0]
                a02 = x[n + 2, i0]
                a03 = x[n + 3, i0]
                a10 = x[n, i0 + 1]
                a11 = x[n + 1, i0 + 1]
                a12 = x[n + 2, i0 + 1]
                a13 = x[n + 3, i0 + 1]
                a20 = x[n, i0 + 2]
                a21 = x[n + 1, i0 + 2]
                a22 = x[n + 2, i0 + 2]
                a23 = x[n + 3, i0 + 2]
                a30 = x[n, i0 + 3]
                a31 = x[n + 1, i0 + 3]
                a32 = x[n + 2, i0 + 3]
                a33 = x[n + 3, i0 + 3]
                for o in range(O):
                    v0 = g0[o]
                    v1 = g1[o]
                    v2 = g2[o]
                    v3 = g3[o]
                    d0[o] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                    d1[o] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                    d2[o] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                    d3[o] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
            for n in range(N4, N):
                g = dy[n]
                xr = x[n]
                a0 = xr[i0]
                a1 = xr[i0 + 1]
                a2 = xr[i0 + 2]
                a3 = xr[i0 + 3]
                for o in range(O):
                    gv = g[o]
                    d0[o] += a0 * gv
                    d1[o] += a1 * gv
                    d2[o] += a2 * gv
                    d3[o] += a3 * gv
        else:
            for n in range(N):
                g = dy[n]
                for i in range(i0, i1):
                    a = x[n, i]
                    dwr = dw[i]
                    for o in range(O):
                        dwr[o] += a * g[o]
    for o in range(O):
        db[o] = zero
    for n in range(N):
        g = dy[n]
        for o in range(O):
            db[o] += g[o]
