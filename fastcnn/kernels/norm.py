"""Batch normalization on 2-D views (M, C): the statistics kernel, and the backward reductions and
input gradient as ``@njit(inline="always")`` passes with an activation flag, shared by the
BatchNorm layer (its kernels below: flags off) and the fused batch norm + ReLU (+ max-pool) blocks
(fastcnn/kernels/fused.py), which inline them with their flags as constants.

After a conv layer the NHWC tensor is viewed as (N*H*W, C); after a dense
layer M = N. The normalize pass is activation.activation_pass (the affine map,
then the activation flag); with pooling, the max-pool scan applies the same
affine map before comparing (pool.maxpool2d_scan) and the max-pool scatter
applies dx_rows after routing (pool.maxpool2d_route). The running statistics
are updated by the layer (fastcnn/layers/batchnorm.py, BatchNorm.normalization,
which the fused blocks call too).

invstd = 1/sqrt(var + eps) is computed by the caller in NumPy, correctly rounded
(fastcnn/layers/batchnorm.py, invstd_and_scale): inside a fastmath kernel LLVM
may vectorize a float32 1/sqrt as a hardware estimate plus a Newton step, whose
last bit depends on how the loop compiled.

Reductions over M are computed per fixed-size chunk of rows into a partial
buffer (each parallel iteration owns its row of the buffer), then summed over
chunks in a fixed order: deterministic whatever the thread count, and more
accurate than one long running sum.

Caching note: see fastcnn/kernels/activation.py (after editing this file, clear
the cache of the kernels that compile it in).
"""
import numpy as np
from numba import njit, prange

from . import activation as act_
from .activation import FASTMATH, NONE

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
def batchnorm_stats(x, mean, var):
    """Training statistics of x (M, C): mean and biased variance, two passes (mean, then squared
    deviations: accurate in float32 even with a large mean)."""
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


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def centered(u, c, mean):
    """u - mean[c]; u itself when ``mean`` is None (u already centered: the pooled x - mean)."""
    return u if mean is None else u - mean[c]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def reduce_pass(x, dy, routed, invstd, dgamma, dbeta, act, slope, mean, scale, beta):
    """dbeta = sum g, dgamma = invstd * sum g * (x - mean) over the rows of (P, C) views (inlined, ``act``
    constant).

    Without ``routed``: g = dy through the activation ``act`` (NONE: the BatchNorm layer; RELU: the
    fused batch norm + ReLU block) at z = (x - mean) * scale + beta, recomputed as in the forward
    (``scale``, ``beta`` only needed with an activation). With ``routed`` (the fused block with
    max-pool): x, dy, routed are the pooled tensors, x holding x - mean at each window's winner
    (``mean`` None) and routed the argmax codes: g = dy where routed >= 0, else 0 (the sums over the
    full-size routed gradient, up to the order of the terms).
    """
    P, C = x.shape
    dt = x.dtype.type
    zero = dt(0)
    s = dt(slope)
    nchunks = (P + CHUNK - 1) // CHUNK
    part_b = np.zeros((nchunks, C), dtype=x.dtype)
    part_g = np.zeros((nchunks, C), dtype=x.dtype)
    for k in prange(nchunks):
        pb = part_b[k]
        pg = part_g[k]
        for m in range(k * CHUNK, min((k + 1) * CHUNK, P)):
            xr = x[m]
            dyr = dy[m]
            for c in range(C):
                u = xr[c]
                if routed is None:
                    g = act_.activation_grad(act_.prologue(u, c, mean, scale, beta), dyr[c], act, s, zero)
                else:
                    g = dyr[c] if routed[m, c] >= 0 else zero
                pb[c] += g
                pg[c] += g * centered(u, c, mean)
    _sum_chunks(part_b, dbeta, dt(1))
    _sum_chunks(part_g, dgamma, dt(1))
    for c in range(C):
        dgamma[c] *= invstd[c]


@njit(cache=True, fastmath=True, error_model="numpy")
def dx_coefficients(gamma, invstd, dgamma, dbeta, M):
    """(k1, k2, k3) with dx = k1 * g - k2 - k3 * (x - mean), the batch-norm input gradient
    gamma*invstd/M * (M*g - dbeta - xhat*dgamma/invstd) (dgamma as reduce_pass leaves it)."""
    dt = gamma.dtype.type
    inv_m = dt(1) / dt(M)
    C = gamma.shape[0]
    k1 = np.empty(C, dtype=gamma.dtype)
    k2 = np.empty(C, dtype=gamma.dtype)
    k3 = np.empty(C, dtype=gamma.dtype)
    for c in range(C):
        k1[c] = gamma[c] * invstd[c]
        k2[c] = k1[c] * dbeta[c] * inv_m
        k3[c] = k1[c] * invstd[c] * dgamma[c] * inv_m
    return k1, k2, k3


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def dx_rows(x, g, dx, k1, k2, k3, act, s, zero, mean, scale, beta):
    """dx = k1 * g' - k2 - k3 * (x - mean) over the rows of (P, C) views, g' = g through the activation
    at z = affine(x) (act NONE: g itself). ``g`` may be ``dx`` (in place)."""
    for m in range(x.shape[0]):
        xr = x[m]
        gr = g[m]
        dxr = dx[m]
        for c in range(xr.shape[0]):
            u = xr[c]
            gg = act_.activation_grad(act_.prologue(u, c, mean, scale, beta), gr[c], act, s, zero)
            dxr[c] = k1[c] * gg - k2[c] - k3[c] * (u - mean[c])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def dx_pass(x, dy, gamma, invstd, dgamma, dbeta, dx, act, slope, mean, scale, beta):
    """dx of the training batch norm (then ``act``) on (M, C) views, given dgamma and dbeta from
    reduce_pass (inlined, ``act`` constant). With max-pool, pool.maxpool2d_route applies dx_rows
    after its scatter instead."""
    M = x.shape[0]
    dt = x.dtype.type
    k1, k2, k3 = dx_coefficients(gamma, invstd, dgamma, dbeta, M)
    nchunks = (M + CHUNK - 1) // CHUNK
    for k in prange(nchunks):
        m0 = k * CHUNK
        m1 = min(m0 + CHUNK, M)
        dx_rows(x[m0:m1], dy[m0:m1], dx[m0:m1], k1, k2, k3, act, dt(slope), dt(0), mean, scale, beta)


# The BatchNorm layer's kernels (the fused blocks': fastcnn/kernels/fused.py).

@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def batchnorm_forward(x, mean, scale, beta, y):
    """y = (x - mean) * scale + beta on (M, C) views: training (batch mean, scale = gamma * invstd) and
    evaluation (running mean, scale = gamma / sqrt(running_var + eps))."""
    act_.activation_pass(x, y, NONE, 0.0, mean, scale, beta)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def batchnorm_backward(x, dy, gamma, mean, invstd, dx, dgamma, dbeta):
    """Training backward (batch statistics) on (M, C) views.

    dbeta = sum dy; dgamma = sum dy*xhat;
    dx = gamma*invstd/M * (M*dy - dbeta - xhat*dgamma), xhat = (x-mean)*invstd.
    """
    reduce_pass(x, dy, None, invstd, dgamma, dbeta, NONE, 0.0, mean, None, None)
    dx_pass(x, dy, gamma, invstd, dgamma, dbeta, dx, NONE, 0.0, mean, None, None)
