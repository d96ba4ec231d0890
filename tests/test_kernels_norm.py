"""Batch-norm kernels (fastcnn/kernels/norm.py) as the BatchNorm layer runs them: statistics, invstd
(layers.batchnorm.invstd_and_scale), the normalize pass; the backward reductions and input gradient.

Small shapes: the tests run as they are under NUMBA_DISABLE_JIT=1 too (the kernels as plain Python).
"""
import numba
import numpy as np
import pytest

from fastcnn.kernels import norm as K
from fastcnn.kernels import reference as R
from fastcnn.layers.batchnorm import invstd_and_scale
from fastcnn.shard import fold_into

from conftest import numerical_grad as central_differences

DTYPES = [np.float32, np.float64]
EPS = 1e-5
# (M, C): as (N*H*W, C) after a conv (several chunks, a partial last chunk)
# and as (N, C) after a dense layer.
SHAPES = [(2 * 5 * 7, 3), (3 * 13 * 11, 8), (K.CHUNK * 3, 4), (K.CHUNK + 1, 2), (5, 16), (64, 10), (1, 3)]


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f(x) at x (float64)."""
    return central_differences(lambda: f(x), x, eps)


def params(rng, C, dtype):
    gamma = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return gamma, beta


def row_bounds(M, chunks=3):
    """Row offsets of min(chunks, M) chunks of M rows (as fastcnn.shard splits a batch)."""
    g = max(1, min(chunks, M))
    return np.array([c * M // g for c in range(g + 1)], dtype=np.int64)


def statistics(x, bounds):
    """(mean, biased variance) of x (M, C) from the per-chunk kernels, the chunks added in order."""
    M, C = x.shape
    dt = x.dtype.type
    part = np.empty((len(bounds) - 1, C), x.dtype)
    K.chunk_sums(x, bounds, part)
    mean = fold_into(part, np.empty(C, x.dtype)) * (dt(1) / dt(M))
    K.chunk_squared_deviations(x, mean, bounds, part)
    var = fold_into(part, np.empty(C, x.dtype)) * (dt(1) / dt(M))
    return mean, var


def train_forward(x, gamma, beta, eps=EPS, chunks=3):
    """The BatchNorm layer's training forward: statistics, invstd and scale, the normalize pass."""
    M, C = x.shape
    dt = x.dtype.type
    y = np.empty_like(x)
    invstd, scale = (np.empty(C, x.dtype) for _ in range(2))
    mean, var = statistics(x, row_bounds(M, chunks))
    invstd_and_scale(gamma, var, dt(eps), invstd, scale)
    K.batchnorm_forward(x, mean, scale, beta, y)
    return y, mean, var, invstd


def eval_forward(x, gamma, beta, running_mean, running_var, eps=EPS):
    y = np.empty_like(x)
    invstd, scale = np.empty_like(gamma), np.empty_like(gamma)
    invstd_and_scale(gamma, running_var, x.dtype.type(eps), invstd, scale)
    K.batchnorm_forward(x, running_mean, scale, beta, y)
    return y


def backward(x, dy, gamma, mean, invstd, chunks=3):
    """The BatchNorm layer's training backward: sums per chunk, added in order, then dx."""
    M, C = x.shape
    bounds = row_bounds(M, chunks)
    part_b, part_g = (np.empty((len(bounds) - 1, C), x.dtype) for _ in range(2))
    K.batchnorm_backward_reduce(x, dy, mean, bounds, part_b, part_g)
    dbeta = fold_into(part_b, np.empty_like(gamma))
    dgamma = fold_into(part_g, np.empty_like(gamma)) * invstd
    dx = np.empty_like(x)
    K.batchnorm_backward_dx(x, dy, mean, *K.dx_coefficients(gamma, invstd, dgamma, dbeta, M), dx)
    return dx, dgamma, dbeta


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_sums_depend_on_the_chunk_alone(dtype):
    """What makes K processes give one process's result: a chunk's partial sums are the same bit for
    bit whether it is computed among others or on its own rows (a process holding only it)."""
    rng = np.random.default_rng(5)
    M, C = 5 * 300 + 7, 6  # chunks of several 256-row blocks and a ragged end
    x = (3 + 2 * rng.standard_normal((M, C))).astype(dtype)
    dy = rng.standard_normal((M, C)).astype(dtype)
    mean = x.mean(axis=0).astype(dtype)
    bounds = row_bounds(M, 5)
    all_s, all_d, all_b, all_g = (np.empty((5, C), dtype) for _ in range(4))
    K.chunk_sums(x, bounds, all_s)
    K.chunk_squared_deviations(x, mean, bounds, all_d)
    K.batchnorm_backward_reduce(x, dy, mean, bounds, all_b, all_g)
    for g in range(5):
        rows = slice(bounds[g], bounds[g + 1])
        one = np.array([0, bounds[g + 1] - bounds[g]], dtype=np.int64)
        s, d, b, gg = (np.empty((1, C), dtype) for _ in range(4))
        K.chunk_sums(x[rows], one, s)
        K.chunk_squared_deviations(x[rows], mean, one, d)
        K.batchnorm_backward_reduce(x[rows], dy[rows], mean, one, b, gg)
        for whole, alone in ((all_s, s), (all_d, d), (all_b, b), (all_g, gg)):
            assert np.array_equal(whole[g], alone[0])
    np.testing.assert_allclose(fold_into(all_s, np.empty(C, dtype)), x.sum(axis=0, dtype=np.float64),
                               rtol=1e-5 if dtype == np.float32 else 1e-12)


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward_and_backward_match_reference(dtype, shape):
    rng = np.random.default_rng(0)
    M, C = shape
    x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
    gamma, beta = params(rng, C, dtype)
    y, mean, var, invstd = train_forward(x, gamma, beta)
    for a in (y, mean, var, invstd):
        assert a.dtype == dtype
    x64 = x.astype(np.float64)
    y_ref, mean_ref, var_ref, invstd_ref = R.batchnorm_forward_train(x64, gamma.astype(np.float64),
                                                                     beta.astype(np.float64), EPS)
    t = tol(dtype)
    np.testing.assert_allclose(mean, mean_ref, **t)
    np.testing.assert_allclose(var, var_ref, **t)
    if M > 1:
        np.testing.assert_allclose(invstd, invstd_ref, **t)
        np.testing.assert_allclose(y, y_ref, **t)

    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = backward(x, dy, gamma, mean, invstd)
    for a in (dx, dgamma, dbeta):
        assert a.dtype == dtype
    dx_ref, dgamma_ref, dbeta_ref = R.batchnorm_backward(
        x64, dy.astype(np.float64), gamma.astype(np.float64), mean.astype(np.float64), invstd.astype(np.float64))
    t = dict(rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(dx_ref).max()))) if dtype == np.float32 else t
    np.testing.assert_allclose(dbeta, dbeta_ref, **t)
    np.testing.assert_allclose(dgamma, dgamma_ref, **t)
    np.testing.assert_allclose(dx, dx_ref, **t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2 * 5 * 7, 3), (5, 16)])
