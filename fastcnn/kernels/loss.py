"""Fused softmax cross-entropy (mean over the batch) and its gradient."""
import math

import numpy as np
from numba import njit


def softmax_cross_entropy_kernel(logits, labels, dlogits, label_smoothing=0.0):
    """The mean loss of the rows of logits (N, K), their dlogits (N, K) overwritten: the loss of
    softmax_cross_entropy_rows with n_total = N, its rows summed exactly (math.fsum).

    Plain Python around the one compiled kernel: a kernel calling another may compile differently
    fresh and from Numba's cache (fast-math across the call), which changed last bits."""
    N = logits.shape[0]
    row_loss = np.empty(N, np.float64)
    softmax_cross_entropy_rows(logits, labels, dlogits, label_smoothing, N, row_loss)
    return math.fsum(row_loss) / N


@njit(cache=True, fastmath=True, error_model="numpy")
def softmax_cross_entropy_rows(logits, labels, dlogits, label_smoothing, n_total, row_loss):
    """Softmax cross-entropy of logits (N,K) against int labels (N,), with label smoothing eps
    (PyTorch's ``cross_entropy(..., label_smoothing=eps)``): the target is (1 - eps) on the label
    plus eps / K on every class, so

        loss_n = logsumexp(z) - (1 - eps) * z[label] - eps * mean_k z[k]

    row_loss (N,) float64 is overwritten with loss_n (computed in the logits' dtype) and dlogits
    (N,K) with d(mean loss)/dlogits = (softmax - target) / n_total, the mean over a batch of
    ``n_total`` samples of which these are some (all of them in one process).
    Numerically stable: each row's max is subtracted before exp. Labels must
    already be validated to lie in [0, K). eps = 0 gives the plain cross-entropy,
    bit for bit as without smoothing.

    Serial: at the sizes a classifier head has (N*K ~ 1e3-1e5) Numba's
    parallel start-up would cost more than the work.
    """
    N, K = logits.shape
    dt = logits.dtype.type
    one = dt(1)
    inv_n = one / dt(n_total)
    eps = dt(label_smoothing)
    smooth = eps > dt(0)
    on_label = (one - eps) * inv_n   # target weight of the label, already divided by N
    per_class = eps / dt(K) * inv_n  # target weight of every class, already divided by N
    for n in range(N):
        row = logits[n]
        drow = dlogits[n]
        mx = row[0]
        for k in range(1, K):
            v = row[k]
            mx = v if v > mx else mx
        s = dt(0)
        for k in range(K):
            e = np.exp(row[k] - mx)
            drow[k] = e
            s += e
        lab = labels[n]
        # loss_n = logsumexp - logit[label] = log(s) - (logit[label] - max)
        lse = np.log(s)
        if smooth:
            zsum = dt(0)
            for k in range(K):
                zsum += row[k] - mx
            row_loss[n] = np.float64(lse - (one - eps) * (row[lab] - mx) - eps * zsum / dt(K))
        else:
            row_loss[n] = np.float64(lse - (row[lab] - mx))
        f = inv_n / s
        for k in range(K):
            drow[k] *= f
        if smooth:
            for k in range(K):
                drow[k] -= per_class
            drow[lab] -= on_label
        else:
            drow[lab] -= inv_n
