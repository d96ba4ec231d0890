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


def dense_backward_weight(x, dy, dw, db, bounds=None):
    """dw (I,O) = x.T @ dy, db (O,) = dy.sum(0); both overwritten (dw C-contiguous).

    ``bounds`` (int64, G + 1 row offsets; default one chunk [0, N]): the sums over the rows of each
    chunk [bounds[g], bounds[g+1]) are computed from zero, then added in chunk order
    (fastcnn/shard.py): bit for bit the chunks' results of separate calls, added in order."""
    ensure_gemm(dw.dtype)
    if bounds is None:
        bounds = np.array([0, x.shape[0]], dtype=np.int64)
    _dense_backward_weight(np.ascontiguousarray(x), np.ascontiguousarray(dy), dw, db, bounds)


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
        _small_rows_update(y[n0:n1], x[n0:n1], w)


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
def _dense_backward_weight(x, dy, dw, db, bounds):
    """dw (I,O) = x.T @ dy, db (O,) = dy.sum(0), summed per chunk of rows (``bounds``) from zero and
    the chunks added in order; both overwritten.

    Parallel over blocks of rows of dw: each row is owned by one iteration (no partial buffers of
    the whole dw); a block shares each loaded row of dy, and its chunks after the first are computed
    into a block-sized scratch (in cache) and added.
    """
    I = x.shape[1]
    O = dy.shape[1]
    G = bounds.shape[0] - 1
    zero = dw.dtype.type(0)
    VL = VBYTES // dw.itemsize
    # GEMM (O a multiple of the vector length): blocks of _BWD_ROWS rows,
    # dw[i0:i1] = x[:, i0:i1].T @ dy with A[i, n] = x[n, i] (row stride 1,
    # step I); otherwise blocks of ROWS rows. One prange: each is its own gufunc.
    use_gemm = O % VL == 0
    xf = x.reshape(-1)
    dyf = dy.reshape(-1)
    RB = _BWD_ROWS if use_gemm else ROWS
    nblocks = (I + RB - 1) // RB
    for blk in prange(nblocks):
        i0 = blk * RB
        i1 = min(i0 + RB, I)
        out = dw[i0:i1]
        part = np.empty((i1 - i0 if G > 1 else 0, O), dtype=dw.dtype)
        for g in range(G):
            dst = out if g == 0 else part
            n0 = bounds[g]
            n1 = bounds[g + 1]
            fill(dst.reshape(-1), zero)
            if use_gemm:
                gemm(dst.reshape(-1), 0, O, xf, n0 * I + i0, 1, I, dyf, n0 * O, O, n1 - n0, 1, 0, 0, i1 - i0,
                     O // VL)
            else:
                _small_rows_update(dst, x[n0:n1, i0:i1].T, dy[n0:n1])
            if g > 0:
                for r in range(i1 - i0):
                    outr = out[r]
                    partr = part[r]
                    for o in range(O):
                        outr[o] += partr[o]
    for o in range(O):
        db[o] = zero
    s = np.empty(O, dtype=db.dtype)
    for g in range(G):
        for o in range(O):
            s[o] = zero
        for n in range(bounds[g], bounds[g + 1]):
            row = dy[n]
            for o in range(O):
                s[o] += row[o]
        for o in range(O):
            db[o] = s[o] if g == 0 else db[o] + s[o]


@njit(cache=True, fastmath=True, error_model="numpy")
def _small_rows_update(out, a, b):
    """out (R, O) += a (R, K) @ b (K, O) in plain loops: the path for layers too small or too narrow
    for the GEMM (e.g. O = 10), of the forward (out = rows of y, a = the same rows of x, b = w) and of
    the weight gradient (out = rows of dw, a = the matching columns of x, transposed; b = dy).

    R == 4: 4 rows x 4 steps of k per pass (8 loads and 4 stores per 16 FMAs); otherwise k outer,
    rows inner, each row of b reused R times from the L1 cache. Inner loops run over the contiguous
    O axis. Every element accumulates over k in order: the same for any thread count.
    """
    R, K = a.shape
    O = b.shape[1]
    if R == 4:
        out0 = out[0]
        out1 = out[1]
        out2 = out[2]
        out3 = out[3]
        K4 = K - K % 4
        for k in range(0, K4, 4):
            b0 = b[k]
            b1 = b[k + 1]
            b2 = b[k + 2]
            b3 = b[k + 3]
            a00 = a[0, k]
            a01 = a[0, k + 1]
            a02 = a[0, k + 2]
            a03 = a[0, k + 3]
            a10 = a[1, k]
            a11 = a[1, k + 1]
            a12 = a[1, k + 2]
            a13 = a[1, k + 3]
            a20 = a[2, k]
            a21 = a[2, k + 1]
            a22 = a[2, k + 2]
            a23 = a[2, k + 3]
            a30 = a[3, k]
            a31 = a[3, k + 1]
            a32 = a[3, k + 2]
            a33 = a[3, k + 3]
            for o in range(O):
                v0 = b0[o]
                v1 = b1[o]
                v2 = b2[o]
                v3 = b3[o]
                out0[o] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                out1[o] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                out2[o] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                out3[o] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
        for k in range(K4, K):
            bk = b[k]
            a0 = a[0, k]
            a1 = a[1, k]
            a2 = a[2, k]
            a3 = a[3, k]
            for o in range(O):
                v = bk[o]
                out0[o] += a0 * v
                out1[o] += a1 * v
                out2[o] += a2 * v
                out3[o] += a3 * v
    else:
        for k in range(K):
            bk = b[k]
            for r in range(R):
                ar = a[r, k]
                outr = out[r]
                for o in range(O):
                    outr[o] += ar * bk[o]
