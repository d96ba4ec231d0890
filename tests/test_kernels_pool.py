import numpy as np
import pytest

from fastcnn.kernels import pool as K
from fastcnn.kernels import reference as R
from fastcnn.shapes import window_output_size

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
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


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
