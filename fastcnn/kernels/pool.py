"""2-D max and average pooling on NHWC tensors, forward and backward; global average pooling is
average pooling with one window per image.

Max pooling is one window scan and one scatter, ``@njit(inline="always")``
functions with flags that every max-pool kernel runs: the MaxPool2D layer's
below (flags off) and the fused blocks' (fastcnn/kernels/fused.py), each
inlining them with its flags as constants, so each compiles a loop specialized
for its flags and no logic exists twice:

* ``maxpool2d_scan``: optional prologue z = (x - mean) * scale + beta (batch
  norm, activation.affine), optional activation (``act``: activation.NONE /
  RELU / LEAKY and its slope), then the window scan, writing y and (``store``)
  the argmax codes and, with batch norm, x - mean at each window's winner.
* ``maxpool2d_route``: dx = zero plus each dy scattered to its winner (times the
  slope for a leaky ReLU winner <= 0), overlapping windows accumulating in
  window order; optional batch-norm epilogue (the input-gradient formula
  norm.dx_rows, in place while the image is in cache).

Semantics (PyTorch's): padding counts as -inf, so only real pixels can win;
ties go to the FIRST maximum in row-major window order; a NaN wins over any
number (the LAST NaN of the window, as torch's ``val > max || isnan(val)``), so
a window holding NaN outputs NaN. With an activation the result is exactly the
layer sequence's: ReLU is applied after the scan (relu of the first maximum is
the first maximum of relu where it is > 0; a window whose maximum is <= 0
routes nothing, which the unfused ReLU backward would zero); a leaky ReLU
before it (with slope 0 its inputs <= 0 tie, broken as the layers do). With
batch norm the scan compares z (gamma may be negative).

Argmax codes (int32, flat input index i = ih*W + iw): i routes dy to i; -1
routes nothing (a ReLU winner <= 0, or a window with no real pixel, only
possible with padding >= pool size: y = -inf); -2 - i routes slope * dy to i
(leaky ReLU winner <= 0, or NaN: the slope at NaN, as torch).

The scan state of a window (running maximum, its index, its x - mean) is
updated by one helper, ``_step``, in both loop structures: a register-only path
for 2x2 windows with stride 2 and no padding (the seed network's pooling: the
four pixels compared in registers) and the general path (the state kept in the
output rows, one window pixel at a time). These two row functions are called,
not inlined, once per block of output rows; ``numba.literally`` specializes them
for each flag combination (compiled once each: inlining them into every kernel
made each kernel compile two to five times longer).

Caching note: see fastcnn/kernels/activation.py (after editing this file, clear
the cache of the kernels that compile it in).
"""
import numpy as np
from numba import literally, njit, prange

from . import activation as act_
from . import norm
from .activation import FASTMATH, LEAKY, NONE, RELU  # FASTMATH: the NaN tests must not fold away

