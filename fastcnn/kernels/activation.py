"""Element-wise activations: ReLU and leaky ReLU, forward and backward.

Arrays are 1-D contiguous views (layers pass ``.reshape(-1)``); outputs are
allocated by the caller and overwritten. Works for float32 and float64: every
constant is typed from the array's dtype so float32 math stays float32.

NaN propagates as in PyTorch: relu(NaN) = leaky_relu(NaN) = NaN, and the
backward passes (as torch's, which test the output: NaN <= 0 is false) let the
gradient through at a NaN input (leaky ReLU: times the slope, as torch).
The kernels are compiled with ``FASTMATH`` (fastmath without 'nnan' and 'ninf'):
under 'nnan' LLVM may assume no NaNs and fold the comparison into a max that
returns 0 for NaN.
"""
from numba import njit, prange

# fastmath minus 'nnan' and 'ninf': NaN and infinities keep their IEEE meaning.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # a set (Numba refuses a frozenset)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def relu_forward(x, y):
    """y = max(x, 0); NaN stays NaN (as torch.relu)."""
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        v = x[i]
        y[i] = zero if v <= zero else v


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def relu_backward(x, dy, dx):
    """dx = 0 where x <= 0 else dy (gradient 0 at exactly 0; dy passes at NaN, as torch)."""
    zero = dy.dtype.type(0)
    for i in prange(x.shape[0]):
        dx[i] = zero if x[i] <= zero else dy[i]


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def leaky_relu_forward(x, slope, y):
    """y = x where x > 0 else slope * x (NaN stays NaN)."""
    zero = x.dtype.type(0)
    s = x.dtype.type(slope)
    for i in prange(x.shape[0]):
        v = x[i]
        y[i] = v if v > zero else s * v


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def leaky_relu_backward(x, dy, slope, dx):
    """dx = dy where x > 0 else slope * dy (slope at exactly 0 and at NaN, as PyTorch)."""
    zero = x.dtype.type(0)
    s = dy.dtype.type(slope)
    for i in prange(x.shape[0]):
        g = dy[i]
        dx[i] = g if x[i] > zero else s * g
