"""The fused blocks' kernels (fastcnn/fusion.py): the layers' passes with other flags.

Each kernel runs in one pass over memory what the unfused layers run in two or
three, with the same source: the max-pool window scan and scatter of
fastcnn/kernels/pool.py, the activation pass and formulas of
fastcnn/kernels/activation.py and the batch-norm statistics, reductions and
input gradient of fastcnn/kernels/norm.py, inlined here with the block's flags
as constants (activation, batch-norm prologue/epilogue, what is stored). So the
results equal those of the layer composition exactly, except the batch-norm
reductions after a max-pool, which add the winners' terms in pooled order:

* ReLU + max-pool: relu of the window's first maximum (relu is monotone); a
  winner <= 0 gets argmax -1 ("route nothing", what the unfused ReLU backward
  would zero), so the backward pass is the MaxPool2D layer's scatter alone
  (pool.maxpool2d_backward; no separate ReLU-backward pass over the full tensor).
* Leaky ReLU + max-pool compares in the activated space too (exact whatever the
  slope) and encodes a winner whose input was <= 0 as ``-2 - index``; its
  gradient gets the slope. Only for windows that do not overlap (then every
  input pixel gets at most one gradient, so ``slope * dy`` equals the unfused
  ``slope * (0 + dy)``).
* Batch norm + ReLU (+ max-pool). The statistics are the BatchNorm layer's
  (BatchNorm.normalization: norm.chunk_sums and chunk_squared_deviations, invstd and scale = gamma *
  invstd correctly rounded, the running statistics), then one pass computing
  ``z = (x - mean) * scale + beta``, ReLU (and the pool, comparing in z-space:
  gamma may be negative). The backward reductions only need the winners: the
  pooled forward stores ``x - mean`` at each window's winner, so they run over
  the pooled tensor; the dx pass rebuilds the routed gradient in cache, one
  image at a time, and applies the batch-norm formula in place.

Arrays are contiguous (the blocks in fastcnn/fusion.py make sure of it);
outputs are allocated by the caller and overwritten. float32 and float64.

Caching note: see fastcnn/kernels/activation.py (after editing this file, clear
the cache of the kernels that compile it in).
"""
from numba import njit

from . import activation as act_
from . import norm, pool
from .activation import FASTMATH, LEAKY, RELU


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def relu_maxpool2d_forward(x, y, argmax, pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """y = maxpool(relu(x)) (N,OH,OW,C); argmax int32 = flat input index ih*W+iw of the
    first maximum when it is > 0, else -1 (a window with no real pixel: y = -inf, -1)."""
    pool.maxpool2d_scan(x, y, argmax, None, (pool_h, pool_w, stride_h, stride_w, pad_top, pad_left), RELU, 0.0,
                        None, None, None, True)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def leaky_relu_maxpool2d_forward(x, slope, y, argmax, pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """y = maxpool(leaky_relu(x)); argmax = index of the first maximum (in the activated
    space) if that input is > 0, else -2 - index; -1 for a window with no real pixel."""
    pool.maxpool2d_scan(x, y, argmax, None, (pool_h, pool_w, stride_h, stride_w, pad_top, pad_left), LEAKY,
                        slope, None, None, None, True)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def leaky_relu_maxpool2d_backward(dy, argmax, slope, dx):
    """dx of y = maxpool(leaky_relu(x)) from the argmax codes of leaky_relu_maxpool2d_forward:
    zero, dy at each code >= 0, slope * dy at -2 - code for each code <= -2."""
    pool.maxpool2d_route(dy, argmax, dx, LEAKY, slope, None, None, None, None, None)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def batchnorm_relu_forward(x, mean, scale, beta, y):
    """y = relu((x - mean) * scale + beta) on (M,C) views (training: batch mean and
    gamma*invstd; evaluation: running mean and gamma / sqrt(running_var + eps))."""
    act_.activation_pass(x, y, RELU, 0.0, mean, scale, beta)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def batchnorm_relu_backward_reduce(x, dy, mean, scale, beta, bounds, part_b, part_g):
    """The batch-norm sums of y = relu(batchnorm(x)) per sample chunk on (M,C) views, batch
    statistics: g = dy through the ReLU at z (recomputed from x as in the forward), part_b[c] = sum g,
    part_g[c] = sum g * (x - mean) over chunk c's rows (norm.reduce_pass)."""
    norm.reduce_pass(x, dy, None, bounds, part_b, part_g, RELU, 0.0, mean, scale, beta)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def batchnorm_relu_backward_dx(x, dy, mean, scale, beta, k1, k2, k3, dx):
    """dx of y = relu(batchnorm(x)) on (M,C) views, the coefficients from norm.dx_coefficients: two
    passes over x and dy in all (with the reduction) instead of the unfused three, and no full-size
    ReLU-gradient array."""
    norm.dx_pass(x, dy, dx, k1, k2, k3, RELU, 0.0, mean, scale, beta)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def batchnorm_relu_maxpool2d_forward(x, mean, scale, beta, y, argmax, xsel, store,
                                     pool_h, pool_w, stride_h, stride_w, pad_top, pad_left):
    """y = maxpool(relu(z)), z = (x - mean) * scale + beta, x (N,H,W,C), y (N,OH,OW,C).

    With ``store`` (training): argmax int32 = flat index ih*W+iw of the first maximum
    of z when it is > 0, else -1; xsel = x - mean at that first maximum (the
    backward reductions read it instead of the full-size x). Without: y only.
    """
    geometry = (pool_h, pool_w, stride_h, stride_w, pad_top, pad_left)
    if store:
        pool.maxpool2d_scan(x, y, argmax, xsel, geometry, RELU, 0.0, mean, scale, beta, True)
    else:
        pool.maxpool2d_scan(x, y, argmax, xsel, geometry, RELU, 0.0, mean, scale, beta, False)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def pooled_batchnorm_reduce(dy, argmax, xsel, bounds, part_b, part_g):
    """The batch-norm sums per sample chunk from the pooled tensors, (P,C) views (P = N*OH*OW, chunk
    c the rows [bounds[c], bounds[c+1])): part_b = sum of dy over windows with a winner (argmax >=
    0), part_g = sum dy * xsel. Equal to the sums over the full-size routed gradient up to the order
    of the terms."""
    norm.reduce_pass(xsel, dy, argmax, bounds, part_b, part_g, RELU, 0.0, None, None, None)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def batchnorm_relu_maxpool2d_backward_dx(x, dy, argmax, mean, k1, k2, k3, dx):
    """dx (N,H,W,C) of y = maxpool(relu(batchnorm(x))), the coefficients from norm.dx_coefficients
    (the sums of pooled_batchnorm_reduce): per image, dx = the routed gradient (the max-pool
    scatter), then in place dx = k1*dx - k2 - k3*(x - mean), the BatchNorm layer's formula."""
    pool.maxpool2d_route(dy, argmax, dx, RELU, 0.0, x, mean, k1, k2, k3)