# Work items of the forward scan: blocks of output rows (n, oh), at most this many (a fixed number, not
# the thread count; the scan reduces nothing, so any split gives the same bits). Blocks of rows, not
# single rows: a call of the row functions per row measured slower.
ROW_BLOCKS = 64


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _is_2x2(geometry):
    """The seed network's pooling: the forward scan takes the register-only path for it."""
    pool_h, pool_w, stride_h, stride_w, pad_top, pad_left = geometry
    return (pool_h == 2 and pool_w == 2 and stride_h == 2 and stride_w == 2 and pad_top == 0
            and pad_left == 0)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _key(u, c, act, s, zero, mean, scale, beta):
    """The value the scan compares: z, or for a leaky ReLU its activation. ReLU is applied after the
    scan (relu of the first maximum of z is the first maximum of relu(z) where it is > 0, and a
    window whose maximum is <= 0 routes nothing); a leaky ReLU with slope 0 ties every input <= 0,
    so its windows compare the activated values, as the layers do."""
    z = act_.prologue(u, c, mean, scale, beta)
    return act_.activate(z, act, s, zero) if act == LEAKY else z


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _start(u, idx, c, act, s, zero, mean, scale, beta):
    """The scan state after a window's first pixel u (input index idx): (key, idx, x - mean)."""
    return _key(u, c, act, s, zero, mean, scale, beta), idx, norm.centered(u, c, mean)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _step(u, idx, m, i, d, c, act, s, zero, mean, scale, beta):
    """The scan state (m, i, d) after one more pixel u: it replaces the running maximum if strictly
    greater (ties: the first maximum stays) or NaN (the last NaN wins, as torch)."""
    v = _key(u, c, act, s, zero, mean, scale, beta)
    b = (v > m) | (v != v)
    return (v if b else m), (idx if b else i), (norm.centered(u, c, mean) if b else d)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _finish(m, i, act, zero):
    """(y, argmax code) of a window from its maximum key m and winner i (module docstring): where the
    activation passes m, (act(m), i); else ReLU (0, -1), leaky ReLU (m, already activated, -2 - i)."""
    p = act_.passes(m, act, zero)
    if act == RELU:
        return (m if p else zero), (i if p else np.int32(-1))
    if act == LEAKY:
        return m, (i if p else np.int32(-2) - i)
    return m, i


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _scan_rows_2x2(x, y, argmax, xsel, t0, t1, act, s, zero, mean, scale, beta, store):
    """Output rows t0..t1 of (N*OH) of 2x2 windows, stride 2, no padding: each window's four pixels in
    registers."""
    literally(act)
    literally(store)
    W = x.shape[2]
    OH = y.shape[1]
    for t in range(t0, t1):
        n = t // OH
        oh = t - n * OH
        for ow in range(y.shape[2]):
            i0 = np.int32(2 * oh * W + 2 * ow)
            i1 = np.int32(i0 + 1)
            i2 = np.int32(i0 + W)
            i3 = np.int32(i2 + 1)
            x0 = x[n, 2 * oh, 2 * ow]
            x1 = x[n, 2 * oh, 2 * ow + 1]
            x2 = x[n, 2 * oh + 1, 2 * ow]
            x3 = x[n, 2 * oh + 1, 2 * ow + 1]
            yr = y[n, oh, ow]
            for c in range(yr.shape[0]):
                m, i, d = _start(x0[c], i0, c, act, s, zero, mean, scale, beta)
                m, i, d = _step(x1[c], i1, m, i, d, c, act, s, zero, mean, scale, beta)
                m, i, d = _step(x2[c], i2, m, i, d, c, act, s, zero, mean, scale, beta)
                m, i, d = _step(x3[c], i3, m, i, d, c, act, s, zero, mean, scale, beta)
                m, i = _finish(m, i, act, zero)
                yr[c] = m
                if store:
                    argmax[n, oh, ow, c] = i
                    if xsel is not None:
                        xsel[n, oh, ow, c] = d


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _scan_rows(x, y, argmax, xsel, t0, t1, geometry, act, s, zero, mean, scale, beta, store):
    """Output rows t0..t1 of (N*OH), any geometry, one window pixel at a time: the state per channel
    kept in the output rows (y; argmax and xsel when stored, else scratch rows). Without xsel the
    x - mean state is unused: it goes to the y row, written before the maximum."""
    literally(act)
    literally(store)
    pool_h, pool_w, stride_h, stride_w, pad_top, pad_left = geometry
    C = x.shape[3]
    H = x.shape[1]
    W = x.shape[2]
    OH = y.shape[1]
    ibuf = np.empty(0 if store else C, np.int32)
    dbuf = np.empty(0 if store else C, x.dtype)
    for t in range(t0, t1):
        n = t // OH
        oh = t - n * OH
        h0 = oh * stride_h - pad_top
        hs = max(h0, 0)
        he = min(h0 + pool_h, H)
        for ow in range(y.shape[2]):
            w0 = ow * stride_w - pad_left
            ws = max(w0, 0)
            we = min(w0 + pool_w, W)
            yr = y[n, oh, ow]
            ir = argmax[n, oh, ow] if store else ibuf
            dr = yr if xsel is None else (xsel[n, oh, ow] if store else dbuf)
            if hs >= he or ws >= we:  # no real pixel
                for c in range(C):
                    dr[c] = zero
                    ir[c] = -1
                    yr[c] = -np.inf
                continue
            # Start from the first real pixel of the window (row-major order).
            xr = x[n, hs, ws]
            first = np.int32(hs * W + ws)
            for c in range(C):
                m, i, d = _start(xr[c], first, c, act, s, zero, mean, scale, beta)
                dr[c] = d
                ir[c] = i
                yr[c] = m
            for ih in range(hs, he):
                for iw in range(ws, we):
                    if ih == hs and iw == ws:
                        continue
                    xr = x[n, ih, iw]
                    idx = np.int32(ih * W + iw)
                    for c in range(C):
                        m, i, d = _step(xr[c], idx, yr[c], ir[c], dr[c], c, act, s, zero, mean, scale, beta)
                        dr[c] = d
                        ir[c] = i
                        yr[c] = m
            if act != NONE:
                for c in range(C):
                    yr[c], ir[c] = _finish(yr[c], ir[c], act, zero)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def maxpool2d_scan(x, y, argmax, xsel, geometry, act, slope, mean, scale, beta, store):
    """y (N,OH,OW,C) = max-pool of act(z) over x (N,H,W,C) (module docstring), inlined into each kernel
    that runs it with its flags as constants; the output size is taken from y.shape (bottom/right
    padding implied). ``geometry`` = (pool_h, pool_w, stride_h, stride_w, pad_top, pad_left).

    * flags off (the MaxPool2D layer): z = x, argmax = the flat input index of the first maximum;
    * ``act`` RELU / LEAKY (``slope``): the fused activation + max-pool blocks; argmax codes;
    * ``mean``, ``scale``, ``beta`` (C,) arrays: z = (x - mean) * scale + beta, the fused batch norm
      (+ ReLU) + max-pool block; ``xsel`` (N,OH,OW,C) gets x - mean at each window's winner (its
      backward reductions read it instead of the full-size x);
    * ``store`` False: y only (argmax and xsel are not touched and may be placeholders).
    """
    N = x.shape[0]
    T = N * y.shape[1]
    zero = x.dtype.type(0)
    s = x.dtype.type(slope)
    fast = _is_2x2(geometry)
    nw = min(T, ROW_BLOCKS)
    for k in prange(nw):
        t0 = k * T // nw
        t1 = (k + 1) * T // nw
        if fast:
            _scan_rows_2x2(x, y, argmax, xsel, t0, t1, act, s, zero, mean, scale, beta, store)
        else:
            _scan_rows(x, y, argmax, xsel, t0, t1, geometry, act, s, zero, mean, scale, beta, store)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _route_image(dy, argmax, dxn, n, act, s):
    """dxn (H*W, C), image n's input gradient: zero, then each dy of its windows added at its winner
    (code >= 0) or, for a leaky ReLU, slope * dy at -2 - code (code <= -2), in window order."""
    zero = dxn.dtype.type(0)
    for p in range(dxn.shape[0]):
        row = dxn[p]
        for c in range(row.shape[0]):
            row[c] = zero
    for oh in range(dy.shape[1]):
        for ow in range(dy.shape[2]):
            dyr = dy[n, oh, ow]
            ar = argmax[n, oh, ow]
            for c in range(dyr.shape[0]):
                idx = ar[c]
                if idx >= 0:
                    dxn[idx, c] += dyr[c]
                elif act == LEAKY and idx <= -2:
                    dxn[-2 - idx, c] += s * dyr[c]


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def maxpool2d_route(dy, argmax, dx, act, slope, x, mean, k1, k2, k3):
    """dx (N,H,W,C) overwritten with the max-pool backward of dy (N,OH,OW,C) through the argmax codes
    of maxpool2d_scan with activation ``act``: zero, plus each dy at its winner, plus (LEAKY) slope *
    dy at a winner <= 0; overlapping windows accumulate, in window order. Inlined into each kernel
    that runs it, ``act`` constant.

    With the batch-norm epilogue (``x`` (N,H,W,C), ``mean`` and the coefficients ``k1``, ``k2``,
    ``k3`` of norm.dx_coefficients; else all None): the routed gradient g then becomes, in place
    while the image is in cache, the batch-norm input gradient k1 * g - k2 - k3 * (x - mean)
    (norm.dx_rows): the fused batch norm + ReLU + max-pool block's dx.

    Parallel over images: each writes only its own dx. (Measured faster than units of one output
    row band, which own fewer rows.)
    """
    N, H, W, C = dx.shape
    s = dx.dtype.type(slope)
    zero = dx.dtype.type(0)
    dx3 = dx.reshape((N, H * W, C))
    for n in prange(N):
        dxn = dx3[n]
        _route_image(dy, argmax, dxn, n, act, s)
        if x is not None:
            norm.dx_rows(x.reshape((N, H * W, C))[n], dxn, dxn, k1, k2, k3, NONE, s, zero, mean, None, None)


