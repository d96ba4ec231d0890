"""Activation kernels (fastcnn/kernels/activation.py) as the ReLU and leaky ReLU layers run them.

Small arrays: the tests run as they are under NUMBA_DISABLE_JIT=1 too (the kernels as plain Python).
"""
import numpy as np
import pytest

from fastcnn.kernels import activation as K
from fastcnn.kernels import reference as R

from conftest import numerical_grad as central_differences

DTYPES = [np.float32, np.float64]


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f(x) at x (float64)."""
    return central_differences(lambda: f(x), x, eps)


def _x(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[::7] = 0  # exact zeros: gradient 0 there
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 7, 5, 3), (1000,)])
def test_relu_matches_reference(dtype, shape):
    rng = np.random.default_rng(0)
    x = _x(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    K.relu_forward(x.reshape(-1), y.reshape(-1))
    K.relu_backward(x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, R.relu_forward(x))
    np.testing.assert_array_equal(dx, R.relu_backward(x, dy))
    assert np.all(dx.reshape(-1)[::7] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.01, 0.2])
def test_leaky_relu_matches_reference(dtype, slope):
    rng = np.random.default_rng(1)
    x = _x(rng, (3, 6, 4, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    K.leaky_relu_forward(x.reshape(-1), dtype(slope), y.reshape(-1))
    K.leaky_relu_backward(x.reshape(-1), dy.reshape(-1), dtype(slope), dx.reshape(-1))
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, R.leaky_relu_forward(x, slope))
    np.testing.assert_array_equal(dx, R.leaky_relu_backward(x, dy, slope))


def test_leaky_relu_float32_math_with_python_float_slope():
    # A float64 slope must not promote the float32 arithmetic.
    x = np.array([-3.0, -1.0 / 3, 2.0], dtype=np.float32)
    y = np.empty_like(x)
    K.leaky_relu_forward(x, 0.1, y)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[:2], x[:2] * np.float32(0.1))


def _away_from_zero(rng, shape):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.1, x + np.sign(x + 1e-12) * 0.2, x)


@pytest.mark.parametrize("leaky", [False, True])
def test_gradient_check(leaky):
    rng = np.random.default_rng(2)
    x = _away_from_zero(rng, (2, 3, 4, 2))
    G = rng.standard_normal(x.shape)
    slope = 0.05

    def forward(x):
        y = np.empty_like(x)
        if leaky:
            K.leaky_relu_forward(x.reshape(-1), slope, y.reshape(-1))
        else:
            K.relu_forward(x.reshape(-1), y.reshape(-1))
        return y

    dx = np.empty_like(x)
    if leaky:
        K.leaky_relu_backward(x.reshape(-1), G.reshape(-1), slope, dx.reshape(-1))
    else:
        K.relu_backward(x.reshape(-1), G.reshape(-1), dx.reshape(-1))
    num = numerical_grad(lambda x: float(np.sum(forward(x) * G)), x)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


def test_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = _x(rng, (2, 5, 5, 3), np.float32)
    G = rng.standard_normal(x.shape).astype(np.float32)
    for leaky in (False, True):
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.nn.functional.leaky_relu(xt, 0.01) if leaky else torch.relu(xt)
        (yt * torch.tensor(G)).sum().backward()
        y = np.empty_like(x)
        dx = np.empty_like(x)
        if leaky:
            K.leaky_relu_forward(x.reshape(-1), np.float32(0.01), y.reshape(-1))
            K.leaky_relu_backward(x.reshape(-1), G.reshape(-1), np.float32(0.01), dx.reshape(-1))
        else:
            K.relu_forward(x.reshape(-1), y.reshape(-1))
            K.relu_backward(x.reshape(-1), G.reshape(-1), dx.reshape(-1))
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=0)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=0)
