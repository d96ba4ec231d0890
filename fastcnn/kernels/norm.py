"""Batch normalization on a 2-D view (M, C), forward (train/eval) and backward.

After a conv layer the NHWC tensor is viewed as (N*H*W, C); after a dense
layer M = N. Reductions over M are computed per fixed-size chunk of rows into
a partial buffer (each parallel iteration owns its row of the buffer), then
summed over chunks in a fixed order: deterministic whatever the thread count,
and more accurate than one long running sum.
"""
import numpy as np
from numba import njit, prange

# Rows per partial sum. Fixed (not derived from the thread count) so results
# do not depend on how many threads run.
CHUNK = 256


@njit(cache=True, fastmath=True, error_model="numpy")
def _sum_chunks(part, out, scale):
    """out[c] = scale * sum_k part[k, c], summed in chunk order."""
    nchunks, C = part.shape
    for c in range(C):
        out[c] = part[0, c] if nchunks > 0 else part.dtype.type(0)
    for k in range(1, nchunks):
        pr = part[k]
        for c in range(C):
            out[c] += pr[c]
    for c in range(C):
        out[c] *= scale


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def batchnorm_forward_train(x, gamma, beta, eps, y, mean, var, invstd):
    """Training forward: batch statistics.

    Writes y (M,C), mean (C,), var (C,) = biased batch variance and
    invstd = 1/sqrt(var + eps). Two passes (mean, then squared deviations).
    """
    M, C = x.shape
    dt = x.dtype.type
    e = dt(eps)
    one = dt(1)
    zero = dt(0)
    inv_m = one / dt(M)
    nchunks = (M + CHUNK - 1) // CHUNK
    part = np.zeros((nchunks, C), dtype=x.dtype)

    # Pass 1: mean.
    for k in prange(nchunks):
        pr = part[k]
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            for c in range(C):
                pr[c] += xr[c]
    _sum_chunks(part, mean, inv_m)

    # Pass 2: biased variance from squared deviations.
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

    scale = np.empty(C, dtype=x.dtype)
    for c in range(C):
        invstd[c] = one / np.sqrt(var[c] + e)
        scale[c] = gamma[c] * invstd[c]

    # Pass 3: normalize, scale, shift.
    for k in prange(nchunks):
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            yr = y[m]
            for c in range(C):
                yr[c] = (xr[c] - mean[c]) * scale[c] + beta[c]


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps, y):
    """Evaluation forward with the running statistics."""
    M, C = x.shape
    dt = x.dtype.type
    e = dt(eps)
    one = dt(1)
    scale = np.empty(C, dtype=x.dtype)
    for c in range(C):
        scale[c] = gamma[c] * (one / np.sqrt(running_var[c] + e))
    nchunks = (M + CHUNK - 1) // CHUNK
    for k in prange(nchunks):
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            yr = y[m]
            for c in range(C):
                yr[c] = (xr[c] - running_mean[c]) * scale[c] + beta[c]


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def batchnorm_backward(x, dy, gamma, mean, invstd, dx, dgamma, dbeta):
    """Training backward (batch statistics).

    dbeta = sum dy; dgamma = sum dy*xhat;
    dx = gamma*invstd/M * (M*dy - dbeta - xhat*dgamma), xhat = (x-mean)*invstd.
    """
    M, C = x.shape
    dt = x.dtype.type
    one = dt(1)
    inv_m = one / dt(M)
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
                g = dyr[c]
                pb[c] += g
                pg[c] += g * (xr[c] - mean[c])
    _sum_chunks(part_b, dbeta, one)
    _sum_chunks(part_g, dgamma, one)
    k1 = np.empty(C, dtype=x.dtype)
    k2 = np.empty(C, dtype=x.dtype)
    k3 = np.empty(C, dtype=x.dtype)
    for c in range(C):
        dgamma[c] *= invstd[c]
        k1[c] = gamma[c] * invstd[c]
        k2[c] = k1[c] * dbeta[c] * inv_m
        k3[c] = k1[c] * invstd[c] * dgamma[c] * inv_m
    # dx = k1*dy - k2 - k3*(x - mean)
    for k in prange(nchunks):
        for m in range(k * CHUNK, min((k + 1) * CHUNK, M)):
            xr = x[m]
            dyr = dy[m]
            dxr = dx[m]
            for c in range(C):
                dxr[c] = k1[c] * dyr[c] - k2[c] - k3[c] * (xr[c] - mean[c])