# The MaxPool2D layer's kernels (the fused blocks': fastcnn/kernels/fused.py).

@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def maxpool2d_forward(x, y, argmax, pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """x (N,H,W,C) -> y (N,OH,OW,C); argmax int32 (N,OH,OW,C) = flat input index ih*W+iw of the first
    maximum; a window holding no real pixel (only possible with padding >= pool size) gets -inf
    and argmax -1."""
    maxpool2d_scan(x, y, argmax, None, (pool_h, pool_w, stride_h, stride_w, pad_top, pad_left), NONE, 0.0,
                   None, None, None, True)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def maxpool2d_backward(dy, argmax, dx):
    """dx (N,H,W,C) overwritten: zero, then each dy added at its argmax (code >= 0: also the backward
    of the fused ReLU + max-pool block, whose -1 routes nothing)."""
    maxpool2d_route(dy, argmax, dx, NONE, 0.0, None, None, None, None, None)


# ------------------------------------------------------------ average pooling
# PyTorch's AvgPool2d without padding (so count_include_pad does not matter):
# y = sum of the pool_h x pool_w window / (pool_h * pool_w); output size
# floor((H - pool) / stride) + 1, left-over pixels at the bottom/right dropped.
# Global average pooling (fastcnn/layers/global_avgpool.py) is the one H x W window.


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _box_mean(out, a, n, h0, h1, w0, w1, inv):
    """out = inv * the sum of a[n, h0:h1, w0:w1] over rows then columns (each channel)."""
    zero = out.dtype.type(0)
    for c in range(out.shape[0]):
        out[c] = zero
    for h in range(h0, h1):
        for w in range(w0, w1):
            ar = a[n, h, w]
            for c in range(out.shape[0]):
                out[c] += ar[c]
    for c in range(out.shape[0]):
        out[c] *= inv


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _box(i, pool, stride, n_src, gather):
    """[lo, hi) along one axis: the input window of output i, or (``gather``, the backward) the outputs
    whose windows hold input i: o with o*stride <= i < o*stride + pool, o < n_src."""
    if gather:
        return max((i - pool) // stride + 1, 0), min(i // stride, n_src - 1) + 1
    return i * stride, i * stride + pool


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _avgpool(src, out, pool_h, pool_w, stride_h, stride_w, gather):
    """out[n, r, q] = the box mean of src over _box(r) x _box(q), inlined with ``gather`` constant.
    Parallel over (n, r): each out row written by one thread."""
    N, R, Q, _ = out.shape
    inv = out.dtype.type(1.0 / (pool_h * pool_w))
    for t in prange(N * R):
        n = t // R
        r = t - n * R
        h0, h1 = _box(r, pool_h, stride_h, src.shape[1], gather)
        for q in range(Q):
            w0, w1 = _box(q, pool_w, stride_w, src.shape[2], gather)
            _box_mean(out[n, r, q], src, n, h0, h1, w0, w1, inv)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def avgpool2d_forward(x, y, pool_h, pool_w, stride_h, stride_w):
    """x (N,H,W,C) -> y (N,OH,OW,C), the mean of each window. Output size from y.shape."""
    _avgpool(x, y, pool_h, pool_w, stride_h, stride_w, False)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def avgpool2d_backward(dy, dx, pool_h, pool_w, stride_h, stride_w):
    """dx (N,H,W,C) overwritten: each input pixel gets the sum of dy over the windows holding it,
    divided by the window area (overlapping windows accumulate; pixels in no window get 0).

    A gather, not a scatter: each dx row written by one thread.
    """
    _avgpool(dy, dx, pool_h, pool_w, stride_h, stride_w, True)
