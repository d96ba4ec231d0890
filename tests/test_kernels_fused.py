"""Fused kernels (fastcnn/kernels/fused.py) against the composition of the layers' kernels.

The fused kernels run the layers' scan, scatter, activation and batch-norm code
with other flags; these tests check that the flags compose as the layers do.
ReLU/leaky ReLU + max-pool: outputs and input gradients bit-identical (same
comparisons, same additions in the same order). Batch norm + ReLU (+ pool):
the normalized outputs bit-identical (the same statistics kernel and invstd);
gradients bit-identical without pooling (same chunked sums), within rounding
with pooling (the reductions add the winners' terms in pooled order).

Under NUMBA_DISABLE_JIT=1 (the kernels run as plain Python) the tests use the
small geometries and shapes only, so that they run in a few minutes.
"""
import numba
import numpy as np
import pytest
from test_kernels_norm import backward as bn_backward
from test_kernels_norm import row_bounds, statistics

from fastcnn.kernels import activation, fused, norm, pool
from fastcnn.layers.batchnorm import invstd_and_scale
from fastcnn.shapes import window_output_size
from fastcnn.shard import fold_into

JIT = not numba.config.DISABLE_JIT
DTYPES = [np.float32, np.float64]

# (N, H, W, C, pool, stride, pad)
ALL_GEOMETRIES = [
    (2, 26, 26, 32, (2, 2), (2, 2), (0, 0)),   # the seed network's conv1 output (cropped batch)
    (1, 7, 9, 5, (3, 3), (2, 2), (1, 1)),      # batch 1, odd sizes, overlapping, padding
    (3, 5, 6, 3, (3, 2), (2, 3), (1, 0)),      # overlap vertically, gaps horizontally
    (2, 8, 7, 17, (2, 2), (3, 3), (1, 1)),     # gaps between windows, padding, leftover edge
    (2, 6, 6, 4, (3, 3), (1, 1), (1, 1)),      # heavy overlap
    (2, 5, 5, 2, (2, 2), (2, 1), (0, 0)),      # overlap horizontally only (row-band units)
    (2, 5, 5, 2, (2, 2), (1, 2), (0, 0)),      # overlap vertically only (whole-image units)
    (1, 4, 4, 16, (4, 4), (4, 4), (2, 2)),     # windows half padding
    (2, 11, 11, 64, (2, 2), (2, 2), (0, 0)),   # conv2 output: odd size, a row and column left over
    (3, 5, 8, 7, (2, 2), (2, 2), (0, 0)),      # 2x2: odd height only
]
# Without the JIT: the geometries of fewer than 2000 values.
GEOMETRIES = ALL_GEOMETRIES if JIT else [g for g in ALL_GEOMETRIES if g[0] * g[1] * g[2] * g[3] < 2000]
KINDS = ["normal", "integer", "negative"]


def geometry_id(g):
    n, h, w, c, p, s, pad = g
    return f"{n}x{h}x{w}x{c}-p{p[0]}{p[1]}-s{s[0]}{s[1]}-pad{pad[0]}{pad[1]}"


def make_input(kind, shape, dtype, rng):
    if kind == "normal":
        x = rng.normal(size=shape)
        # Some all-negative windows among the others.
        x[..., ::3] = -np.abs(x[..., ::3]) - 0.1
    elif kind == "integer":   # ties, exact zeros
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
    else:                     # nothing positive at all
        x = -np.abs(rng.normal(size=shape))
        x[(0,) * (x.ndim - 1)] = 0.0
    return x.astype(dtype)


def out_shape(g):
    n, h, w, c, p, s, pad = g
    return (n, window_output_size(h, p[0], s[0], pad[0], pad[0]), window_output_size(w, p[1], s[1], pad[1], pad[1]), c)


def pool_args(g):
    _, _, _, _, p, s, pad = g
    return (p[0], p[1], s[0], s[1], pad[0], pad[1])


def unfused_pool(a, g):
    y = np.empty(out_shape(g), a.dtype)
    am = np.empty(y.shape, np.int32)
    pool.maxpool2d_forward(a, y, am, *pool_args(g))
    return y, am


def unfused_pool_backward(dy, am, shape):
    d = np.empty(shape, dy.dtype)
    pool.maxpool2d_backward(dy, am, d)
    return d


def tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-12


def assert_close(a, b, dtype, what):
    """Within rounding (relative to the largest magnitude: sums of mixed signs)."""
    assert a.dtype == b.dtype
    r = tol(dtype)
    np.testing.assert_allclose(a, b, rtol=r, atol=r * max(float(np.max(np.abs(b))), 1e-30), err_msg=what)


