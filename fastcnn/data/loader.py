"""Mini-batches and validation splits, reproducible from a seed.

The order of an epoch is a pure function of ``(seed, epoch)``: a resumed run
(``start`` = the number of batches already done in that epoch) sees exactly
the batches the interrupted run would have seen.
"""
import numpy as np

__all__ = ["BatchLoader", "split_validation"]


def _check_xy(x, y):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x and y must have the same number of samples, got shapes "
                         f"{x.shape} and {y.shape}")
    return x, y


def split_validation(x, y, fraction, seed):
    """Hold out a seeded random ``round(fraction * N)`` samples (at least 1).

    Returns ``(x_train, y_train, x_val, y_val)``; both parts keep the original
    order of their samples and are fresh contiguous arrays.
    """
    x, y = _check_xy(x, y)
    n = len(x)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    n_val = max(1, int(round(float(fraction) * n)))
    if n_val >= n:
        raise ValueError(f"cannot hold out {n_val} of {n} samples for validation and still train")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[:n_val])
    train_idx = np.sort(perm[n_val:])
    return (np.take(x, train_idx, axis=0), np.take(y, train_idx, axis=0),
            np.take(x, val_idx, axis=0), np.take(y, val_idx, axis=0))


class BatchLoader:
    """Yield ``(xb, yb)`` mini-batches of ``(x, y)``.

    ``xb`` is a fresh C-contiguous array (float32 unless ``dtype`` says
    otherwise) and ``yb`` a fresh int64 array for every batch: the consumer
    may keep or modify them. With ``reuse=True`` every batch is gathered into
    the same two buffers instead (no allocation per step, as the trainer
    wants): a batch is then valid only until the next one is requested.
    """

    def __init__(self, x, y, batch_size, shuffle=True, seed=0, drop_last=False, dtype=np.float32, reuse=False):
        x, y = _check_xy(x, y)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.x = np.ascontiguousarray(x, dtype=dtype)
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.reuse = bool(reuse)
        self._x_buffer = self._y_buffer = None

    @property
    def num_samples(self):
        return len(self.x)

    def __len__(self):
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch):
        """The sample indices of ``epoch`` in the order they are served."""
        n = len(self.x)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def epoch_batches(self, epoch, start=0):
        """Yield the batches of ``epoch`` from batch index ``start`` on."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        nb = len(self)
        if not 0 <= start <= nb:
            raise ValueError(f"start must be between 0 and {nb} (batches per epoch), got {start}")
        order = self.order(epoch)
        b = self.batch_size
        if self.reuse and self._x_buffer is None:
            k = min(b, len(self.x))  # a batch_size beyond the data: one batch of all of it, never more
            self._x_buffer = np.empty((k, *self.x.shape[1:]), self.x.dtype)
            self._y_buffer = np.empty(k, np.int64)
        for i in range(start, nb):
            idx = order[i * b:(i + 1) * b]
            if self.reuse:
                k = len(idx)
                yield (np.take(self.x, idx, axis=0, out=self._x_buffer[:k]),
                       np.take(self.y, idx, axis=0, out=self._y_buffer[:k]))
            elif self.shuffle:
                yield np.take(self.x, idx, axis=0), np.take(self.y, idx, axis=0)
            else:
                yield self.x[i * b:(i + 1) * b].copy(), self.y[i * b:(i + 1) * b].copy()
