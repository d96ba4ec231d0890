"""2-D convolution kernels (Numba).

Layout: activations NHWC ``(N, H, W, C)``, weights HWIO ``(KH, KW, Cin, Cout)``,
bias ``(Cout,)``. Cross-correlation with PyTorch semantics. Every kernel
writes into output arrays the caller allocated (C-contiguous) and returns
None; all arrays of one call share one dtype (float32 or float64), and the
arithmetic stays in that dtype.

Padding is given as ``pad_top``/``pad_left`` only: the output size comes from
the output array's shape, the bottom/right padding is implied, and input
positions outside ``[0, H) x [0, W)`` count as zeros.

How they work: each kernel turns a block of pixels into a small matrix product.

* forward, per output row (n, oh) (the prange): gather the im2col rows
  ``col (OW, KH*KW*Cin)`` (zero-padded to a multiple of 16 columns), then
  ``y[n, oh] = b + col @ w.reshape(KH*KW*Cin, Cout)``.
* backward input, per input row (n, ih): a gather, never a scatter, so rows
  are independent and there are no races. For each kernel row kh whose output
  row ``oh = (ih + pad_top - kh*dil_h) / stride_h`` exists (divisible, in
  range), gather ``dy[n, oh]`` into ``col (W, KW*Cout)`` (zeros where no output
  pixel reads the input pixel), then ``dx[n, ih] += col @ w[kh]`` with
  ``w[kh]`` seen as ``(KW*Cout, Cin)``; consecutive valid kh make one product.
* backward weight: the N*OH*OW output pixels are cut into blocks of
  _PIXEL_BLOCK; the blocks are dealt in order to a fixed number of chunks;
  each chunk sums ``dy_block.T @ col_block`` into its own ``(Cout, KH*KW*Cin)``
  partial, and the partials are added in chunk order. The chunking does not
  depend on the thread count, so dw is bit-identical run to run and whatever
  the number of threads.

The matrix products are ``_gemm_dot`` (4 x 4 dot products over the contiguous
reduction axis, whose partial sums LLVM keeps in vector registers) when the
reduction is long enough, else ``_gemm_outer`` (outer products, 4 rows x 4
reduction steps per pass over the contiguous vector axis; for Cin = 1 and
similar short reductions).
"""
import numpy as np
from numba import njit, prange

from fastcnn.shapes import pair, same_padding, window_output_size

# Below this many columns the vector axis of _gemm_outer is too short for
# SIMD; use dot products over the reduction axis instead.
_MIN_VECTOR = 8
# Number of partial buffers of the weight gradient: fixed (never the thread
# count), so dw is bit-identical whatever the number of threads; fewer when
# the partials would hold more than _PARTIAL_BUDGET elements.
_WEIGHT_CHUNKS = 16
_PARTIAL_BUDGET = 1 << 23
# Dot products need a reduction this long to pay off (else outer products).
_MIN_DOT_K = 32
# The reduction axis of the forward dot products is zero-padded to a multiple
# of this (one AVX-512 vector of float32), so LLVM's vector loop has no tail.
_PAD = 16
# Output pixels per block of the weight gradient (a multiple of _PAD).
_PIXEL_BLOCK = 256


# --------------------------------------------------------------------------
# Small matrix products on 2-D views (serial; called inside prange bodies).
# --------------------------------------------------------------------------

