"""Fused kernels: activation + max-pool, batch norm + ReLU (+ max-pool), NHWC.

Each kernel does in one pass over memory what the unfused layers do in two
or three, with the same arithmetic, so results equal those of the layer
composition (exactly, except the batch-norm backward reductions, which sum the
same terms in another order):

* ReLU + max-pool. ``relu(max(window)) == max(relu(window))`` and, when the
  maximum is > 0, the first maximum is at the same position in both spaces.
  When it is <= 0 the unfused ReLU backward zeroes whatever the pool routed,
  so the fused argmax is -1 ("route nothing") and the backward pass is the
  max-pool scatter alone (no separate ReLU-backward pass over the full tensor).
* Leaky ReLU + max-pool compares in the activated space (exact whatever the
  slope) and encodes a winner whose input was <= 0 as ``-2 - index``; its
  gradient gets the slope. Only for windows that do not overlap (then every
  input pixel gets at most one gradient, so ``slope * dy`` equals the unfused
  ``slope * (0 + dy)``).
* Batch norm + ReLU (+ max-pool). Statistics as fastcnn/kernels/norm.py (same
  chunks, same two-pass variance: bit-identical; the caller computes invstd and
  scale = gamma * invstd correctly rounded), then one pass computing
  ``z = (x - mean) * scale + beta``, ReLU (and the pool, comparing in z-space:
  gamma may be negative). The backward reductions only need the winners: the
  pooled forward stores ``x - mean`` at each window's winner, so they run over
  the pooled tensor; the dx pass rebuilds the routed gradient in cache, one
  band of rows at a time, and applies the batch-norm formula in place.

Backward scatters run per unit of work that owns whole input rows: one
output row band (n, oh) when windows do not overlap vertically, else one
image. Within a unit the windows are visited in (oh, ow) order, the order of
the unfused max-pool backward, so overlapping contributions are added in the
same order. All reductions use fixed-size row chunks summed in a fixed order:
deterministic whatever the thread count.

NaN propagates as in PyTorch: a window holding NaN wins with its LAST NaN (torch's
``val > max || isnan(val)``), relu(NaN) = NaN and its gradient passes (argmax keeps
the NaN's index, not -1). The kernels that compare are compiled with
``activation.FASTMATH`` (fastmath without 'nnan'/'ninf'), so LLVM cannot fold the
NaN tests away.

Arrays are contiguous (the blocks in fastcnn/fusion.py make sure of it);
outputs are allocated by the caller and overwritten. float32 and float64:
constants are typed from the arrays' dtype.
"""
import numpy as np
from numba import njit, prange

from .activation import FASTMATH
from .norm import CHUNK, _sum_chunks


# ---------------------------------------------------------------------------
# ReLU / leaky ReLU + max-pool
# ---------------------------------------------------------------------------

