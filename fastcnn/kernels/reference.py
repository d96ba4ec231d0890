"""Plain NumPy references of the activation, pooling, dropout, batch-norm,
dense and loss kernels: slow, readable, obviously right. Used by the tests and the
benchmarks. Unlike the kernels they allocate and return their outputs.

Layout NHWC; dense weights (in, out).
"""
import numpy as np

from fastcnn.shapes import window_output_size


# ---------------------------------------------------------------- activations
def relu_forward(x):
    return np.where(x > 0, x, np.zeros_like(x))


def relu_backward(x, dy):
    """Gradient 0 at exactly 0."""
    return np.where(x > 0, dy, np.zeros_like(dy))


def leaky_relu_forward(x, slope):
    return np.where(x > 0, x, x * x.dtype.type(slope))


def leaky_relu_backward(x, dy, slope):
    return np.where(x > 0, dy, dy * dy.dtype.type(slope))


# -------------------------------------------------------------------- pooling
def maxpool2d_forward(x, pool_h, pool_w, stride_h, stride_w,
                      pad_top=0, pad_bottom=0, pad_left=0, pad_right=0):
    """-> (y (N,OH,OW,C), argmax int32 (N,OH,OW,C) = flat index ih*W+iw).

    Padding counts as -inf; ties go to the first maximum in row-major window
    order. Output size as PyTorch (left-over pixels dropped).
    """
    N, H, W, C = x.shape
    OH = window_output_size(H, pool_h, stride_h, pad_top, pad_bottom)
    OW = window_output_size(W, pool_w, stride_w, pad_left, pad_right)
    y = np.full((N, OH, OW, C), -np.inf, dtype=x.dtype)
    argmax = np.full((N, OH, OW, C), -1, dtype=np.int32)
    for n in range(N):
        for oh in range(OH):
            for ow in range(OW):
                for c in range(C):
                    for kh in range(pool_h):
                        for kw in range(pool_w):
                            ih = oh * stride_h - pad_top + kh
                            iw = ow * stride_w - pad_left + kw
                            if not (0 <= ih < H and 0 <= iw < W):
                                continue  # padding: never wins
                            v = x[n, ih, iw, c]
                            if argmax[n, oh, ow, c] < 0 or v > y[n, oh, ow, c]:
                                y[n, oh, ow, c] = v
                                argmax[n, oh, ow, c] = ih * W + iw
    return y, argmax