@njit(cache=True, fastmath=True)
def _gemm_outer(C, A, B):
    """C (M, Nn) += A (M, K) @ B (K, Nn). Rows of B and C contiguous; A read by scalar."""
    M, Nn = C.shape
    K = A.shape[1]
    i = 0
    while i + 4 <= M:
        c0 = C[i]
        c1 = C[i + 1]
        c2 = C[i + 2]
        c3 = C[i + 3]
        k = 0
        while k + 4 <= K:
            b0 = B[k]
            b1 = B[k + 1]
            b2 = B[k + 2]
            b3 = B[k + 3]
            a00 = A[i, k]
            a01 = A[i, k + 1]
            a02 = A[i, k + 2]
            a03 = A[i, k + 3]
            a10 = A[i + 1, k]
            a11 = A[i + 1, k + 1]
            a12 = A[i + 1, k + 2]
            a13 = A[i + 1, k + 3]
            a20 = A[i + 2, k]
            a21 = A[i + 2, k + 1]
            a22 = A[i + 2, k + 2]
            a23 = A[i + 2, k + 3]
            a30 = A[i + 3, k]
            a31 = A[i + 3, k + 1]
            a32 = A[i + 3, k + 2]
            a33 = A[i + 3, k + 3]
            for n in range(Nn):
                v0 = b0[n]
                v1 = b1[n]
                v2 = b2[n]
                v3 = b3[n]
                c0[n] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                c1[n] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                c2[n] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                c3[n] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
            k += 4
        while k < K:
            b0 = B[k]
            a0 = A[i, k]
            a1 = A[i + 1, k]
            a2 = A[i + 2, k]
            a3 = A[i + 3, k]
            for n in range(Nn):
                v0 = b0[n]
                c0[n] += a0 * v0
                c1[n] += a1 * v0
                c2[n] += a2 * v0
                c3[n] += a3 * v0
            k += 1
        i += 4
    while i < M:
        c0 = C[i]
        k = 0
        while k + 4 <= K:
            b0 = B[k]
            b1 = B[k + 1]
            b2 = B[k + 2]
            b3 = B[k + 3]
            a0 = A[i, k]
            a1 = A[i, k + 1]
            a2 = A[i, k + 2]
            a3 = A[i, k + 3]
            for n in range(Nn):
                c0[n] += a0 * b0[n] + a1 * b1[n] + a2 * b2[n] + a3 * b3[n]
            k += 4
        while k < K:
            b0 = B[k]
            a0 = A[i, k]
            for n in range(Nn):
                c0[n] += a0 * b0[n]
            k += 1
        i += 1


@njit(cache=True, fastmath=True)
def _gemm_dot(C, A, BT, k0, k1):
    """C (M, Nn) += A[:, k0:k1] @ BT[:, k0:k1].T, BT (Nn, K). Rows of A and BT contiguous.

    Dot products over the contiguous K axis, 4 x 4 of them at a time: LLVM
    keeps the 16 partial sums in vector registers (fastmath reassociation),
    so each pass loads 8 vectors for 16 FMAs. The rows are sliced to
    [k0, k1) first and indexed from 0: an index k0 + k that Numba cannot
    prove non-negative gets a wraparound check that stops vectorization.
    """
    M, Nn = C.shape
    K = k1 - k0
    zero = C.dtype.type(0)
    M4 = M - M % 4
    N4 = Nn - Nn % 4
    for i in range(0, M4, 4):
        a0 = A[i, k0:k1]
        a1 = A[i + 1, k0:k1]
        a2 = A[i + 2, k0:k1]
        a3 = A[i + 3, k0:k1]
        c0 = C[i]
        c1 = C[i + 1]
        c2 = C[i + 2]
        c3 = C[i + 3]
        for j in range(0, N4, 4):
            b0 = BT[j, k0:k1]
            b1 = BT[j + 1, k0:k1]
            b2 = BT[j + 2, k0:k1]
            b3 = BT[j + 3, k0:k1]
            s00 = zero
            s01 = zero
            s02 = zero
            s03 = zero
            s10 = zero
            s11 = zero
            s12 = zero
            s13 = zero
            s20 = zero
            s21 = zero
            s22 = zero
            s23 = zero
            s30 = zero
            s31 = zero
            s32 = zero
            s33 = zero
            for k in range(K):
                x0 = a0[k]
                x1 = a1[k]
                x2 = a2[k]
                x3 = a3[k]
                y0 = b0[k]
                y1 = b1[k]
                y2 = b2[k]
                y3 = b3[k]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            c0[j] += s00
            c0[j + 1] += s01
            c0[j + 2] += s02
            c0[j + 3] += s03
            c1[j] += s10
            c1[j + 1] += s11
            c1[j + 2] += s12
            c1[j + 3] += s13
            c2[j] += s20
            c2[j + 1] += s21
            c2[j + 2] += s22
            c2[j + 3] += s23
            c3[j] += s30
            c3[j + 1] += s31
            c3[j + 2] += s32
            c3[j + 3] += s33
        for j in range(N4, Nn):
            b0 = BT[j, k0:k1]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for k in range(K):
                y0 = b0[k]
                s0 += a0[k] * y0
                s1 += a1[k] * y0
                s2 += a2[k] * y0
                s3 += a3[k] * y0
            c0[j] += s0
            c1[j] += s1
            c2[j] += s2
            c3[j] += s3
    for i in range(M4, M):
        a0 = A[i, k0:k1]
        c0 = C[i]
        for j in range(0, N4, 4):
            b0 = BT[j, k0:k1]
            b1 = BT[j + 1, k0:k1]
            b2 = BT[j + 2, k0:k1]
            b3 = BT[j + 3, k0:k1]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for k in range(K):
                x0 = a0[k]
                s0 += x0 * b0[k]
                s1 += x0 * b1[k]
                s2 += x0 * b2[k]
                s3 += x0 * b3[k]
            c0[j] += s0
            c0[j + 1] += s1
            c0[j + 2] += s2
            c0[j + 3] += s3
        for j in range(N4, Nn):
            b0 = BT[j, k0:k1]
            s0 = zero
            for k in range(K):
                s0 += a0[k] * b0[k]
            c0[j] += s0


