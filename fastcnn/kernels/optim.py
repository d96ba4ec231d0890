"""Optimizer update kernels: one fused pass over a parameter and its state.

Arrays are 1-D contiguous views of one parameter (data, grad, state); scalars
arrive already cast to the parameter's dtype, so float32 stays float32.
PyTorch's update rules (torch.optim.SGD / Adam, weight decay added to the
gradient, PyTorch's semantics).
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """p -= lr * d, d from grad + weight decay, momentum buffer, optional Nesterov.

    p, g, buf: (n,). ``first_step``: the momentum buffer is initialized with the gradient.
    With momentum == 0 ``buf`` is untouched.
    """
    one = p.dtype.type(1)
    for i in prange(p.size):
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


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def adam_update(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                bias_correction2_sqrt):
    """Adam (not AdamW): p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). All arrays (n,)."""
    one = p.dtype.type(1)
    step_size = lr / bias_correction1
    for i in prange(p.size):
        d = g[i] + weight_decay * p[i]
        m = beta1 * exp_avg[i] + (one - beta1) * d
        v = beta2 * exp_avg_sq[i] + (one - beta2) * d * d
        exp_avg[i] = m
        exp_avg_sq[i] = v
        p[i] -= step_size * m / (np.sqrt(v) / bias_correction2_sqrt + eps)