def maxpool2d_backward(dy, argmax, input_shape):
    """Scatter dy to the argmax positions; overlapping windows accumulate."""
    N, H, W, C = input_shape
    dx = np.zeros(input_shape, dtype=dy.dtype)
    _, OH, OW, _ = dy.shape
    for n in range(N):
        for oh in range(OH):
            for ow in range(OW):
                for c in range(C):
                    idx = argmax[n, oh, ow, c]
                    if idx >= 0:
                        dx[n, idx // W, idx % W, c] += dy[n, oh, ow, c]
    return dx


def avgpool2d_forward(x, pool_h, pool_w, stride_h, stride_w):
    """Mean of each window, no padding; output size as PyTorch (left-over pixels dropped)."""
    N, H, W, C = x.shape
    OH = window_output_size(H, pool_h, stride_h, 0, 0)
    OW = window_output_size(W, pool_w, stride_w, 0, 0)
    y = np.zeros((N, OH, OW, C), dtype=x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            window = x[:, oh * stride_h:oh * stride_h + pool_h, ow * stride_w:ow * stride_w + pool_w, :]
            y[:, oh, ow, :] = window.sum(axis=(1, 2)) / (pool_h * pool_w)
    return y


def avgpool2d_backward(dy, input_shape, pool_h, pool_w, stride_h, stride_w):
    """Spread dy / area over each window; overlapping windows accumulate."""
    dx = np.zeros(input_shape, dtype=dy.dtype)
    _, OH, OW, _ = dy.shape
    for oh in range(OH):
        for ow in range(OW):
            dx[:, oh * stride_h:oh * stride_h + pool_h, ow * stride_w:ow * stride_w + pool_w, :] += \
                (dy[:, oh, ow, :] / (pool_h * pool_w))[:, None, None, :]
    return dx


def global_avgpool_forward(x):
    """(N, H, W, C) -> (N, C): mean over H and W."""
    return x.mean(axis=(1, 2)).astype(x.dtype)


def global_avgpool_backward(dy, input_shape):
    N, H, W, C = input_shape
    return np.broadcast_to((dy / (H * W))[:, None, None, :], input_shape).astype(dy.dtype)


# -------------------------------------------------------------------- dropout
def _splitmix64_finalize(z):
    """The splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_mask(shape, seed, index, step, rate):
    """bool keep-mask of the given shape (see fastcnn/kernels/dropout.py for the definition).

    key = mix(mix(mix(seed) + index) + step); h_e = mix(key + (e + 1) * G);
    keep_e = (h_e >> 40) / 2**24 >= rate, e the row-major flat element index.
    """
    with np.errstate(over="ignore"):
        one = lambda v: _splitmix64_finalize(np.array([v], dtype=np.uint64))[0]  # noqa: E731
        key = one(np.uint64(int(seed) % 2**64))
        key = one(key + np.uint64(index))
        key = one(key + np.uint64(step))
        e = np.arange(1, int(np.prod(shape)) + 1, dtype=np.uint64)
        h = _splitmix64_finalize(key + e * np.uint64(0x9E3779B97F4A7C15))
    u = (h >> np.uint64(40)).astype(np.float64) / 2.0 ** 24
    return (u >= rate).reshape(shape)


def dropout_forward(x, keep, rate):
    """Inverted dropout with a given keep-mask: kept values times 1/(1-rate) (in x's dtype)."""
    scale = x.dtype.type(1.0 / (1.0 - rate))
    return np.where(keep, x * scale, np.zeros_like(x))


def dropout_backward(dy, keep, rate):
    scale = dy.dtype.type(1.0 / (1.0 - rate))
    return np.where(keep, dy * scale, np.zeros_like(dy))


# ----------------------------------------------------------------- batch norm
def batchnorm_forward_train(x, gamma, beta, eps):
    """x (M,C) -> (y, mean, var (biased), invstd)."""
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)
    invstd = 1 / np.sqrt(var + eps)
    y = (x - mean) * invstd * gamma + beta
    return y.astype(x.dtype), mean, var, invstd.astype(x.dtype)


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps):
    y = (x - running_mean) / np.sqrt(running_var + eps) * gamma + beta
    return y.astype(x.dtype)


def batchnorm_backward(x, dy, gamma, mean, invstd):
    """-> (dx, dgamma, dbeta) for the training-mode forward."""
    M = x.shape[0]
    xhat = (x - mean) * invstd
    dbeta = dy.sum(axis=0)
    dgamma = (dy * xhat).sum(axis=0)
    dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma)
    return dx.astype(x.dtype), dgamma, dbeta


# ---------------------------------------------------------------------- dense
def dense_forward(x, w, b):
    return x @ w + b


def dense_backward_input(dy, w):
    return dy @ w.T


def dense_backward_weight(x, dy):
    """-> (dw, db)."""
    return x.T @ dy, dy.sum(axis=0)


# ----------------------------------------------------------------------- loss
def softmax_cross_entropy(logits, labels):
    """-> (mean loss: float, dlogits = (softmax - onehot) / N)."""
    N, K = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1))
    loss = float(np.mean(lse - shifted[np.arange(N), labels]))
    probs = np.exp(shifted - lse[:, None])
    onehot = np.zeros_like(logits)
    onehot[np.arange(N), labels] = 1
    return loss, ((probs - onehot) / N).astype(logits.dtype)
