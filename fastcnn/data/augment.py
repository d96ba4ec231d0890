"""Training-data augmentation: random crop with zero padding, random horizontal flip.

The random choices for a batch are a pure function of ``(seed, epoch,
batch_index)`` (``np.random.default_rng([seed, epoch, batch_index, 1])``),
so a resumed run augments its remaining batches exactly as the interrupted
run would have: no RNG state to save. Only training batches are augmented,
never validation or test data.

Images are already normalized when they are augmented, so the padding is 0
in normalized units: the dataset's mean colour, not black.

>>> aug = Augmenter(crop_padding=4, horizontal_flip=True, seed=0)
>>> for i, (xb, yb) in enumerate(loader.epoch_batches(epoch)):
...     xb = aug.apply(xb, epoch, i)          # a reused buffer: valid until the next call
"""
import numpy as np

__all__ = ["Augmenter", "AUGMENT_KEYS"]

AUGMENT_KEYS = ("crop_padding", "horizontal_flip")


class Augmenter:
    """Random crop (``crop_padding`` pixels of zero padding, then an HxW crop) and flip.

    ``apply(xb, epoch, batch_index, out=None)`` returns the augmented batch in
    ``out`` (or in a buffer the Augmenter keeps and reuses, when ``out`` is
    None). With neither augmentation enabled it returns ``xb`` itself (or a
    copy in ``out``).
    """

    def __init__(self, crop_padding=0, horizontal_flip=False, seed=0):
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {crop_padding!r}")
        if not isinstance(horizontal_flip, (bool, np.bool_)):
            raise ValueError(f"horizontal_flip must be true or false, got {horizontal_flip!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.seed = int(seed)
        self._buffer = None

    @property
    def enabled(self):
        return self.crop_padding > 0 or self.horizontal_flip

    def __repr__(self):
        return (f"Augmenter(crop_padding={self.crop_padding}, horizontal_flip={self.horizontal_flip}, "
                f"seed={self.seed})")

    def choices(self, n, epoch, batch_index):
        """``(offsets_y, offsets_x, flips)`` for a batch of ``n``: int64, int64, uint8 arrays."""
        if int(epoch) < 0 or int(batch_index) < 0:
            raise ValueError(f"epoch and batch_index must be >= 0, got {epoch}, {batch_index}")
        rng = np.random.default_rng([self.seed, int(epoch), int(batch_index), 1])
        p = self.crop_padding
        if p > 0:
            oy = rng.integers(0, 2 * p + 1, size=n, dtype=np.int64)
            ox = rng.integers(0, 2 * p + 1, size=n, dtype=np.int64)
        else:
            oy = np.zeros(n, np.int64)
            ox = np.zeros(n, np.int64)
        if self.horizontal_flip:
            flips = (rng.random(n) < 0.5).astype(np.uint8)
        else:
            flips = np.zeros(n, np.uint8)
        return oy, ox, flips

    def _output(self, xb, out):
        if out is None:
            buf = self._buffer
            if buf is None or buf.dtype != xb.dtype or buf.shape[1:] != xb.shape[1:] or len(buf) < len(xb):
                buf = self._buffer = np.empty(xb.shape, xb.dtype)
            return buf[:len(xb)]
        if out.shape != xb.shape or out.dtype != xb.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {xb.dtype} array of shape {xb.shape}, "
                             f"got {out.dtype} {out.shape}")
        if np.shares_memory(out, xb):
            raise ValueError("out must not overlap xb")
        return out

    def apply(self, xb, epoch, batch_index, out=None):
        """The augmented batch ``xb`` (NHWC) of ``(epoch, batch_index)``; see the class doc."""
        if not isinstance(xb, np.ndarray) or xb.ndim != 4:
            raise ValueError(f"xb must be an NHWC array, got {getattr(xb, 'shape', type(xb))}")
        if not self.enabled:
            if out is None or out is xb:
                return xb
            np.copyto(out, xb)
            return out
        from fastcnn.kernels.augment import crop_flip

        if not xb.flags.c_contiguous:
            xb = np.ascontiguousarray(xb)
        out = self._output(xb, out)
        oy, ox, flips = self.choices(len(xb), epoch, batch_index)
        if len(xb):
            crop_flip(xb, out, oy, ox, flips, self.crop_padding)
        return out
