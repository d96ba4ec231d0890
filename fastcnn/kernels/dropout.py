"""Inverted dropout with a counter-based mask: forward and backward.

The mask is a pure function of (seed, layer index, step, element index), so
it needs no random state, is the same with any number of threads, and a run
resumed at step s draws exactly the masks an uninterrupted run would.

Mask function (all arithmetic on unsigned 64-bit integers, mod 2**64)::

    mix(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
             z = (z ^ (z >> 27)) * 0x94D049BB133111EB
             return z ^ (z >> 31)                  # the splitmix64 finalizer
    G   = 0x9E3779B97F4A7C15                       # splitmix64's increment
    key = mix(mix(mix(seed) + index) + step)       # one per (seed, layer index, step)
    h_e = mix(key + (e + 1) * G)                   # the (e+1)-th splitmix64 output from state key
    u_e = (h_e >> 40) / 2**24                      # uniform in [0, 1), 24 bits
    keep_e = u_e >= rate  <=>  (h_e >> 40) >= ceil(rate * 2**24)

``e`` is the row-major flat index of the element in the whole (batch, ...)
activation. Kept values are multiplied by ``1 / (1 - rate)`` (in the
activation's dtype), dropped ones set to 0. ``dropout_key`` and
``dropout_threshold`` compute ``key`` and the integer threshold in Python;
fastcnn/kernels/reference.py has the same mask in NumPy.
"""
import math

import numpy as np
from numba import njit, prange

_MASK64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
UNIFORM_BITS = 24

G64 = np.uint64(_G)
M1_64 = np.uint64(_M1)
M2_64 = np.uint64(_M2)


def mix64(z):
    """The splitmix64 finalizer on a Python int (mod 2**64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def dropout_key(seed, index, step):
    """key = mix(mix(mix(seed) + index) + step) mod 2**64, as an np.uint64."""
    k = mix64(int(seed))
    k = mix64(k + int(index))
    k = mix64(k + int(step))
    return np.uint64(k)


def dropout_threshold(rate):
    """The integer t with: keep  <=>  (h >> 40) >= t, i.e. u >= rate for u = (h >> 40) / 2**24."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return np.uint64(math.ceil(rate * (1 << UNIFORM_BITS)))  # rate * 2**24 is exact: ceil is exact


@njit(error_model="numpy", inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * M1_64
    z = (z ^ (z >> np.uint64(27))) * M2_64
    return z ^ (z >> np.uint64(31))


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def dropout_forward(x, key, threshold, scale, y, mask, first=0):
    """x, y (R, W, C); mask uint8 (R, W, C) written: 1 kept, 0 dropped; y = x * scale where kept, else 0.

    R is batch x rows (N*H for an NHWC activation, N for a flat one with W = 1).
    key, threshold: np.uint64 from dropout_key / dropout_threshold; scale in x's dtype.
    ``first``: the flat index e of x's first element in the whole batch (x is the part of a
    batch split over processes that starts there; 0 for a whole batch).
    """
    R, W, C = x.shape
    zero = x.dtype.type(0)
    shift = np.uint64(64 - UNIFORM_BITS)
    one = np.uint64(1)
    for r in prange(R):
        for w in range(W):
            xr = x[r, w]
            yr = y[r, w]
            mr = mask[r, w]
            base = np.uint64(first + (r * W + w) * C) + one  # (e + 1) for c = 0
            for c in range(C):
                h = _mix(key + (base + np.uint64(c)) * G64)
                keep = (h >> shift) >= threshold
                mr[c] = np.uint8(1) if keep else np.uint8(0)
                yr[c] = xr[c] * scale if keep else zero


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def dropout_backward(dy, mask, scale, dx):
    """dx (R, W, C) = dy * scale where the mask kept the element, else 0."""
    R, W, C = dy.shape
    zero = dy.dtype.type(0)
    for r in prange(R):
        for w in range(W):
            dyr = dy[r, w]
            dxr = dx[r, w]
            mr = mask[r, w]
            for c in range(C):
                dxr[c] = dyr[c] * scale if mr[c] != 0 else zero
