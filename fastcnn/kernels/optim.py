"""Optimizer update kernels: one fused pass over a parameter and its state.

Arrays are 1-D contiguous views of one parameter (data, grad, state); scalars
arrive already cast to the parameter's dtype, so float32 stays float32.
PyTorch's update rules (torch.optim.SGD / Adam, weight decay added to the
gradient, PyTorch's semantics).

Determinism whatever the thread count, and whether the kernel was just
compiled or loaded from Numba's cache. Each element's result must not depend
on which code computes it:

* the parallel loops run over fixed blocks of ``BLOCK`` elements (never a
  split that depends on the number of threads), each through views indexed
  from 0 (so LLVM sees non-negative indices and vectorizes the loop);
* no fastmath: with ``fastmath=True`` ('arcp') LLVM lowered the vectorized
  float32 division to an approximate reciprocal (vrcpps + one Newton step)
  while the scalar remainder divided exactly (vdivss), so Adam's update of
  an element changed with the thread count (found as: 1 epoch of
  configs/mnist.yaml, 1 vs 3 threads, 24 of 26 arrays different). Even
  'contract' alone is unsafe: whether ``p * shrink - update`` (AdamW) became
  one FMA depended on how far LLVM optimized the loop, which differs between
  the compiling process (the parfor's gufunc optimized on its own) and a
  process loading the cache (the gufunc optimized again, linked into the
  kernel). Strict IEEE arithmetic leaves LLVM nothing to choose; division
  and sqrt are correctly rounded, as in PyTorch, and the loops still
  vectorize (element-wise: no reassociation needed).

``sum_of_squares`` sums in float64 per fixed chunk, then the chunks in order.
"""
import numpy as np
from numba import njit, prange

# Elements per parallel item (fixed: not derived from the thread count).
BLOCK = 4096


@njit(cache=True, error_model="numpy")
def _block(blk, n):
    """Elements [s, e) of parallel item ``blk`` over n elements: fixed blocks of BLOCK, whatever the threads."""
    s = blk * BLOCK
    return s, min(n, s + BLOCK)


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """p -= lr * d, d from grad + weight decay, momentum buffer, optional Nesterov.

    p, g, buf: (n,). ``first_step``: the momentum buffer is initialized with the gradient.
    With momentum == 0 ``buf`` is untouched.
    """
    one = p.dtype.type(1)
    n = p.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        # Views indexed from 0: LLVM sees non-negative indices and vectorizes.
        s, e = _block(blk, n)
        pb = p[s:e]
        gb = g[s:e]
        bb = buf[s:e]
        for i in range(e - s):
            d = gb[i] + weight_decay * pb[i]
            if momentum != 0:
                if first_step:
                    b = d
                else:
                    b = momentum * bb[i] + (one - dampening) * d
                bb[i] = b
                if nesterov:
                    d = d + momentum * b
                else:
                    d = b
            pb[i] -= lr * d


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def adam_update(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, bias_correction1,
                bias_correction2_sqrt):
    """Adam / AdamW: p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). All arrays (n,).

    decoupled=False (Adam): weight decay is added to the gradient.
    decoupled=True (AdamW): p *= 1 - lr*weight_decay first, the gradient is used as is.
    """
    one = p.dtype.type(1)
    step_size = lr / bias_correction1
    shrink = one - lr * weight_decay
    n = p.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        s, e = _block(blk, n)
        pb = p[s:e]
        gb = g[s:e]
        mb = exp_avg[s:e]
        vb = exp_avg_sq[s:e]
        for i in range(e - s):
            if decoupled:
                pb[i] *= shrink
                d = gb[i]
            else:
                d = gb[i] + weight_decay * pb[i]
            m = beta1 * mb[i] + (one - beta1) * d
            v = beta2 * vb[i] + (one - beta2) * d * d
            mb[i] = m
            vb[i] = v
            pb[i] -= step_size * m / (np.sqrt(v) / bias_correction2_sqrt + eps)


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def sum_of_squares(g):
    """sum(g**2) of a 1-D array, accumulated in float64 in fixed chunks (deterministic)."""
    chunk = BLOCK
    nchunks = (g.size + chunk - 1) // chunk
    partial = np.zeros(nchunks, np.float64)
    for c in prange(nchunks):
        acc = 0.0
        for i in range(c * chunk, min(g.size, (c + 1) * chunk)):
            acc += np.float64(g[i]) * np.float64(g[i])
        partial[c] = acc
    total = 0.0
    for c in range(nchunks):
        total += partial[c]
    return total


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def scale_inplace(g, factor):
    """g *= factor (factor already in g's dtype)."""
    n = g.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        s, e = _block(blk, n)
        gb = g[s:e]
        for i in range(gb.size):
            gb[i] *= factor
