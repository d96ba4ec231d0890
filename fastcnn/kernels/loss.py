"""Fused softmax cross-entropy (mean over the batch) and its gradient."""
import numpy as np
from numba import njit


@njit(cache=True, fastmath=True, error_model="numpy")
def softmax_cross_entropy_kernel(logits, labels, dlogits, label_smoothing=0.0):
    """Mean softmax cross-entropy of logits (N,K) against int labels (N,), with label smoothing
    eps (PyTorch's ``cross_entropy(..., label_smoothing=eps)``): the target is (1 - eps) on the
    label plus eps / K on every class, so

        loss_n = logsumexp(z) - (1 - eps) * z[label] - eps * mean_k z[k]

    dlogits (N,K) is overwritten with d(mean loss)/dlogits = (softmax - target)/N.
    Numerically stable: each row's max is subtracted before exp. Labels must
    already be validated to lie in [0, K). Returns the loss (per-row terms in
    the logits' dtype, summed in float64). eps = 0 gives the plain cross-entropy,
    bit for bit as without smoothing.

    Serial: at the sizes a classifier head has (N*K ~ 1e3-1e5) Numba's
    parallel start-up would cost more than the work.
    """
    N, K = logits.shape
    dt = logits.dtype.type
    one = dt(1)
    inv_n = one / dt(N)
    eps = dt(label_smoothing)
    smooth = eps > dt(0)
    on_label = (one - eps) * inv_n   # target weight of the label, already divided by N
    per_class = eps / dt(K) * inv_n  # target weight of every class, already divided by N
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
        lse = np.log(s)
        if smooth:
            zsum = dt(0)
            for k in range(K):
                zsum += row[k] - mx
            total += np.float64(lse - (one - eps) * (row[lab] - mx) - eps * zsum / dt(K))
        else:
            total += np.float64(lse - (row[lab] - mx))
        f = inv_n / s
        for k in range(K):
            drow[k] *= f
        if smooth:
            for k in range(K):
                drow[k] -= per_class
            drow[lab] -= on_label
        else:
            drow[lab] -= inv_n
    return total / N