# ---------------------------------------------------------------------------
# ReLU + max-pool, leaky ReLU + max-pool
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g", GEOMETRIES, ids=geometry_id)
def test_relu_maxpool_equals_relu_then_maxpool(g, kind, dtype, rng):
    x = make_input(kind, g[:4], dtype, rng)
    r = np.empty_like(x)
    activation.relu_forward(x.reshape(-1), r.reshape(-1))
    y_ref, am_ref = unfused_pool(r, g)
    dy = rng.normal(size=y_ref.shape).astype(dtype)
    dr = unfused_pool_backward(dy, am_ref, x.shape)
    dx_ref = np.empty_like(x)
    activation.relu_backward(x.reshape(-1), dr.reshape(-1), dx_ref.reshape(-1))

    y = np.full(y_ref.shape, np.nan, dtype)
    am = np.full(y_ref.shape, 12345, np.int32)
    fused.relu_maxpool2d_forward(x, y, am, *pool_args(g))
    assert np.array_equal(y, y_ref)
    # Same winner wherever it is positive; elsewhere -1 (nothing to route).
    pos = y_ref > 0
    assert np.array_equal(am[pos], am_ref[pos])
    assert np.all(am[~pos] == -1)
    dx = np.full(x.shape, np.nan, dtype)
    pool.maxpool2d_backward(dy, am, dx)  # the MaxPool2D layer's backward routes the codes
    assert dx.dtype == dtype
    assert np.array_equal(dx, dx_ref)
    if kind == "negative":
        assert not np.any(dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slope", [0.01, 0.3, 0.0])
@pytest.mark.parametrize("g", [g for g in GEOMETRIES if g[5][0] >= g[4][0] and g[5][1] >= g[4][1]],
                         ids=geometry_id)
def test_leaky_relu_maxpool_equals_leaky_relu_then_maxpool(g, slope, kind, dtype, rng):
    # Non-overlapping windows only: what the planner fuses.
    x = make_input(kind, g[:4], dtype, rng)
    s = dtype(slope)
    a = np.empty_like(x)
    activation.leaky_relu_forward(x.reshape(-1), s, a.reshape(-1))
    y_ref, am_ref = unfused_pool(a, g)
    dy = rng.normal(size=y_ref.shape).astype(dtype)
    da = unfused_pool_backward(dy, am_ref, x.shape)
    dx_ref = np.empty_like(x)
    activation.leaky_relu_backward(x.reshape(-1), da.reshape(-1), s, dx_ref.reshape(-1))

    y = np.full(y_ref.shape, np.nan, dtype)
    am = np.full(y_ref.shape, 12345, np.int32)
    fused.leaky_relu_maxpool2d_forward(x, s, y, am, *pool_args(g))
    assert np.array_equal(y, y_ref)
    decoded = np.where(am <= -2, -2 - am, am)
    assert np.array_equal(decoded, am_ref)
    dx = np.full(x.shape, np.nan, dtype)
    fused.leaky_relu_maxpool2d_backward(dy, am, s, dx)
    assert np.array_equal(dx, dx_ref)


def test_route_backward_accumulates_overlapping_windows_in_order(rng):
    # Values chosen so that the order of the additions shows in float32.
    g = (1, 3, 3, 1, (2, 2), (1, 1), (0, 0))
    x = np.zeros((1, 3, 3, 1), np.float32)
    x[0, 1, 1, 0] = 5.0   # the winner of all four windows
    y = np.empty((1, 2, 2, 1), np.float32)
    am = np.empty(y.shape, np.int32)
    fused.relu_maxpool2d_forward(x, y, am, *pool_args(g))
    assert np.all(am == 4)
    dy = np.array([1e8, 1.0, -1e8, 1.0], np.float32).reshape(y.shape)
    dx = np.empty_like(x)
    pool.maxpool2d_backward(dy, am, dx)
    r = np.empty_like(x)
    activation.relu_forward(x.reshape(-1), r.reshape(-1))
    _, am_ref = unfused_pool(r, g)
    dx_ref = unfused_pool_backward(dy, am_ref, x.shape)
    assert dx[0, 1, 1, 0] == dx_ref[0, 1, 1, 0]


# ---------------------------------------------------------------------------
# Batch norm + ReLU (+ max-pool)
# ---------------------------------------------------------------------------

def bn_params(c, dtype, rng, kind):
    gamma = rng.normal(size=c)
    beta = rng.normal(size=c) * 0.5
    gamma[::4] = -np.abs(gamma[::4])           # negative gamma: the max of z is at the min of x
    if c > 2:
        gamma[1], beta[1] = 0.0, 0.0           # z == 0 everywhere: ReLU gradient 0, no winner
    if kind == "negative":
        beta[:] = -10.0                        # every z < 0
    return gamma.astype(dtype), beta.astype(dtype)


def unfused_bn_train(x2, gamma, beta, dtype):
    """The BatchNorm layer's training forward: statistics, invstd, the normalize pass."""
    c = x2.shape[1]
    y = np.empty_like(x2)
    invstd, scale = (np.empty(c, dtype) for _ in range(2))
    mean, var = statistics(x2, row_bounds(x2.shape[0]))
    invstd_and_scale(gamma, var, dtype(1e-5), invstd, scale)
    norm.batchnorm_forward(x2, mean, scale, beta, y)
    return y, mean, var, invstd


BN_SHAPES = [(64 * 13 * 13, 32), (3 * 7 * 9, 5), (2, 17), (300, 64), (513, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES if JIT else BN_SHAPES[1:3])
def test_batchnorm_statistics_and_invstd(shape, dtype, rng):
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    gamma, _ = bn_params(shape[1], dtype, rng, "normal")
    mean, var = statistics(x, row_bounds(shape[0]))
    x64 = x.astype(np.float64)
    r = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=r, atol=r)
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=10 * r)
    # invstd is correctly rounded (computed in NumPy, not in a fastmath kernel).
    invstd, scale = np.empty(shape[1], dtype), np.empty(shape[1], dtype)
    invstd_and_scale(gamma, var, dtype(1e-5), invstd, scale)
    expected = (1 / np.sqrt(var.astype(np.float64) + np.float64(dtype(1e-5)))).astype(dtype)
    np.testing.assert_array_max_ulp(invstd, expected, maxulp=1)
    assert np.array_equal(scale, gamma * invstd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 26, 26, 32), (1, 5, 7, 3), (4, 3, 3, 17), (64, 10)][0 if JIT else 1:])
