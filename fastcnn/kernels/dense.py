"""Fully connected layer: y = x @ w + b and its gradients.

x (N,I), w (I,O), b (O,), y (N,O).

Where the shapes allow, each product is done by the register-blocked GEMM
of fastcnn/kernels/gemm.py (``gemm``, one cfunc per dtype): the forward and the
weight gradient when O is a multiple of the SIMD vector length (x, w, dy
read in place), the input gradient always (dx.T = w @ dy.T: dy is packed
transposed, columns padded to the vector length, and each block of dx.T is
written back transposed). The work is split over blocks of output elements,
each computed by one thread in a fixed order: results do not depend on the
thread count. Otherwise (small layers, e.g. O = 10) plain loops: inner loops
run over the contiguous O axis, rows of the batch in blocks of ROWS so that
each row of w, once loaded into the L1 cache, is reused ROWS times.
"""
import numpy as np
from numba import njit, prange

from fastcnn.kernels.gemm import MR, NV, VBYTES, copy_vector, ensure_gemm, fill, gemm, prange_only

ROWS = 4
# GEMM paths: output rows per parallel item (forward: batch rows; weight
# gradient: rows of dw; input gradient: columns of dx).
_FWD_ROWS = 4 * MR
_BWD_ROWS = 8 * MR


def dense_forward(x, w, b, y):
    """y (N,O) = x @ w + b; y (C-contiguous) overwritten."""
    ensure_gemm(y.dtype)
    _dense_forward(np.ascontiguousarray(x), np.ascontiguousarray(w), b, y)


def dense_backward_input(dy, w, dx):
    """dx (N,I) = dy @ w.T; dx (C-contiguous) overwritten."""
    ensure_gemm(dx.dtype)
    _dense_backward_input(np.ascontiguousarray(dy), np.ascontiguousarray(w), dx)


def dense_backward_weight(x, dy, dw, db):
    """dw (I,O) = x.T @ dy, db (O,) = dy.sum(0); both overwritten (dw C-contiguous)."""
    ensure_gemm(dw.dtype)
    _dense_backward_weight(np.ascontiguousarray(x), np.ascontiguousarray(dy), dw, db)


@njit(cache=True, fastmath=True, parallel=prange_only(), error_model="numpy")
def _dense_forward(x, w, b, y):
    """y (N,O) = x @ w + b."""
    N, I = x.shape
    O = w.shape[1]
    VL = VBYTES // y.itemsize
    # GEMM items: (column block of NV vectors, block of _FWD_ROWS rows),
    # column-block major so each thread keeps its slice of w in cache.
    # Otherwise blocks of ROWS rows. One prange: each is its own gufunc.
    use_gemm = O % VL == 0 and I > 0
    NVt = O // VL
    ncb = (NVt + NV - 1) // NV
    nrb = (N + _FWD_ROWS - 1) // _FWD_ROWS
    xf = x.reshape(-1)
    wf = w.reshape(-1)
    yf = y.reshape(-1)
    nblocks = ncb * nrb if use_gemm else (N + ROWS - 1) // ROWS
    for blk in prange(nblocks):
        if use_gemm:
            cb = blk // nrb
            n0 = (blk - cb * nrb) * _FWD_ROWS
            n1 = min(N, n0 + _FWD_ROWS)
            j0 = cb * NV * VL
            nv = min(NV, NVt - cb * NV)
            for n in range(n0, n1):
                copy_vector(y[n, j0:j0 + nv * VL], b[j0:j0 + nv * VL])
            gemm(yf, n0 * O + j0, O, xf, n0 * I, I, 1, wf, j0, O, I, 1, 0, 0, n1 - n0, nv)
            continue
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


@njit(cache=True, fastmath=True, parallel=prange_only(), error_model="numpy")
def _dense_backward_input(dy, w, dx):
    """dx (N,I) = dy @ w.T: dx[n,i] = sum_o dy[n,o] * w[i,o]."""
    N, O = dy.shape
    I = w.shape[0]
    VL = VBYTES // dx.itemsize
    # dx.T (I, Np) = w (I, O) @ dyT (O, Np), dyT = dy.T with zero columns past N.
    NVt = (N + VL - 1) // VL
    Np = NVt * VL
    dyT = np.zeros((O, Np), dtype=dx.dtype)
    for n in range(N):
        g = dy[n]
        for o in range(O):
            dyT[o, n] = g[o]
    dyTf = dyT.reshape(-1)
    wf = w.reshape(-1)
    RB = _BWD_ROWS
    for blk in prange((I + RB - 1) // RB):
        i0 = blk * RB
        i1 = min(I, i0 + RB)
        acc = np.zeros((RB, Np), dtype=dx.dtype)
        gemm(acc.reshape(-1), 0, Np, wf, i0 * O, O, 1, dyTf, 0, Np, O, 1, 0, 0, i1 - i0, NVt)
        for r in range(i1 - i0):
            ar = acc[r]
            for n in range(N):
                dx[n, i0 + r] = ar[n]


@njit(cache=True, fastmath=True, parallel=prange_only(), error_model="numpy")
def _dense_backward_weight(x, dy, dw, db):
    """dw (I,O) = x.T @ dy, db (O,) = dy.sum(0); both overwritten.

    Parallel over blocks of rows of dw: each row is owned by one iteration
    (no partial buffers); a block shares each loaded row of dy.
    """
    N, I = x.shape
    O = dy.shape[1]
    zero = dw.dtype.type(0)
    VL = VBYTES // dw.itemsize
    # GEMM (O a multiple of the vector length): blocks of _BWD_ROWS rows,
    # dw[i0:i1] = x[:, i0:i1].T @ dy with A[i, n] = x[n, i] (row stride 1,
    # step I); otherwise blocks of ROWS rows. One prange: each is its own gufunc.
    use_gemm = O % VL == 0
    xf = x.reshape(-1)
    dwf = dw.reshape(-1)
    dyf = dy.reshape(-1)
    RB = _BWD_ROWS if use_gemm else ROWS
    nblocks = (I + RB - 1) // RB
    for blk in prange(nblocks):
        i0 = blk * RB
        i1 = min(i0 + RB, I)
        fill(dwf[i0 * O:i1 * O], zero)
        if use_gemm:
            gemm(dwf, i0 * O, O, xf, i0, 1, I, dyf, 0, O, N, 1, 0, 0, i1 - i0, O // VL)
            continue
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
