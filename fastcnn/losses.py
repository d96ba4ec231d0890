"""Loss functions (public API): ``fastcnn.softmax_cross_entropy``."""
import math
from typing import Tuple

import numpy as np


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray,
                          label_smoothing: float = 0.0, shard=None) -> Tuple[float, np.ndarray]:
    """Fused softmax cross-entropy, mean over the batch.

    The mean is over the batch's chunks (fastcnn/shard.py): each chunk's row losses summed exactly
    (math.fsum), the chunks added in order. ``shard``: the part of a batch split over processes
    that these rows are (BatchShard; default: the whole batch); the loss is then the whole batch's
    and dlogits is divided by its size.

    ``label_smoothing`` eps in [0, 1): PyTorch's ``cross_entropy(..., label_smoothing=eps)``,
    ``(1 - eps) * CE(label) + eps * mean over classes of -log p``.

    logits: float32 or float64 array (N, K); labels: integer class indices (N,),
    each in [0, K). Numerically stable (log-sum-exp).

    Returns (loss: float, dlogits): dlogits has the shape and dtype of logits
    and is d(mean loss)/dlogits = (softmax(logits) - onehot(labels)) / N.
    Raises ValueError naming the problem for bad shapes, dtypes or labels.
    """
    if not isinstance(logits, np.ndarray):
        raise ValueError(f"logits: expected a NumPy array, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits: expected a 2-D array (batch, classes), got shape {logits.shape}")
    if logits.dtype not in (np.float32, np.float64):
        raise ValueError(f"logits: expected float32 or float64, got {logits.dtype}")
    n, k = logits.shape
    if n == 0:
        raise ValueError("logits: the batch is empty")
    if k == 0:
        raise ValueError("logits: there are no classes (shape[1] == 0)")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array of class indices, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"labels: length {labels.shape[0]} does not match the batch size {n} of logits")
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"labels: value {labels[i]} at index {i} is outside [0, {k})")

    eps = float(label_smoothing)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing: must be in [0, 1), got {label_smoothing!r}")

    from fastcnn.kernels.loss import softmax_cross_entropy_rows
    from fastcnn.shard import shard_for

    shard = shard_for(shard, n)
    logits = np.ascontiguousarray(logits)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    dlogits = np.empty_like(logits)
    row_loss = np.empty(n, np.float64)
    softmax_cross_entropy_rows(logits, labels, dlogits, eps, shard.total, row_loss)
    chunk_loss = np.array([math.fsum(row_loss[s]) for s in shard.slices()], dtype=np.float64)
    total = shard.fold(chunk_loss, np.empty((), np.float64))
    return float(total) / shard.total, dlogits
