"""Fused softmax cross-entropy (mean over the batch) and its gradient."""
import numpy as np
from numba import njit


@njit(cache=True, fastmath=True, error_model="numpy")
def softmax_cross_entropy_kernel(logits, labels, dlogits):
    """Mean softmax cross-entropy of logits (N,K) against int labels (N,).

    dlogits (N,K) is overwritten with d(mean loss)/dlogits = (softmax - onehot)/N.
    Numerically stable: each row's max is subtracted before exp. Labels must
    already be validated to lie in [0, K). Returns the loss (per-row terms in
    the logits' dtype, summed in float64).

    Serial: at the sizes a classifier head has (N*K ~ 1e3-1e5) Numba's
    parallel start-up would cost more than the work.
    """
    N, K = logits.shape
    dt = logits.dtype.type
    one = dt(1)
    inv_n = one / dt(N)
    total = 0.0
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
        total += np.float64(np.log(s) - (row[lab] - mx))
        f = inv_n / s
        for k in range(K):
            drow[k] *= f
        drow[lab] -= inv_n
    return total / N
