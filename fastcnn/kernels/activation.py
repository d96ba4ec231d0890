"""Element-wise activations: ReLU and leaky ReLU, forward and backward.

Arrays are 1-D contiguous views (layers pass ``.reshape(-1)``); outputs are
allocated by the caller and overwritten. Works for float32 and float64: every
constant is typed from the array's dtype so float32 math stays float32.
"""
from numba import njit, prange


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def relu_forward(x, y):
    """y = max(x, 0)."""
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        v = x[i]
        y[i] = v if v > zero else zero


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def relu_backward(x, dy, dx):
    """dx = dy where x > 0 else 0 (gradient 0 at exactly 0)."""
    zero = dy.dtype.type(0)
    for i in prange(x.shape[0]):
        dx[i] = dy[i] if x[i] > zero else zero


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def leaky_relu_forward(x, slope, y):
    """y = x where x > 0 else slope * x."""
    zero = x.dtype.type(0)
    s = x.dtype.type(slope)
    for i in prange(x.shape[0]):
        v = x[i]
        y[i] = v if v > zero else s * v


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def leaky_relu_backward(x, dy, slope, dx):
    """dx = dy where x > 0 else slope * dy (slope at exactly 0, as PyTorch)."""
    zero = x.dtype.type(0)
    s = dy.dtype.type(slope)
    for i in prange(x.shape[0]):
        g = dy[i]
        dx[i] = g if x[i] > zero else s * g
