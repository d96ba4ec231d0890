"""Max and average pooling kernels (fastcnn/kernels/pool.py) with their flags off, as the MaxPool2D,
AvgPool2D and GlobalAvgPool layers run them, against plain NumPy and PyTorch.

Small shapes: the tests run as they are under NUMBA_DISABLE_JIT=1 too (the kernels as plain Python).
"""
import numpy as np
import pytest

from fastcnn.kernels import pool as K
from fastcnn.kernels import reference as R
from fastcnn.shapes import window_output_size

from conftest import numerical_grad as central_differences

DTYPES = [np.float32, np.float64]

# (N, H, W, C, pool, stride, (pad_top, pad_bottom, pad_left, pad_right))
CASES = [
    (2, 6, 6, 3, (2, 2), (2, 2), (0, 0, 0, 0)),   # plain
    (2, 7, 9, 2, (3, 3), (2, 2), (0, 0, 0, 0)),   # overlapping, odd sizes
    (1, 7, 7, 4, (3, 3), (2, 2), (1, 1, 1, 1)),   # overlapping with padding, batch 1
    (3, 7, 8, 1, (2, 2), (3, 3), (0, 0, 0, 0)),   # stride > pool: pixels skipped, left over
    (2, 5, 8, 3, (2, 3), (1, 2), (1, 1, 1, 1)),   # rectangular, stride 1 rows
    (1, 9, 5, 2, (4, 2), (3, 1), (2, 0, 0, 1)),   # asymmetric padding (bottom/right implied)
    (1, 1, 1, 3, (1, 1), (1, 1), (0, 0, 0, 0)),   # 1x1
]


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f(x) at x (float64)."""
    return central_differences(lambda: f(x), x, eps)


def run_forward(x, pool, stride, pads):
    N, H, W, C = x.shape
    pt, pb, pl, pr = pads
    OH = window_output_size(H, pool[0], stride[0], pt, pb)
    OW = window_output_size(W, pool[1], stride[1], pl, pr)
    y = np.empty((N, OH, OW, C), dtype=x.dtype)
    am = np.empty((N, OH, OW, C), dtype=np.int32)
    K.maxpool2d_forward(x, y, am, pool[0], pool[1], stride[0], stride[1], pt, pl)
    return y, am


def run_backward(dy, am, shape):
    dx = np.full(shape, 123.0, dtype=dy.dtype)  # garbage: must be overwritten
    K.maxpool2d_backward(dy, am, dx)
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(dtype, case):
    N, H, W, C, pool, stride, pads = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    y, am = run_forward(x, pool, stride, pads)
    y_ref, am_ref = R.maxpool2d_forward(x, *pool, *stride, *pads)
    assert y.dtype == dtype and am.dtype == np.int32
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(am, am_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = run_backward(dy, am, x.shape)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, R.maxpool2d_backward(dy, am_ref, x.shape), rtol=1e-12, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_ties_first_maximum_wins(case):
    N, H, W, C, pool, stride, pads = case
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(N, H, W, C)).astype(np.float32)  # many ties
    y, am = run_forward(x, pool, stride, pads)
    y_ref, am_ref = R.maxpool2d_forward(x, *pool, *stride, *pads)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(am, am_ref)


def test_ties_explicit():
    x = np.zeros((1, 2, 2, 1), np.float32)
    y, am = run_forward(x, (2, 2), (2, 2), (0, 0, 0, 0))
    assert am[0, 0, 0, 0] == 0
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = 5
    y, am = run_forward(x, (2, 2), (2, 2), (0, 0, 0, 0))
    assert y[0, 0, 0, 0] == 5 and am[0, 0, 0, 0] == 1


def test_padding_never_wins():
    x = -np.ones((1, 3, 3, 2), np.float64) * 100  # all negative: padding as 0 would win
    y, am = run_forward(x, (3, 3), (1, 1), (1, 1, 1, 1))
    assert np.all(y == -100)
    assert np.all(am >= 0)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5]])
def test_gradient_check(case):
    N, H, W, C, pool, stride, pads = case
    rng = np.random.default_rng(2)
    # distinct, well-separated values: the argmax does not move under +-eps
    x = (rng.permutation(N * H * W * C) * 0.1).reshape(N, H, W, C).astype(np.float64)
    y, am = run_forward(x, pool, stride, pads)
    G = rng.standard_normal(y.shape)
    dx = run_backward(G, am, x.shape)
    num = numerical_grad(lambda x: float(np.sum(run_forward(x, pool, stride, pads)[0] * G)), x)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", [c for c in CASES if c[6][0] == c[6][1] and c[6][2] == c[6][3]])
@pytest.mark.parametrize("ties", [False, True])
def test_against_torch(case, ties):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    N, H, W, C, pool, stride, pads = case
    rng = np.random.default_rng(3)
    if ties:
        x = rng.integers(0, 3, size=(N, H, W, C)).astype(np.float32)
    else:
        x = rng.standard_normal((N, H, W, C)).astype(np.float32)
    y, am = run_forward(x, pool, stride, pads)
    G = rng.standard_normal(y.shape).astype(np.float32)
    dx = run_backward(G, am, x.shape)

    xt = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    yt, it = F.max_pool2d(xt, pool, stride, padding=(pads[0], pads[2]), return_indices=True)
    (yt * torch.tensor(G.transpose(0, 3, 1, 2).copy())).sum().backward()
    np.testing.assert_array_equal(y, yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(am, it.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ average pooling
# (N, H, W, C, pool, stride): no padding
AVG_CASES = [
    (2, 6, 6, 3, (2, 2), (2, 2)),   # plain
    (2, 7, 9, 2, (3, 3), (2, 2)),   # overlapping, odd sizes, left-over pixels
    (1, 7, 7, 4, (3, 3), (1, 1)),   # heavily overlapping, batch 1
    (3, 7, 8, 1, (2, 2), (3, 3)),   # stride > pool: pixels in no window get 0
    (2, 5, 8, 3, (2, 3), (1, 2)),   # rectangular, stride != pool
    (1, 9, 5, 2, (4, 2), (3, 1)),   # rectangular overlapping
    (1, 1, 1, 3, (1, 1), (1, 1)),   # 1x1
    (1, 4, 5, 2, (4, 5), (4, 5)),   # window = whole image
]


def run_avg_forward(x, pool, stride):
    N, H, W, C = x.shape
    OH = window_output_size(H, pool[0], stride[0], 0, 0)
    OW = window_output_size(W, pool[1], stride[1], 0, 0)
    y = np.full((N, OH, OW, C), 123.0, dtype=x.dtype)  # garbage: must be overwritten
    K.avgpool2d_forward(x, y, pool[0], pool[1], stride[0], stride[1])
    return y


def run_avg_backward(dy, shape, pool, stride):
    dx = np.full(shape, 123.0, dtype=dy.dtype)
    K.avgpool2d_backward(dy, dx, pool[0], pool[1], stride[0], stride[1])
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", AVG_CASES)
def test_avgpool_matches_reference(dtype, case):
    N, H, W, C, pool, stride = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    y = run_avg_forward(x, pool, stride)
    assert y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(y, R.avgpool2d_forward(x, *pool, *stride), **tol)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = run_avg_backward(dy, x.shape, pool, stride)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, R.avgpool2d_backward(dy, x.shape, *pool, *stride), **tol)


@pytest.mark.parametrize("case", [AVG_CASES[1], AVG_CASES[3], AVG_CASES[4], AVG_CASES[5]])
def test_avgpool_gradient_check(case):
    N, H, W, C, pool, stride = case
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, H, W, C))
    G = rng.standard_normal(run_avg_forward(x, pool, stride).shape)
    dx = run_avg_backward(G, x.shape, pool, stride)
    num = numerical_grad(lambda x: float(np.sum(run_avg_forward(x, pool, stride) * G)), x)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


def global_avgpool(x):
    """Global average pooling as the GlobalAvgPool layer runs it: average pooling, one H x W window."""
    n, h, w, c = x.shape
    y = np.full((n, c), 123.0, x.dtype)
    K.avgpool2d_forward(x, y.reshape(n, 1, 1, c), h, w, h, w)
    return y


def global_avgpool_backward(dy, shape):
    n, h, w, c = shape
    dx = np.full(shape, 123.0, dy.dtype)
    K.avgpool2d_backward(dy.reshape(n, 1, 1, c), dx, h, w, h, w)
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 1, 4), (3, 4, 4, 1)])
def test_global_avgpool_matches_reference(dtype, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    y = global_avgpool(x)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, R.global_avgpool_forward(x), **tol)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = global_avgpool_backward(dy, shape)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, R.global_avgpool_backward(dy, shape), **tol)
    # Each pixel's gradient is dy / (H*W) exactly (0 + dy, times the inverse area).
    inv = dtype(1.0 / (shape[1] * shape[2]))
    assert np.array_equal(dx, np.broadcast_to((dy * inv)[:, None, None, :], shape))


def test_global_avgpool_gradient_check():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 3))
    G = rng.standard_normal((2, 3))
    dx = global_avgpool_backward(G, x.shape)
    np.testing.assert_allclose(dx, numerical_grad(lambda x: float(np.sum(global_avgpool(x) * G)), x),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", AVG_CASES)
def test_avgpool_against_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    N, H, W, C, pool, stride = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, H, W, C)).astype(np.float32)
    y = run_avg_forward(x, pool, stride)
    G = rng.standard_normal(y.shape).astype(np.float32)
    dx = run_avg_backward(G, x.shape, pool, stride)
    xt = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    yt = F.avg_pool2d(xt, pool, stride)
    (yt * torch.tensor(G.transpose(0, 3, 1, 2).copy())).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