@njit(cache=True, fastmath=True, inline="always")
def _copy(dst, src):
    """dst[:] = src[:] for 1-D views indexed from 0 (so the loop vectorizes)."""
    for t in range(dst.shape[0]):
        dst[t] = src[t]


@njit(cache=True, fastmath=True, inline="always")
def _fill(dst, value):
    for t in range(dst.shape[0]):
        dst[t] = value


@njit(cache=True, fastmath=True, inline="always")
def _im2col_pixel(x3, crow, n, oh, ow, H, W, Cin, KH, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """crow[(kh*KW + kw)*Cin + ci] = x[n, oh*sh - pt + kh*dh, ow*sw - pl + kw*dw, ci] (0 outside).

    x3 is x seen as (N, H, W*Cin). When the kernel row lies inside the image
    and dil_w == 1, its KW*Cin inputs are contiguous: one copy.
    """
    zero = crow.dtype.type(0)
    iw0 = ow * stride_w - pad_left
    L = KW * Cin
    for kh in range(KH):
        ih = oh * stride_h - pad_top + kh * dil_h
        base = kh * L
        if ih < 0 or ih >= H:
            _fill(crow[base:base + L], zero)
            continue
        xrow = x3[n, ih]
        if dil_w == 1 and iw0 >= 0 and iw0 + KW <= W:
            _copy(crow[base:base + L], xrow[iw0 * Cin:iw0 * Cin + L])
            continue
        for kw in range(KW):
            iw = iw0 + kw * dil_w
            off = base + kw * Cin
            if iw < 0 or iw >= W:
                _fill(crow[off:off + Cin], zero)
            else:
                _copy(crow[off:off + Cin], xrow[iw * Cin:iw * Cin + Cin])


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=True)
def conv2d_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """y (N, OH, OW, Cout) = conv(x (N, H, W, Cin), w (KH, KW, Cin, Cout)) + b; y overwritten."""
    N = x.shape[0]
    KH, KW, Cin, Cout = w.shape
    OH = y.shape[1]
    OW = y.shape[2]
    K = KH * KW * Cin
    H = x.shape[1]
    W = x.shape[2]
    x3 = x.reshape(N, H, W * Cin)
    wmat = np.ascontiguousarray(w).reshape(K, Cout)
    # Long reductions: dot products over K (padded to a multiple of the vector
    # width with zeros). Short ones (e.g. Cin = 1): outer products over Cout.
    use_dot = K >= _MIN_DOT_K or Cout < _MIN_VECTOR
    Kp = (K + _PAD - 1) // _PAD * _PAD if use_dot else K
    wt = np.zeros((Cout, Kp), dtype=y.dtype)
    if use_dot:
        for k in range(K):
            for co in range(Cout):
                wt[co, k] = wmat[k, co]
    for r in prange(N * OH):
        n = r // OH
        oh = r - n * OH
        col = np.empty((OW, Kp), dtype=y.dtype)
        for ow in range(OW):
            crow = col[ow]
            _im2col_pixel(x3, crow, n, oh, ow, H, W, Cin, KH, KW, stride_h, stride_w, pad_top, pad_left,
                          dil_h, dil_w)
            _fill(crow[K:Kp], y.dtype.type(0))
        yrow = y[n, oh]
        for ow in range(OW):
            _copy(yrow[ow], b)
        if use_dot:
            _gemm_dot(yrow, col, wt, 0, Kp)
        else:
            _gemm_outer(yrow, col, wmat)