def test_eval_forward_matches_reference(dtype, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    gamma, beta = params(rng, shape[1], dtype)
    rm = rng.standard_normal(shape[1]).astype(dtype)
    rv = rng.uniform(0.5, 2, shape[1]).astype(dtype)
    y = eval_forward(x, gamma, beta, rm, rv)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, R.batchnorm_forward_eval(x, gamma, beta, rm, rv, EPS), **tol(dtype))


def test_float32_variance_accurate_with_large_offset():
    # two-pass: a large mean does not destroy the variance in float32
    rng = np.random.default_rng(2)
    x64 = 1000 + 0.01 * rng.standard_normal((5000, 4))
    x = x64.astype(np.float32)
    y, mean, var, invstd = train_forward(x, np.ones(4, np.float32), np.zeros(4, np.float32))
    ref_var = x.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)


def test_deterministic_across_thread_counts():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((K.CHUNK * 5 + 17, 6)).astype(np.float32)
    gamma, beta = params(rng, 6, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    old = numba.get_num_threads()
    try:
        for n in sorted({1, old}):
            numba.set_num_threads(n)
            for _ in range(2):
                y, mean, var, invstd = train_forward(x, gamma, beta)
                results.append((y, mean, var, invstd) + backward(x, dy, gamma, mean, invstd))
    finally:
        numba.set_num_threads(old)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(2 * 3 * 3, 3), (6, 4)])
def test_gradient_check(shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    gamma, beta = params(rng, shape[1], np.float64)
    G = rng.standard_normal(shape)  # random upstream gradient: a plain sum would make dx vanish
    y, mean, var, invstd = train_forward(x, gamma, beta)
    dx, dgamma, dbeta = backward(x, G, gamma, mean, invstd)
    assert np.abs(dx).max() > 1e-3
    num_dx = numerical_grad(lambda x: float(np.sum(train_forward(x, gamma, beta)[0] * G)), x)
    num_dg = numerical_grad(lambda g: float(np.sum(train_forward(x, g, beta)[0] * G)), gamma.copy())
    num_db = numerical_grad(lambda b: float(np.sum(train_forward(x, gamma, b)[0] * G)), beta.copy())
    np.testing.assert_allclose(dx, num_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dgamma, num_dg, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, num_db, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nhwc", [(4, 5, 6, 3), (16, 1, 1, 7)])
def test_against_torch(dtype, nhwc):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    N, H, W, C = nhwc
    x = (2 + rng.standard_normal(nhwc)).astype(dtype)
    gamma, beta = params(rng, C, dtype)
    G = rng.standard_normal(nhwc).astype(dtype)
    y, mean, var, invstd = train_forward(x.reshape(-1, C), gamma, beta)
    dx, dgamma, dbeta = backward(x.reshape(-1, C), G.reshape(-1, C), gamma, mean, invstd)

    def nchw(a):
        return torch.tensor(a.transpose(0, 3, 1, 2).copy())

    xt = nchw(x).requires_grad_(True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    rm = torch.zeros(C, dtype=xt.dtype)
    rv = torch.ones(C, dtype=xt.dtype)
    yt = F.batch_norm(xt, rm, rv, gt, bt, training=True, momentum=0.1, eps=EPS)
    (yt * nchw(G)).sum().backward()
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y.reshape(nhwc), yt.detach().numpy().transpose(0, 2, 3, 1), **t)
    np.testing.assert_allclose(dx.reshape(nhwc), xt.grad.numpy().transpose(0, 2, 3, 1), **t)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), **t)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), **t)
    # torch's running var uses the unbiased variance; ours is the biased one
    M = N * H * W
    np.testing.assert_allclose(rm.numpy(), 0.1 * mean, **t)
    np.testing.assert_allclose(rv.numpy(), 0.9 + 0.1 * var * M / (M - 1), **t)

    # eval mode with the running statistics torch just produced
    rm_np, rv_np = rm.numpy().copy(), rv.numpy().copy()
    y_eval = eval_forward(x.reshape(-1, C), gamma, beta, rm_np, rv_np)
    with torch.no_grad():
        yt_eval = F.batch_norm(nchw(x), rm, rv, torch.tensor(gamma), torch.tensor(beta), training=False, eps=EPS)
    np.testing.assert_allclose(y_eval.reshape(nhwc), yt_eval.numpy().transpose(0, 2, 3, 1), **t)
