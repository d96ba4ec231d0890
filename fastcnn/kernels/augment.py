"""Data augmentation kernel: random crop with zero padding + horizontal flip.

``crop_flip`` writes, for each sample ``n`` of an NHWC batch, the ``H x W``
window at ``(offsets_y[n], offsets_x[n])`` of the image padded by ``pad``
zero pixels on every side (offsets in ``0 .. 2*pad``; ``pad`` = offset means
no shift), mirrored left-right when ``flips[n]`` is non-zero (crop first,
then flip, as torchvision's RandomCrop + RandomHorizontalFlip). Every output
element is written: zeros where the window reaches into the padding.

Works for float32 and float64; ``x`` and ``out`` are C-contiguous arrays of
the same shape and dtype that do not overlap. The caller (``Augmenter``)
checks shapes and offset ranges.
"""
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def crop_flip(x, out, offsets_y, offsets_x, flips, pad):
    n_batch, h, w, c = x.shape
    wc = w * c
    hwc = h * wc
    zero = x.dtype.type(0)
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for n in prange(n_batch):
        dy = offsets_y[n] - pad          # output row i reads input row i + dy
        dx = offsets_x[n] - pad          # output col j reads input col j + dx (before the flip)
        flip = flips[n] != 0
        # columns j of the (unflipped) crop whose source column j + dx is inside the image
        j0 = max(0, -dx)
        j1 = min(w, w - dx)
        if j1 < j0:
            j1 = j0
        for i in range(h):
            r = i + dy
            ob = n * hwc + i * wc        # output row start
            if r < 0 or r >= h or j0 == j1:
                of[ob:ob + wc] = zero
                continue
            sb = n * hwc + r * wc + dx * c   # source row start, shifted so that column j reads sb + j*c
            if not flip:
                of[ob:ob + j0 * c] = zero
                of[ob + j0 * c:ob + j1 * c] = xf[sb + j0 * c:sb + j1 * c]   # one contiguous run
                of[ob + j1 * c:ob + wc] = zero
            else:
                # output column j holds crop column w-1-j: pixels reversed, channels kept in order
                for j in range(w):
                    jc = w - 1 - j
                    o = ob + j * c
                    if jc < j0 or jc >= j1:
                        for ch in range(c):
                            of[o + ch] = zero
                    else:
                        s = sb + jc * c
                        for ch in range(c):
                            of[o + ch] = xf[s + ch]


def crop_flip_reference(x, offsets_y, offsets_x, flips, pad):
    """The plain NumPy version of :func:`crop_flip` (tests)."""
    import numpy as np

    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(x)
    for s in range(n):
        oy, ox = int(offsets_y[s]), int(offsets_x[s])
        crop = padded[s, oy:oy + h, ox:ox + w, :]
        out[s] = crop[:, ::-1, :] if flips[s] else crop
    return out