@njit(error_model="numpy", cache=True, fastmath=True, inline="always")
def _is_2x2(pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """The seed network's pooling: the kernels take a register-only path for it."""
    return (pool_h == 2 and pool_w == 2 and stride_h == 2 and stride_w == 2 and pad_top == 0
            and pad_left == 0)


@njit(error_model="numpy", cache=True, fastmath=FASTMATH, parallel=True)
def relu_maxpool2d_forward(x, y, argmax, pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """y = maxpool(relu(x)) (N,OH,OW,C); argmax int32 = flat input index ih*W+iw of the
    first maximum when it is > 0, else -1 (a window with no real pixel: y = -inf, -1)."""
    N, H, W, C = x.shape
    OH = y.shape[1]
    OW = y.shape[2]
    zero = x.dtype.type(0)
    none = np.int32(-1)
    fast = _is_2x2(pool_h, pool_w, stride_h, stride_w, pad_top, pad_left)
    for t in prange(N * OH):
        n = t // OH
        oh = t - n * OH
        if fast:
            # 2x2 windows, stride 2, no padding (the seed network): the four pixels
            # compared in registers, in row-major order, first maximum kept.
            for ow in range(OW):
                i0 = np.int32(2 * oh * W + 2 * ow)
                i1 = np.int32(i0 + 1)
                i2 = np.int32(i0 + W)
                i3 = np.int32(i2 + 1)
                x0 = x[n, 2 * oh, 2 * ow]
                x1 = x[n, 2 * oh, 2 * ow + 1]
                x2 = x[n, 2 * oh + 1, 2 * ow]
                x3 = x[n, 2 * oh + 1, 2 * ow + 1]
                yr = y[n, oh, ow]
                ar = argmax[n, oh, ow]
                for c in range(C):
                    v0 = x0[c]
                    v1 = x1[c]
                    v2 = x2[c]
                    v3 = x3[c]
                    m = v0
                    i = i0
                    b = v1 > m
                    m = v1 if b else m
                    i = i1 if b else i
                    b = v2 > m
                    m = v2 if b else m
                    i = i2 if b else i
                    b = v3 > m
                    m = v3 if b else m
                    i = i3 if b else i
                    # A NaN in the window wins, the last one (as torch): one test for the four.
                    n3 = v3 != v3
                    n2 = v2 != v2
                    n1 = v1 != v1
                    if n3 | n2 | n1 | (v0 != v0):
                        m = v0 + v1 + v2 + v3
                        i = i3 if n3 else (i2 if n2 else (i1 if n1 else i0))
                    neg = m <= zero  # NaN is not: it stays, with its index
                    yr[c] = zero if neg else m
                    ar[c] = none if neg else i
            continue
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
                        better = (v > yr[c]) | (v != v)
                        yr[c] = v if better else yr[c]
                        ar[c] = idx if better else ar[c]
            for c in range(C):
                m = yr[c]
                neg = m <= zero  # NaN is not: it stays, with its index
                yr[c] = zero if neg else m
                ar[c] = np.int32(-1) if neg else ar[c]


@njit(error_model="numpy", cache=True, fastmath=FASTMATH, parallel=True)
def leaky_relu_maxpool2d_forward(x, slope, y, argmax, pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """y = maxpool(leaky_relu(x)); argmax = index of the first maximum (in the activated
    space) if that input is > 0, else -2 - index; -1 for a window with no real pixel."""
    N, H, W, C = x.shape
    OH = y.shape[1]
    OW = y.shape[2]
    zero = x.dtype.type(0)
    s = x.dtype.type(slope)
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
            xr = x[n, hs, ws]
            first = np.int32(hs * W + ws)
            for c in range(C):
                u = xr[c]
                pos = u > zero
                yr[c] = u if pos else s * u
                ar[c] = first if pos else np.int32(-2) - first
            for ih in range(hs, he):
                for iw in range(ws, we):
                    if ih == hs and iw == ws:
                        continue
                    xr = x[n, ih, iw]
                    idx = np.int32(ih * W + iw)
                    nidx = np.int32(-2) - idx
                    for c in range(C):
                        u = xr[c]
                        pos = u > zero
                        v = u if pos else s * u
                        better = (v > yr[c]) | (v != v)
                        yr[c] = v if better else yr[c]
                        enc = idx if pos else nidx
                        ar[c] = enc if better else ar[c]


@njit(error_model="numpy", cache=True, fastmath=True)
def _row_band(b, band, OH, H, stride_h, pad_top):
    """Output rows [o0, o1) and the input rows [r0, r1) that unit ``b`` owns."""
    o0 = b * band
    o1 = min(o0 + band, OH)
    r0 = 0 if o0 == 0 else min(max(o0 * stride_h - pad_top, 0), H)
    r1 = H if o1 == OH else min(max(o1 * stride_h - pad_top, 0), H)
    return o0, o1, r0, r1


@njit(error_model="numpy", cache=True, fastmath=True, parallel=True)
def maxpool2d_route_backward(dy, argmax, slope, dx, stride_h, pad_top, whole_image):
    """dx (N,H,W,C) overwritten: zero, plus each dy at its argmax (>= 0), plus
    slope * dy at -2 - argmax (argmax <= -2; leaky ReLU). argmax -1: nothing.

    ``whole_image``: windows overlap vertically, so a unit of work is one image;
    else one output row band (its input rows are its own). Zeroing the band
    then scattering (the band stays in L1) measured faster than writing each
    pixel of a 2x2 window with a select.
    """
    N, H, W, C = dx.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    zero = dx.dtype.type(0)
    s = dx.dtype.type(slope)
    band = OH if whole_image else 1
    nb = (OH + band - 1) // band
    dx3 = dx.reshape((N, H * W, C))
    dxf = dx.reshape((N, H * W * C))
    for t in prange(N * nb):
        n = t // nb
        o0, o1, r0, r1 = _row_band(t - n * nb, band, OH, H, stride_h, pad_top)
        seg = dxf[n, r0 * W * C:r1 * W * C]
        for i in range(seg.shape[0]):
            seg[i] = zero
        dxn = dx3[n]
        for oh in range(o0, o1):
            for ow in range(OW):
                dyr = dy[n, oh, ow]
                ar = argmax[n, oh, ow]
                for c in range(C):
                    idx = ar[c]
                    if idx >= 0:
                        dxn[idx, c] += dyr[c]
                    elif idx <= -2:
                        dxn[-2 - idx, c] += s * dyr[c]


# ---------------------------------------------------------------------------
# Batch norm + ReLU (+ max-pool)
# ---------------------------------------------------------------------------

@njit(error_model="numpy", cache=True, fastmath=True, parallel=True)
def batchnorm_stats(x, mean, var):
    """Training statistics of x (M,C): mean and biased variance, exactly as
    norm.batchnorm_forward_train (same chunks, same two passes, same order: the
    same bits).

    invstd = 1/sqrt(var + eps) is left to the caller (NumPy, correctly rounded):
    inside a fastmath kernel LLVM may vectorize a float32 1/sqrt as a hardware
    estimate plus a Newton step, whose last bit depends on how the loop compiled
    (and Numba compiles an @njit helper called from a fastmath kernel with
    fastmath too, whatever its own flags).
    """
    M, C = x.shape
    dt = x.dtype.type
    one = dt(1)
    zero = dt(0)
    inv_m = one / dt(M)
    nchunks = (M + CHUNK - 1) // CHUNK
    part = np.zeros((nchunks, C), dtype=x.dtype)
    for k in prange(nchunks):
        pr = part[k]
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            for c in range(C):
                pr[c] += xr[c]
    _sum_chunks(part, mean, inv_m)
    for k in prange(nchunks):
        pr = part[k]
        for c in range(C):
            pr[c] = zero
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            for c in range(C):
                d = xr[c] - mean[c]
                pr[c] += d * d
    _sum_chunks(part, var, inv_m)


@njit(error_model="numpy", cache=True, fastmath=FASTMATH, inline="always")
def _bn(x, mean, scale, beta):
    # One definition for the forward and the backward mask: the same arithmetic,
    # so the backward's z > 0 agrees with the forward's.
    return (x - mean) * scale + beta


@njit(error_model="numpy", cache=True, fastmath=FASTMATH, parallel=True)
def batchnorm_relu_forward(x, mean, scale, beta, y):
    """y = relu((x - mean) * scale + beta) on (M,C) views (training: batch mean and
    gamma*invstd; evaluation: running mean and gamma / sqrt(running_var + eps))."""
    M, C = x.shape
    zero = x.dtype.type(0)
    nchunks = (M + CHUNK - 1) // CHUNK
    for k in prange(nchunks):
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            yr = y[m]
            for c in range(C):
                z = _bn(xr[c], mean[c], scale[c], beta[c])
                yr[c] = zero if z <= zero else z


@njit(error_model="numpy", cache=True, fastmath=True)
def _dx_coefficients(gamma, invstd, dgamma, dbeta, M, k1, k2, k3):
    """As norm.batchnorm_backward: dx = k1*dyhat - k2 - k3*(x - mean)."""
    dt = gamma.dtype.type
    inv_m = dt(1) / dt(M)
    for c in range(gamma.shape[0]):
        k1[c] = gamma[c] * invstd[c]
        k2[c] = k1[c] * dbeta[c] * inv_m
        k3[c] = k1[c] * invstd[c] * dgamma[c] * inv_m


@njit(error_model="numpy", cache=True, fastmath=FASTMATH, parallel=True)
def batchnorm_relu_backward(x, dy, gamma, mean, scale, beta, invstd, dx, dgamma, dbeta, need_dx):
    """Backward of y = relu(batchnorm(x)) on (M,C) views, batch statistics.

    dyhat = dy where z > 0 (z recomputed from x as in the forward);
    dbeta = sum dyhat; dgamma = invstd * sum dyhat*(x - mean); dx (if need_dx) as
    norm.batchnorm_backward. Two passes over x and dy instead of the unfused three
    (ReLU backward, then both batch-norm passes) and no full-size dyhat array.
    """
    M, C = x.shape
    dt = x.dtype.type
    zero = dt(0)
    one = dt(1)
    nchunks = (M + CHUNK - 1) // CHUNK
    part_b = np.zeros((nchunks, C), dtype=x.dtype)
    part_g = np.zeros((nchunks, C), dtype=x.dtype)
    for k in prange(nchunks):
        pb = part_b[k]
        pg = part_g[k]
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            dyr = dy[m]
            for c in range(C):
                u = xr[c]
                z = _bn(u, mean[c], scale[c], beta[c])
                g = zero if z <= zero else dyr[c]
                pb[c] += g
                pg[c] += g * (u - mean[c])
    _sum_chunks(part_b, dbeta, one)
    _sum_chunks(part_g, dgamma, one)
    for c in range(C):
        dgamma[c] *= invstd[c]
    if not need_dx:
        return
    k1 = np.empty(C, dtype=x.dtype)
    k2 = np.empty(C, dtype=x.dtype)
    k3 = np.empty(C, dtype=x.dtype)
    _dx_coefficients(gamma, invstd, dgamma, dbeta, M, k1, k2, k3)
    for k in prange(nchunks):
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            dyr = dy[m]
            dxr = dx[m]
            for c in range(C):
                u = xr[c]
                z = _bn(u, mean[c], scale[c], beta[c])
                g = zero if z <= zero else dyr[c]
                dxr[c] = k1[c] * g - k2[c] - k3[c] * (u - mean[c])


@njit(error_model="numpy", cache=True, fastmath=FASTMATH, parallel=True)
def batchnorm_relu_maxpool2d_forward(x, mean, scale, beta, y, argmax, xsel, store,
                                     pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """y = maxpool(relu(z)), z = (x - mean) * scale + beta, x (N,H,W,C), y (N,OH,OW,C).

    With ``store`` (training): argmax int32 = flat index ih*W+iw of the first maximum
    of z when it is > 0, else -1; xsel = x - mean at that first maximum (the
    backward reductions read it instead of the full-size x). Without: y only.
    """
    N, H, W, C = x.shape
    OH = y.shape[1]
    OW = y.shape[2]
    zero = x.dtype.type(0)
    none = np.int32(-1)
    fast = _is_2x2(pool_h, pool_w, stride_h, stride_w, pad_top, pad_left)
    for t in prange(N * OH):
        n = t // OH
        oh = t - n * OH
        sn = n if store else 0   # without store, argmax/xsel may be (1,1,1,1) placeholders
        soh = oh if store else 0
        if fast:
            # 2x2 windows, stride 2, no padding: in registers (see relu_maxpool2d_forward).
            for ow in range(OW):
                i0 = np.int32(2 * oh * W + 2 * ow)
                i1 = np.int32(i0 + 1)
                i2 = np.int32(i0 + W)
                i3 = np.int32(i2 + 1)
                x0 = x[n, 2 * oh, 2 * ow]
                x1 = x[n, 2 * oh, 2 * ow + 1]
                x2 = x[n, 2 * oh + 1, 2 * ow]
                x3 = x[n, 2 * oh + 1, 2 * ow + 1]
                yr = y[n, oh, ow]
                if store:
                    ar = argmax[n, oh, ow]
                    sr = xsel[n, oh, ow]
                    for c in range(C):
                        mu = mean[c]
                        sc = scale[c]
                        bt = beta[c]
                        u = x0[c]
                        m = _bn(u, mu, sc, bt)
                        i = i0
                        d = u - mu
                        u = x1[c]
                        v = _bn(u, mu, sc, bt)
                        b = (v > m) | (v != v)
                        m = v if b else m
                        i = i1 if b else i
                        d = u - mu if b else d
                        u = x2[c]
                        v = _bn(u, mu, sc, bt)
                        b = (v > m) | (v != v)
                        m = v if b else m
                        i = i2 if b else i
                        d = u - mu if b else d
                        u = x3[c]
                        v = _bn(u, mu, sc, bt)
                        b = (v > m) | (v != v)
                        m = v if b else m
                        i = i3 if b else i
                        d = u - mu if b else d
                        neg = m <= zero  # NaN is not: it stays, with its index
                        yr[c] = zero if neg else m
                        ar[c] = none if neg else i
                        sr[c] = d
                else:
                    for c in range(C):
                        mu = mean[c]
                        sc = scale[c]
                        bt = beta[c]
                        z0 = _bn(x0[c], mu, sc, bt)
                        z1 = _bn(x1[c], mu, sc, bt)
                        z2 = _bn(x2[c], mu, sc, bt)
                        z3 = _bn(x3[c], mu, sc, bt)
                        m = z1 if z1 > z0 else z0
                        m = z2 if z2 > m else m
                        m = z3 if z3 > m else m
                        # A NaN anywhere in the window: NaN (as torch). One test for the four
                        # (cheaper than one per comparison); the sum is NaN then.
                        isnan = (z0 != z0) | (z1 != z1) | (z2 != z2) | (z3 != z3)
                        m = (z0 + z1 + z2 + z3) if isnan else m
                        yr[c] = zero if m <= zero else m
            continue
        h0 = oh * stride_h - pad_top
        hs = max(h0, 0)
        he = min(h0 + pool_h, H)
        for ow in range(OW):
            w0 = ow * stride_w - pad_left
            ws = max(w0, 0)
            we = min(w0 + pool_w, W)
            yr = y[n, oh, ow]
            sow = ow if store else 0
            ar = argmax[sn, soh, sow]
            sr = xsel[sn, soh, sow]
            if hs >= he or ws >= we:
                for c in range(C):
                    yr[c] = -np.inf
                if store:
                    for c in range(C):
                        ar[c] = -1
                        sr[c] = zero
                continue
            xr = x[n, hs, ws]
            if store:
                first = np.int32(hs * W + ws)
                for c in range(C):
                    d = xr[c] - mean[c]
                    yr[c] = _bn(xr[c], mean[c], scale[c], beta[c])
                    ar[c] = first
                    sr[c] = d
                for ih in range(hs, he):
                    for iw in range(ws, we):
                        if ih == hs and iw == ws:
                            continue
                        xr = x[n, ih, iw]
                        idx = np.int32(ih * W + iw)
                        for c in range(C):
                            u = xr[c]
                            d = u - mean[c]
                            v = _bn(u, mean[c], scale[c], beta[c])
                            better = (v > yr[c]) | (v != v)
                            yr[c] = v if better else yr[c]
                            ar[c] = idx if better else ar[c]
                            sr[c] = d if better else sr[c]
                for c in range(C):
                    m = yr[c]
                    neg = m <= zero  # NaN is not: it stays, with its index
                    yr[c] = zero if neg else m
                    ar[c] = np.int32(-1) if neg else ar[c]
            else:
                for c in range(C):
                    yr[c] = _bn(xr[c], mean[c], scale[c], beta[c])
                for ih in range(hs, he):
                    for iw in range(ws, we):
                        xr = x[n, ih, iw]
                        for c in range(C):
                            v = _bn(xr[c], mean[c], scale[c], beta[c])
                            yr[c] = v if (v > yr[c]) | (v != v) else yr[c]
                for c in range(C):
                    m = yr[c]
                    yr[c] = zero if m <= zero else m


@njit(error_model="numpy", cache=True, fastmath=True, parallel=True)
def pooled_batchnorm_reduce(dy, argmax, xsel, invstd, dgamma, dbeta):
    """Batch-norm reductions from the pooled tensors, (P,C) views (P = N*OH*OW):
    dbeta = sum of dy over windows with a winner (argmax >= 0), dgamma = invstd *
    sum dy * xsel. Equal to the sums over the full-size routed gradient up to the
    order of the terms."""
    P, C = dy.shape
    dt = dy.dtype.type
    zero = dt(0)
    one = dt(1)
    nchunks = (P + CHUNK - 1) // CHUNK
    part_b = np.zeros((nchunks, C), dtype=dy.dtype)
    part_g = np.zeros((nchunks, C), dtype=dy.dtype)
    for k in prange(nchunks):
        pb = part_b[k]
        pg = part_g[k]
        for p in range(k * CHUNK, min((k + 1) * CHUNK, P)):
            dyr = dy[p]
            ar = argmax[p]
            sr = xsel[p]
            for c in range(C):
                g = dyr[c] if ar[c] >= 0 else zero
                pb[c] += g
                pg[c] += g * sr[c]
    _sum_chunks(part_b, dbeta, one)
    _sum_chunks(part_g, dgamma, one)
    for c in range(C):
        dgamma[c] *= invstd[c]


@njit(error_model="numpy", cache=True, fastmath=True, parallel=True)
def batchnorm_relu_maxpool2d_backward_dx(x, dy, argmax, gamma, mean, invstd, dgamma, dbeta, dx,
                                         stride_h, pad_top, whole_image):
    """dx (N,H,W,C) of y = maxpool(relu(batchnorm(x))), dgamma/dbeta from
    pooled_batchnorm_reduce. Per unit (row band or image): dx rows = routed
    gradient (zero + dy at each argmax >= 0), then in place (still in cache)
    dx = k1*dx - k2 - k3*(x - mean), as norm.batchnorm_backward."""
    N, H, W, C = x.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    zero = x.dtype.type(0)
    k1 = np.empty(C, dtype=x.dtype)
    k2 = np.empty(C, dtype=x.dtype)
    k3 = np.empty(C, dtype=x.dtype)
    _dx_coefficients(gamma, invstd, dgamma, dbeta, N * H * W, k1, k2, k3)
    band = OH if whole_image else 1
    nb = (OH + band - 1) // band
    x3 = x.reshape((N, H * W, C))
    dx3 = dx.reshape((N, H * W, C))
    dxf = dx.reshape((N, H * W * C))
    for t in prange(N * nb):
        n = t // nb
        o0, o1, r0, r1 = _row_band(t - n * nb, band, OH, H, stride_h, pad_top)
        seg = dxf[n, r0 * W * C:r1 * W * C]
        for i in range(seg.shape[0]):
            seg[i] = zero
        dxn = dx3[n]
        for oh in range(o0, o1):
            for ow in range(OW):
                dyr = dy[n, oh, ow]
                ar = argmax[n, oh, ow]
                for c in range(C):
                    idx = ar[c]
                    if idx >= 0:
                        dxn[idx, c] += dyr[c]
        xn = x3[n]
        for p in range(r0 * W, r1 * W):
            xr = xn[p]
            dxr = dxn[p]
            for c in range(C):
                dxr[c] = k1[c] * dxr[c] - k2[c] - k3[c] * (xr[c] - mean[c])
