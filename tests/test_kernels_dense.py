"""Tests of the dense kernels (fastcnn.kernels.dense) against NumPy, central differences and torch.

Also passes under NUMBA_DISABLE_JIT=1 (the kernels run as Python with
fastcnn.kernels.gemm's NumPy product), with the same shapes.
"""
import numpy as np
import pytest

from fastcnn.kernels import dense as K
from fastcnn.kernels import reference as R

from conftest import numerical_grad as central_differences

DTYPES = [np.float32, np.float64]
# (N, I, O): batch sizes around the row block (4), 1, the seed net's dense2
SHAPES = [(1, 3, 2), (4, 5, 7), (5, 9, 3), (7, 16, 33), (64, 128, 10), (3, 1, 1)]


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f(x) at x (float64)."""
    return central_differences(lambda: f(x), x, eps)


def forward(x, w, b):
    y = np.full((x.shape[0], w.shape[1]), np.nan, dtype=x.dtype)
    K.dense_forward(x, w, b, y)
    return y


def backward(x, w, dy):
    dx = np.full_like(x, np.nan)
    dw = np.full_like(w, np.nan)
    db = np.full(w.shape[1], np.nan, dtype=w.dtype)
    K.dense_backward_input(dy, w, dx)
    K.dense_backward_weight(x, dy, dw, db)
    return dx, dw, db


def data(rng, shape, dtype):
    N, I, O = shape
    x = rng.standard_normal((N, I)).astype(dtype)
    w = rng.standard_normal((I, O)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype)
    dy = rng.standard_normal((N, O)).astype(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(dtype, shape):
    rng = np.random.default_rng(0)
    x, w, b, dy = data(rng, shape, dtype)
    y = forward(x, w, b)
    dx, dw, db = backward(x, w, dy)
    for a in (y, dx, dw, db):
        assert a.dtype == dtype
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    d = lambda a: a.astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(y, R.dense_forward(d(x), d(w), d(b)), **t)
    np.testing.assert_allclose(dx, R.dense_backward_input(d(dy), d(w)), **t)
    dw_ref, db_ref = R.dense_backward_weight(d(x), d(dy))
    np.testing.assert_allclose(dw, dw_ref, **t)
    np.testing.assert_allclose(db, db_ref, **t)


def test_seed_shape_float32():
    rng = np.random.default_rng(1)
    x, w, b, dy = data(rng, (64, 1600, 128), np.float32)
    y = forward(x, w, b)
    dx, dw, db = backward(x, w, dy)
    d = lambda a: a.astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(y, R.dense_forward(d(x), d(w), d(b)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dx, R.dense_backward_input(d(dy), d(w)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dw, R.dense_backward_weight(d(x), d(dy))[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape", [(5, 4, 3), (1, 3, 2)])
def test_gradient_check(shape):
    rng = np.random.default_rng(2)
    x, w, b, G = data(rng, shape, np.float64)
    dx, dw, db = backward(x, w, G)
    tol = {"rtol": 1e-6, "atol": 1e-8}
    np.testing.assert_allclose(dx, numerical_grad(lambda x: float(np.sum(forward(x, w, b) * G)), x), **tol)
    np.testing.assert_allclose(dw, numerical_grad(lambda w: float(np.sum(forward(x, w, b) * G)), w), **tol)
    np.testing.assert_allclose(db, numerical_grad(lambda b: float(np.sum(forward(x, w, b) * G)), b), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x, w, b, G = data(rng, (6, 20, 9), dtype)
    y = forward(x, w, b)
    dx, dw, db = backward(x, w, G)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w.T.copy(), requires_grad=True)  # torch stores (out, in)
    bt = torch.tensor(b, requires_grad=True)
    yt = torch.nn.functional.linear(xt, wt, bt)
    (yt * torch.tensor(G)).sum().backward()
    t = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, yt.detach().numpy(), **t)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **t)
    np.testing.assert_allclose(dw, wt.grad.numpy().T, **t)
    np.testing.assert_allclose(db, bt.grad.numpy(), **t)


@pytest.mark.parametrize("shape", [(64, 1600, 128), (7, 100, 32), (70, 50, 10)])
def test_deterministic_across_thread_counts(shape):
    """Each output element is computed by one thread in a fixed order (GEMM and loop paths)."""
    import numba

    rng = np.random.default_rng(4)
    x, w, b, dy = data(rng, shape, np.float32)
    results = []
    old = numba.get_num_threads()
    try:
        for threads in sorted({1, old}):
            numba.set_num_threads(threads)
            for _ in range(2):
                results.append((forward(x, w, b), *backward(x, w, dy)))
    finally:
        numba.set_num_threads(old)
    for r in results[1:]:
        for a, a0 in zip(r, results[0]):
            np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_in, n_out", [(100, 128), (37, 10), (300, 32)])
def test_weight_gradient_by_chunks_equals_separate_calls_added_in_order(dtype, n_in, n_out):
    """With chunk bounds (fastcnn/shard.py) the kernel gives, bit for bit, the chunks' results of
    separate calls added in chunk order: what a process holding only some chunks computes."""
    from fastcnn.shard import fold_into

    rng = np.random.default_rng(3)
    n = 53
    x = rng.standard_normal((n, n_in)).astype(dtype)
    dy = rng.standard_normal((n, n_out)).astype(dtype)
    bounds = np.array([0, 7, 14, 20, 27, 33, 40, 46, 53], dtype=np.int64)
    dw, db = np.full((n_in, n_out), np.nan, dtype), np.full(n_out, np.nan, dtype)
    K.dense_backward_weight(x, dy, dw, db, bounds)
    parts_w = np.empty((8, n_in, n_out), dtype)
    parts_b = np.empty((8, n_out), dtype)
    for g in range(8):
        s = slice(bounds[g], bounds[g + 1])
        K.dense_backward_weight(x[s], dy[s], parts_w[g], parts_b[g])
    assert dw.tobytes() == fold_into(parts_w, np.empty_like(dw)).tobytes()
    assert db.tobytes() == fold_into(parts_b, np.empty_like(db)).tobytes()
    np.testing.assert_allclose(dw, x.astype(np.float64).T @ dy, rtol=1e-4, atol=1e-4)