def test_batchnorm_relu_equals_batchnorm_then_relu(shape, kind, dtype, rng):
    c = shape[-1]
    x = make_input(kind, shape, dtype, rng).reshape(-1, c)
    gamma, beta = bn_params(c, dtype, rng, kind)
    z, mean, var, invstd = unfused_bn_train(x, gamma, beta, dtype)
    y_ref = np.empty_like(z)
    activation.relu_forward(z.reshape(-1), y_ref.reshape(-1))
    dy = rng.normal(size=x.shape).astype(dtype)
    dz = np.empty_like(z)
    activation.relu_backward(z.reshape(-1), dy.reshape(-1), dz.reshape(-1))
    dx_ref, dgamma_ref, dbeta_ref = bn_backward(x, dz, gamma, mean, invstd)

    # The same statistics and invstd: every result is bit-identical (same arithmetic, same
    # chunked sums in the same order).
    scale = gamma * invstd
    y = np.full_like(x, np.nan)
    fused.batchnorm_relu_forward(x, mean, scale, beta, y)
    assert np.array_equal(y, y_ref)
    bounds = row_bounds(x.shape[0])
    part_b, part_g = (np.full((len(bounds) - 1, c), np.nan, dtype) for _ in range(2))
    fused.batchnorm_relu_backward_reduce(x, dy, mean, scale, beta, bounds, part_b, part_g)
    dbeta = fold_into(part_b, np.empty(c, dtype))
    dgamma = fold_into(part_g, np.empty(c, dtype)) * invstd
    assert np.array_equal(dbeta, dbeta_ref)
    assert np.array_equal(dgamma, dgamma_ref)
    dx = np.full_like(x, np.nan)
    fused.batchnorm_relu_backward_dx(x, dy, mean, scale, beta,
                                     *norm.dx_coefficients(gamma, invstd, dgamma, dbeta, x.shape[0]), dx)
    assert np.array_equal(dx, dx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g", GEOMETRIES, ids=geometry_id)
def test_batchnorm_relu_maxpool_equals_the_three_layers(g, kind, dtype, rng):
    shape = g[:4]
    c = shape[3]
    x = make_input(kind, shape, dtype, rng)
    gamma, beta = bn_params(c, dtype, rng, kind)
    z2, mean, var, invstd = unfused_bn_train(x.reshape(-1, c), gamma, beta, dtype)
    r = np.empty_like(x)
    activation.relu_forward(z2.reshape(-1), r.reshape(-1))
    y_ref, am_ref = unfused_pool(r, g)
    dy = rng.normal(size=y_ref.shape).astype(dtype)
    dr = unfused_pool_backward(dy, am_ref, x.shape)
    dz = np.empty_like(x)
    activation.relu_backward(z2.reshape(-1), dr.reshape(-1), dz.reshape(-1))
    dx_ref, dgamma_ref, dbeta_ref = bn_backward(x.reshape(-1, c), dz.reshape(-1, c), gamma, mean, invstd)
    dx_ref = dx_ref.reshape(x.shape)

    scale = gamma * invstd
    y = np.full(y_ref.shape, np.nan, dtype)
    am = np.full(y_ref.shape, 12345, np.int32)
    xsel = np.full(y_ref.shape, np.nan, dtype)
    fused.batchnorm_relu_maxpool2d_forward(x, mean, scale, beta, y, am, xsel, True, *pool_args(g))
    assert np.array_equal(y, y_ref)
    pos = y_ref > 0
    assert np.array_equal(am[pos], am_ref[pos])
    assert np.all(am[~pos] == -1)
    flat = x.reshape(x.shape[0], -1, c)
    n_idx, _, _, c_idx = np.nonzero(pos)
    assert np.array_equal(xsel[pos], flat[n_idx, am[pos], c_idx] - mean[c_idx])

    # Evaluation mode (store=False): the same output, argmax/xsel untouched.
    y_eval = np.full(y_ref.shape, np.nan, dtype)
    dummy_am = np.zeros((1, 1, 1, 1), np.int32)
    dummy_sel = np.zeros((1, 1, 1, 1), dtype)
    fused.batchnorm_relu_maxpool2d_forward(x, mean, scale, beta, y_eval, dummy_am, dummy_sel, False,
                                           *pool_args(g))
    assert np.array_equal(y_eval, y_ref)

    bounds = row_bounds(y_ref.size // c)
    part_b, part_g = (np.full((len(bounds) - 1, c), np.nan, dtype) for _ in range(2))
    fused.pooled_batchnorm_reduce(dy.reshape(-1, c), am.reshape(-1, c), xsel.reshape(-1, c), bounds, part_b, part_g)
    dbeta = fold_into(part_b, np.empty(c, dtype))
    dgamma = fold_into(part_g, np.empty(c, dtype)) * invstd
    # The reductions add the winners' terms in pooled order (and, with overlapping
    # windows, dy1*d + dy2*d for (dy1 + dy2)*d): equal within rounding.
    assert_close(dbeta, dbeta_ref, dtype, "dbeta")
    assert_close(dgamma, dgamma_ref, dtype, "dgamma")
    if kind == "negative":
        assert not np.any(dbeta) and not np.any(dgamma)
    dx = np.full(x.shape, np.nan, dtype)
    m = x.size // c
    fused.batchnorm_relu_maxpool2d_backward_dx(x, dy, am, mean, *norm.dx_coefficients(gamma, invstd, dgamma, dbeta, m),
                                               dx)
    assert_close(dx, dx_ref, dtype, "dx")
    # With the reference's own dgamma/dbeta the dx pass is bit-identical (same routed
    # gradient, added in the same order, same formula).
    fused.batchnorm_relu_maxpool2d_backward_dx(x, dy, am, mean,
                                               *norm.dx_coefficients(gamma, invstd, dgamma_ref, dbeta_ref, m), dx)
    assert np.array_equal(dx, dx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_eval_forward(dtype, rng):
    c = 32
    x = rng.normal(size=(50, c)).astype(dtype)
    gamma, beta = bn_params(c, dtype, rng, "normal")
    rm = rng.normal(size=c).astype(dtype)
    rv = (rng.random(c) + 0.5).astype(dtype)
    invstd, scale = np.empty(c, dtype), np.empty(c, dtype)
    invstd_and_scale(gamma, rv, dtype(1e-5), invstd, scale)
    y = np.empty_like(x)
    fused.batchnorm_relu_forward(x, rm, scale, beta, y)
    z_ref = np.empty_like(x)
    norm.batchnorm_forward(x, rm, scale, beta, z_ref)  # the layer's evaluation forward
    r_ref = np.empty_like(x)
    activation.relu_forward(z_ref.reshape(-1), r_ref.reshape(-1))
    assert np.array_equal(y, r_ref)
    assert_close(z_ref, ((x - rm) / np.sqrt(rv + dtype(1e-5)) * gamma + beta).astype(dtype), dtype, "eval")
