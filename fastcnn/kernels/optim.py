"""Optimizer update kernels: one fused pass over a parameter and its state.

Arrays are 1-D contiguous views of one parameter (data, grad, state); scalars
arrive already cast to the parameter's dtype, so float32 stays float32.
PyTorch's update rules (torch.optim.SGD / Adam, weight decay added to the
gradient, PyTorch's semantics).

Determinism whatever the thread count. Each element's result must not depend
on which code path computes it, and the paths (LLVM's vectorized loop body
and its scalar remainder) sit at the edges of whatever range a thread gets:

* the parallel loops run over fixed blocks of ``BLOCK`` elements (never a
  split that depends on the number of threads), so an element is in the
  vector body or the remainder of its block independently of the threads;
* ``FASTMATH`` allows only FMA contraction: with ``fastmath=True`` ('arcp',
  'afn') LLVM lowers a vectorized float32 division to an approximate
  reciprocal (vrcpps + one Newton step) while the scalar remainder divides
  exactly (vdivss), so Adam's update of one element changed with the thread
  count (found as: 1 epoch of configs/mnist.yaml, 1 vs 3 threads, 24 of 26
  arrays different). Division and sqrt stay IEEE (correctly rounded), as in
  PyTorch.
"""
import numpy as np
from numba import njit, prange

# Elements per parallel item (fixed: not derived from the thread count).
BLOCK = 4096
# FMA contraction only: no approximate reciprocal / sqrt, NaN and Inf keep their IEEE meaning.
FASTMATH = {"contract"}  # a set (Numba refuses a frozenset)


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """p -= lr * d, d from grad + weight decay, momentum buffer, optional Nesterov.

    p, g, buf: (n,). ``first_step``: the momentum buffer is initialized with the gradient.
    With momentum == 0 ``buf`` is untouched.
    """
    one = p.dtype.type(1)
    n = p.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for i in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            d = g[i] + weight_decay * p[i]
            if momentum != 0:
                if first_step:
                    b = d
                else:
                    b = momentum * buf[i] + (one - dampening) * d
                buf[i] = b
                if nesterov:
                    d = d + momentum * b
                else:
                    d = b
            p[i] -= lr * d


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
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
        for i in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            if decoupled:
                p[i] *= shrink
                d = g[i]
            else:
                d = g[i] + weight_decay * p[i]
            m = beta1 * exp_avg[i] + (one - beta1) * d
            v = beta2 * exp_avg_sq[i] + (one - beta2) * d * d
            exp_avg[i] = m
            exp_avg_sq[i] = v
            p[i] -= step_size * m / (np.sqrt(v) / bias_correction2_sqrt + eps)


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


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def scale_inplace(g, factor):
    """g *= factor (factor already in g's dtype)."""
    n = g.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for i in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            g[i] *= factor
