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

Reductions over M are computed per sample chunk (fastcnn/shard.py: the rows
[bounds[g], bounds[g+1]) of chunk g's samples), each in blocks of CHUNK rows
(each parallel iteration owns its block's row of a partial buffer) added in
block order; the layer adds the chunks in chunk order, over every process.
Deterministic whatever the thread count and the number of processes, and more
accurate than one long running sum.

Caching note: see fastcnn/kernels/activation.py (after editing this file, clear
the cache of the kernels that compile it in).
"""
import numpy as np
from numba import njit, prange

from . import activation as act_
from .activation import FASTMATH, NONE

# Rows per block of a partial sum. Fixed (not derived from the thread count) so results do not
# depend on how many threads run.
CHUNK = 256


@njit(cache=True, error_model="numpy")
def block_layout(bounds):
    """Blocks of at most CHUNK rows that never cross a sample chunk's rows [bounds[c], bounds[c+1]):
    (start, stop) of each block and ``first`` (G + 1): chunk c's blocks are first[c]:first[c+1]."""
    G = bounds.shape[0] - 1
    nb = 0
    for c in range(G):
        nb += (bounds[c + 1] - bounds[c] + CHUNK - 1) // CHUNK
    start = np.empty(nb, np.int64)
    stop = np.empty(nb, np.int64)
    first = np.empty(G + 1, np.int64)
    k = 0
    for c in range(G):
        first[c] = k
        m = bounds[c]
        while m < bounds[c + 1]:
            start[k] = m
            stop[k] = min(m + CHUNK, bounds[c + 1])
            k += 1
            m += CHUNK
    first[G] = k
    return start, stop, first


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _fold_blocks(part, first, out):
    """out[c] = sum of the blocks' partials part[first[c]:first[c+1]], in block order (0 for none)."""
    G, C = out.shape
    for g in range(G):
        og = out[g]
        for c in range(C):
            og[c] = part[first[g], c] if first[g + 1] > first[g] else part.dtype.type(0)
        for k in range(first[g] + 1, first[g + 1]):
            pk = part[k]
            for c in range(C):
                og[c] += pk[c]


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def chunk_sums(x, bounds, out):
    """out (G, C) = per sample chunk, the sum of the rows [bounds[g], bounds[g+1]) of x (M, C): the
    first pass of the batch statistics (fastcnn/shard.py adds the chunks in order)."""
    start, stop, first = block_layout(bounds)
    part = np.zeros((start.shape[0], x.shape[1]), dtype=x.dtype)
    for k in prange(start.shape[0]):
        pr = part[k]
        for m in range(start[k], stop[k]):
            xr = x[m]
            for c in range(xr.shape[0]):
                pr[c] += xr[c]
    _fold_blocks(part, first, out)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def chunk_squared_deviations(x, mean, bounds, out):
    """out (G, C) = per sample chunk, the sum of (x - mean)**2 over its rows: the second pass of the
    batch statistics (two passes: accurate in float32 even with a large mean)."""
    start, stop, first = block_layout(bounds)
    part = np.zeros((start.shape[0], x.shape[1]), dtype=x.dtype)
    for k in prange(start.shape[0]):
        pr = part[k]
        for m in range(start[k], stop[k]):
            xr = x[m]
            for c in range(xr.shape[0]):
                d = xr[c] - mean[c]
                pr[c] += d * d
    _fold_blocks(part, first, out)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def centered(u, c, mean):
    """u - mean[c]; u itself when ``mean`` is None (u already centered: the pooled x - mean)."""
    return u if mean is None else u - mean[c]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def reduce_pass(x, dy, routed, bounds, part_b, part_g, act, slope, mean, scale, beta):
    """Per sample chunk g (rows [bounds[g], bounds[g+1]) of the (P, C) views): part_b[g] = sum of g,
    part_g[g] = sum of g * (x - mean) (inlined, ``act`` constant). The caller adds the chunks in
    order (fastcnn/shard.py): dbeta = sum part_b, dgamma = invstd * sum part_g.

    Without ``routed``: g = dy through the activation ``act`` (NONE: the BatchNorm layer; RELU: the
    fused batch norm + ReLU block) at z = (x - mean) * scale + beta, recomputed as in the forward
    (``scale``, ``beta`` only needed with an activation). With ``routed`` (the fused block with
    max-pool): x, dy, routed are the pooled tensors, x holding x - mean at each window's winner
    (``mean`` None) and routed the argmax codes: g = dy where routed >= 0, else 0 (the sums over the
    full-size routed gradient, up to the order of the terms).
    """
    C = x.shape[1]
    dt = x.dtype.type
    zero = dt(0)
    s = dt(slope)
    start, stop, first = block_layout(bounds)
    nblocks = start.shape[0]
    blk_b = np.zeros((nblocks, C), dtype=x.dtype)
    blk_g = np.zeros((nblocks, C), dtype=x.dtype)
    for k in prange(nblocks):
        pb = blk_b[k]
        pg = blk_g[k]
        for m in range(start[k], stop[k]):
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
    _fold_blocks(blk_b, first, part_b)
    _fold_blocks(blk_g, first, part_g)


@njit(cache=True, fastmath=True, error_model="numpy")
def dx_coefficients(gamma, invstd, dgamma, dbeta, M):
    """(k1, k2, k3) with dx = k1 * g - k2 - k3 * (x - mean), the batch-norm input gradient
    gamma*invstd/M * (M*g - dbeta - xhat*dgamma/invstd) (dgamma = invstd * sum g * (x - mean);
    M the rows of the whole batch, over every process)."""
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
def dx_pass(x, dy, dx, k1, k2, k3, act, slope, mean, scale, beta):
    """dx of the training batch norm (then ``act``) on (M, C) views, dx = k1 * g - k2 - k3 * (x - mean)
    with the coefficients of dx_coefficients (inlined, ``act`` constant). With max-pool,
    pool.maxpool2d_route applies dx_rows after its scatter instead."""
    M = x.shape[0]
    dt = x.dtype.type
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
def batchnorm_backward_reduce(x, dy, mean, bounds, part_b, part_g):
    """Training backward sums per sample chunk on (M, C) views: part_b[g] = sum dy, part_g[g] =
    sum dy * (x - mean) over chunk g's rows [bounds[g], bounds[g+1])."""
    reduce_pass(x, dy, None, bounds, part_b, part_g, NONE, 0.0, mean, None, None)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def batchnorm_backward_dx(x, dy, mean, k1, k2, k3, dx):
    """Training input gradient on (M, C) views: dx = k1 * dy - k2 - k3 * (x - mean), the coefficients
    from dx_coefficients (gamma*invstd/M * (M*dy - dbeta - xhat*dgamma), xhat = (x-mean)*invstd)."""
    dx_pass(x, dy, dx, k1, k2, k3, NONE, 0.0, mean, None, None)
