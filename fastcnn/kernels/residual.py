"""The residual block's own element-wise passes: the add (+ ReLU) forward and its backward.

A block computes ``y = relu(b + s)`` (or ``b + s`` with ``activation: none``) from its two
branches' outputs; each pass below reads its inputs and writes its output once:

* ``add_relu_forward(a, b, out)``: ``out = relu(a + b)``, one pass (the add and the ReLU unfused
  would be two: the sum written, then read back and written again).
* ``add_forward(a, b, out)``: ``out = a + b`` (the block without activation, and the input
  gradient of the first copy: ``dx = dx_body + dx_shortcut``).
* ``relu_mask_backward(y, dy, out)``: ``out = 0 where y <= 0 else dy``: the gradient through the
  block's ReLU, read from the block's output ``y`` (``y <= 0`` exactly where the sum was ``<= 0``).
* ``add_relu_mask_backward(a, b, y, out)``: ``out = 0 where y <= 0 else a + b``: between two copies
  of a repeated block, copy r's input gradient ``dx_body + dx_shortcut`` is at once masked by copy
  r-1's ReLU, the gradient copy r-1's branches receive: one pass instead of two.

Each output element is one float addition (or none) of the same two operands as the unfused NumPy
computation (``np.add`` then a ReLU or mask), so the results are bit-identical to it, and the same
for any number of threads (no element depends on how the work is split; the prange runs over
fixed chunks of ``CHUNK`` elements). No fastmath: every operation keeps its IEEE meaning.

NaN as PyTorch: relu(NaN) = NaN (``NaN <= 0`` is false: the value passes); the gradient passes
where the output is NaN (torch's ``threshold_backward`` tests ``y <= 0`` the same way); 0 at exactly
0. Works for float32 and float64 (every constant typed from the array's dtype: float32 math stays
float32). Arrays are contiguous, of equal size and dtype (any shapes: they are read flat); outputs
are allocated by the caller and overwritten; an output may be one of the inputs (element-wise).

The ``*_reference`` functions are the same maps in NumPy (the unfused computation), for the tests.
Under ``NUMBA_DISABLE_JIT=1`` the kernels run as Python loops with the same results.
"""
import numpy as np
from numba import njit, prange

CHUNK = 16384  # elements per work item (64 KiB of float32 per array)


# What ``_add_then_mask`` zeroes: nothing, where its result is <= 0 (a ReLU), or where ``y`` is <= 0.
_KEEP, _RELU, _MASK_BY_Y = 0, 1, 2


@njit(cache=True, error_model="numpy", parallel=True)
def _add_then_mask(a, b, y, out, add, mask):
    """out = (a + b if add else a), then 0 where ``mask`` says: the one pass behind the four kernels below.

    The flags are the same for every element (LLVM hoists the branches out of the loop).
    """
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    yf = y.reshape(y.size)
    of = out.reshape(out.size)
    n = af.shape[0]
    zero = of.dtype.type(0)
    for k in prange((n + CHUNK - 1) // CHUNK):
        for i in range(k * CHUNK, min((k + 1) * CHUNK, n)):
            z = af[i] + bf[i] if add else af[i]
            if mask == _RELU:
                z = zero if z <= zero else z
            elif mask == _MASK_BY_Y:
                z = zero if yf[i] <= zero else z
            of[i] = z


def add_relu_forward(a, b, out):
    """out = relu(a + b), one pass; NaN stays NaN."""
    _add_then_mask(a, b, a, out, True, _RELU)


def add_forward(a, b, out):
    """out = a + b, one pass."""
    _add_then_mask(a, b, a, out, True, _KEEP)


def relu_mask_backward(y, dy, out):
    """out = 0 where y <= 0 else dy (y: the ReLU's output; dy passes where y is NaN)."""
    _add_then_mask(dy, dy, y, out, False, _MASK_BY_Y)


def add_relu_mask_backward(a, b, y, out):
    """out = 0 where y <= 0 else a + b, one pass (the add, then the ReLU gradient at output y)."""
    _add_then_mask(a, b, y, out, True, _MASK_BY_Y)


# -- NumPy references: the unfused computation --------------------------------------------------------

def add_relu_forward_reference(a, b):
    z = np.add(a, b)
    return np.where(z <= 0, z.dtype.type(0), z)  # keeps NaN (np.maximum would too; this is torch's rule)


def add_forward_reference(a, b):
    return np.add(a, b)


def relu_mask_backward_reference(y, dy):
    return np.where(y <= 0, dy.dtype.type(0), dy)


def add_relu_mask_backward_reference(a, b, y):
    return relu_mask_backward_reference(y, np.add(a, b))
