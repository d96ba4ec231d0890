"""Element-wise maps: the activations (ReLU, leaky ReLU) and batch norm's affine map, one home each.

The scalar formulas are ``@njit(inline="always")`` helpers used by every kernel
that applies them: the activation pass below, the max-pool window scan
(fastcnn/kernels/pool.py) and the batch-norm backward (fastcnn/kernels/norm.py).
The activation is a flag (``NONE``, ``RELU``, ``LEAKY``) that each kernel passes
as a constant, so every kernel compiles a loop specialized for its activation:
a layer's kernel and a fused block's kernel run the same source with other flags.

Arrays are contiguous; outputs are allocated by the caller and overwritten.
Works for float32 and float64: every constant is typed from the array's dtype so
float32 math stays float32.

NaN propagates as in PyTorch: relu(NaN) = leaky_relu(NaN) = NaN, and the
backward passes (as torch's, which test the output: NaN <= 0 is false) let the
gradient through at a NaN input (leaky ReLU: times the slope, as torch).
The kernels are compiled with ``FASTMATH`` (fastmath without 'nnan' and 'ninf'):
under 'nnan' LLVM may assume no NaNs and fold the comparison into a max that
returns 0 for NaN.

Caching note: Numba's cache of a kernel is invalidated when the kernel's own
source file changes, not when a module whose functions it inlines or calls
does; the kernels of norm.py, pool.py and fused.py compile in code of
activation.py, norm.py and pool.py, so after editing one of these files clear
their cache (``fastcnn/kernels/__pycache__/{activation,norm,pool,fused}.*``).
"""
from numba import njit, prange

# fastmath minus 'nnan' and 'ninf': NaN and infinities keep their IEEE meaning.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # a set (Numba refuses a frozenset)

ROWS = 256  # rows per work item of the batch-norm pass

# Activation flags.
NONE = 0
RELU = 1
LEAKY = 2


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def passes(z, act, zero):
    """Whether the activation is the identity at its input z: ReLU where not z <= 0 (NaN passes, as
    torch), leaky ReLU where z > 0 (at 0 and at NaN the slope applies, as torch); NONE everywhere."""
    if act == RELU:
        return not z <= zero
    if act == LEAKY:
        return z > zero
    return True


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def off(v, act, s, zero):
    """What the activation makes of v (its input, or a gradient) where it does not pass: 0 (ReLU),
    s * v (leaky ReLU)."""
    return zero if act == RELU else s * v


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def activate(z, act, s, zero):
    """The activation of z: relu(z) = max(z, 0) (NaN stays), leaky_relu(z) = z or s * z; NONE: z."""
    return z if passes(z, act, zero) else off(z, act, s, zero)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def activation_grad(z, g, act, s, zero):
    """The gradient g through the activation at its input z: g where it passes, else 0 (ReLU: 0 at
    exactly 0) or s * g (leaky ReLU), as PyTorch."""
    return g if passes(z, act, zero) else off(g, act, s, zero)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def affine(u, mean, scale, beta):
    """Batch norm's normalize, scale and shift of one value: (u - mean) * scale + beta, scale = gamma * invstd.

    The one definition for the forward passes and the backward masks, so that a
    backward's z > 0 agrees with its forward's."""
    return (u - mean) * scale + beta


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def prologue(u, c, mean, scale, beta):
    """u in channel c, or its batch-norm affine map when ``scale`` is an array (None: off)."""
    return u if scale is None else affine(u, mean[c], scale[c], beta[c])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def activation_pass(x, y, act, slope, mean, scale, beta):
    """y = act(z), z = x, or with ``scale`` an array z = (x - mean) * scale + beta on (M, C) views.

    Inlined into each kernel that runs it, with ``act`` constant: the ReLU and leaky ReLU layers (no
    batch norm: any shape), the batch-norm layer (norm.batchnorm_forward, act NONE) and the fused
    batch norm + ReLU block (fused.batchnorm_relu_forward). An element-wise pass: how the work is
    split does not change a bit.
    """
    zero = x.dtype.type(0)
    s = x.dtype.type(slope)
    if scale is None:  # element-wise over the flat arrays
        xf = x.reshape(x.size)
        yf = y.reshape(y.size)
        for i in prange(xf.shape[0]):
            yf[i] = activate(xf[i], act, s, zero)
    else:
        M = x.shape[0]
        for k in prange((M + ROWS - 1) // ROWS):
            for m in range(k * ROWS, min((k + 1) * ROWS, M)):
                xr = x[m]
                yr = y[m]
                for c in range(xr.shape[0]):
                    yr[c] = activate(affine(xr[c], mean[c], scale[c], beta[c]), act, s, zero)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def activation_grad_pass(x, dy, dx, act, slope):
    """dx = dy through the activation at x (any shape), ``act`` constant."""
    zero = dy.dtype.type(0)
    s = dy.dtype.type(slope)
    xf = x.reshape(x.size)
    gf = dy.reshape(dy.size)
    df = dx.reshape(dx.size)
    for i in prange(xf.shape[0]):
        df[i] = activation_grad(xf[i], gf[i], act, s, zero)


# The layers' kernels: the passes above with their flags.

@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def relu_forward(x, y):
    """y = max(x, 0); NaN stays NaN (as torch.relu)."""
    activation_pass(x, y, RELU, 0.0, None, None, None)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def relu_backward(x, dy, dx):
    """dx = 0 where x <= 0 else dy (gradient 0 at exactly 0; dy passes at NaN, as torch)."""
    activation_grad_pass(x, dy, dx, RELU, 0.0)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def leaky_relu_forward(x, slope, y):
    """y = x where x > 0 else slope * x (NaN stays NaN)."""
    activation_pass(x, y, LEAKY, slope, None, None, None)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def leaky_relu_backward(x, dy, slope, dx):
    """dx = dy where x > 0 else slope * dy (slope at exactly 0 and at NaN, as PyTorch)."""
    activation_grad_pass(x, dy, dx, LEAKY, slope)