@njit(parallel=True, cache=True, fastmath=True)
def conv2d_backward_input(dy, w, dx, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dx (N, H, W, Cin) = dL/dx given dy (N, OH, OW, Cout); dx fully overwritten."""
    N, H, W, Cin = dx.shape
    KH, KW, _, Cout = w.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    KC = KW * Cout
    K = KH * KC
    use_dot = KC >= _MIN_DOT_K or Cin < _MIN_VECTOR
    # Weights with the reduction axis (kh, kw, co) flattened:
    # dot path: w2t (Cin, K); outer path: w2 (K, Cin).
    if use_dot:
        w2t = np.empty((Cin, K), dtype=dx.dtype)
        w2 = np.empty((0, Cin), dtype=dx.dtype)
        for kh in range(KH):
            for kw in range(KW):
                for ci in range(Cin):
                    for co in range(Cout):
                        w2t[ci, kh * KC + kw * Cout + co] = w[kh, kw, ci, co]
    else:
        w2t = np.empty((Cin, 0), dtype=dx.dtype)
        w2 = np.empty((K, Cin), dtype=dx.dtype)
        for kh in range(KH):
            for kw in range(KW):
                for ci in range(Cin):
                    for co in range(Cout):
                        w2[kh * KC + kw * Cout + co, ci] = w[kh, kw, ci, co]
    zero = dx.dtype.type(0)
    for r in prange(N * H):
        n = r // H
        ih = r - n * H
        dxrow = dx[n, ih]
        for iw in range(W):
            _fill(dxrow[iw], zero)
        col = np.empty((W, K), dtype=dx.dtype)
        # Gather dy for every kernel row kh that maps input row ih onto an
        # output row; consecutive valid kh form one run = one matrix product.
        run_start = -1
        for kh in range(KH + 1):
            valid = False
            oh = -1
            if kh < KH:
                t = ih + pad_top - kh * dil_h
                oh = t // stride_h if t >= 0 else -1
                valid = t >= 0 and oh * stride_h == t and oh < OH
            if valid:
                dyrow = dy[n, oh]
                base = kh * KC
                for iw in range(W):
                    crow = col[iw]
                    for kw in range(KW):
                        u = iw + pad_left - kw * dil_w
                        off = base + kw * Cout
                        ow = -1
                        if u >= 0:
                            ow = u // stride_w
                            if ow * stride_w != u or ow >= OW:
                                ow = -1
                        if ow < 0:
                            _fill(crow[off:off + Cout], zero)
                        else:
                            _copy(crow[off:off + Cout], dyrow[ow])
                if run_start < 0:
                    run_start = kh
            elif run_start >= 0:
                k0 = run_start * KC
                k1 = kh * KC
                if use_dot:
                    _gemm_dot(dxrow, col, w2t, k0, k1)
                else:
                    _gemm_outer(dxrow, col[:, k0:k1], w2[k0:k1])
                run_start = -1


@njit(parallel=True, cache=True, fastmath=True)
def conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dw (KH, KW, Cin, Cout) and db (Cout,) = dL/dw, dL/db; both overwritten (not accumulated).

    The N*OH*OW output pixels are cut into blocks of _PIXEL_BLOCK; blocks are
    dealt to (at most) _WEIGHT_CHUNKS chunks in order, each chunk sums
    dy_block.T @ col_block into its own (Cout, K) partial (dot products over
    the pixels), and the partials are added in chunk order: the result does
    not depend on scheduling.
    """
    N = x.shape[0]
    KH, KW, Cin, Cout = dw.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    K = KH * KW * Cin
    P = N * OH * OW
    PB = _PIXEL_BLOCK
    nblocks = (P + PB - 1) // PB
    nchunks = min(nblocks, _WEIGHT_CHUNKS, max(1, _PARTIAL_BUDGET // max(1, K * Cout)))
    dy2 = dy.reshape(P, Cout)
    partial = np.zeros((nchunks, Cout, K), dtype=dw.dtype)
    partial_b = np.zeros((nchunks, Cout), dtype=dw.dtype)
    OHW = OH * OW
    H = x.shape[1]
    W = x.shape[2]
    x3 = x.reshape(N, H, W * Cin)
    for c in prange(nchunks):
        blk0 = (c * nblocks) // nchunks
        blk1 = ((c + 1) * nblocks) // nchunks
        col = np.empty((PB, K), dtype=dw.dtype)
        colT = np.empty((K, PB), dtype=dw.dtype)
        dyT = np.empty((Cout, PB), dtype=dw.dtype)
        pc = partial[c]
        pb = partial_b[c]
        for blk in range(blk0, blk1):
            p0 = blk * PB
            cnt = min(PB, P - p0)
            for t in range(cnt):
                p = p0 + t
                n = p // OHW
                rem = p - n * OHW
                oh = rem // OW
                ow = rem - oh * OW
                _im2col_pixel(x3, col[t], n, oh, ow, H, W, Cin, KH, KW, stride_h, stride_w, pad_top, pad_left,
                              dil_h, dil_w)
            # Transpose in tiles of 16 pixels (one cache line of colT per k).
            for t0 in range(0, cnt, 16):
                t1 = min(t0 + 16, cnt)
                for k in range(K):
                    ct = colT[k]
                    for t in range(t0, t1):
                        ct[t] = col[t, k]
                for co in range(Cout):
                    dt = dyT[co]
                    for t in range(t0, t1):
                        dt[t] = dy2[p0 + t, co]
            _gemm_dot(pc, dyT, colT, 0, cnt)
            for t in range(cnt):
                dp = dy2[p0 + t]
                for co in range(Cout):
                    pb[co] += dp[co]
    # Fixed-order reduction of the partials.
    dwm = dw.reshape(K, Cout)
    for k in prange(K):
        for co in range(Cout):
            s = partial[0, co, k]
            for c in range(1, nchunks):
                s += partial[c, co, k]
            dwm[k, co] = s
    for co in range(Cout):
        s = partial_b[0, co]
        for c in range(1, nchunks):
            s += partial_b[c, co]
        db[co] = s


# --------------------------------------------------------------------------
# Convenience (plain Python)
# --------------------------------------------------------------------------

def resolve_padding(padding, kernel_size, stride=1, dilation=1):
    """(pad_top, pad_bottom, pad_left, pad_right) from an int, a pair, "valid" or "same"."""
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, 0, 0, 0
        if mode == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {(sh, sw)}")
            top, bottom = same_padding(kh, dh)
            left, right = same_padding(kw, dw)
            return top, bottom, left, right
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = pair(padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    return ph, ph, pw, pw


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """y = conv2d(x NHWC, w HWIO) + b, allocated with x.dtype. padding: int, pair, "valid" or "same"."""
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"expected x (N, H, W, C) and w (KH, KW, Cin, Cout), got {x.shape} and {w.shape}")
    N, H, W, Cin = x.shape
    KH, KW, wcin, Cout = w.shape
    if wcin != Cin:
        raise ValueError(f"x has {Cin} channels but w expects {wcin}")
    if b is None:
        b = np.zeros(Cout, dtype=x.dtype)
    b = np.ascontiguousarray(b, dtype=x.dtype)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    if min(sh, sw, dh, dw) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got stride {(sh, sw)}, dilation {(dh, dw)}")
    top, bottom, left, right = resolve_padding(padding, (KH, KW), (sh, sw), (dh, dw))
    OH = window_output_size(H, KH, sh, top, bottom, dh)
    OW = window_output_size(W, KW, sw, left, right, dw)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"conv2d output size {OH}x{OW} is below 1: input {H}x{W}, kernel {KH}x{KW}, "
            f"stride {(sh, sw)}, padding {(top, bottom, left, right)}, dilation {(dh, dw)}"
        )
    y = np.empty((N, OH, OW, Cout), dtype=x.dtype)
    conv2d_forward(x, w, b, y, sh, sw, top, left, dh, dw)
    return y
