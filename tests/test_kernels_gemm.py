"""Tests of the GEMM shared by the conv and dense kernels (fastcnn.kernels.gemm).

``gemm`` (the cfunc-backed intrinsic, called from an @njit wrapper) and
``gemm_numpy`` (its NumPy version, what ``gemm`` is under NUMBA_DISABLE_JIT)
against a float64 reference built by index arithmetic straight from the
definition, on random strided problems: every tile shape (rows 1..13 around
the MR = 6 tile, column vectors 1..2*NB+2 around the NB-vector block), overlapping segments (as the
conv kernels read them), transposed A, offsets, arrays of any shape.

The file also passes under NUMBA_DISABLE_JIT=1: the @njit wrapper is then
plain Python and ``gemm`` is ``gemm_numpy``.
"""
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from numba import njit

from fastcnn.kernels import gemm as G

DTYPES = [np.float32, np.float64]
# The bit-for-bit tests are about the jitted gemm's summation order; under NUMBA_DISABLE_JIT gemm is
# gemm_numpy, whose sums go in NumPy's order.
jit_only = pytest.mark.skipif(G.DISABLE_JIT, reason="NUMBA_DISABLE_JIT: gemm is gemm_numpy (NumPy's summation order)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@njit
def _gemm_jit(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV):
    G.gemm(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV)


def _vl(dtype):
    return G.VBYTES // np.dtype(dtype).itemsize


def _problem(rng, dtype, M=None, K=None, S=None, NV=None):
    """A random strided problem: (C, args...) with every index inside its array."""
    M = int(rng.integers(1, 14)) if M is None else M
    K = int(rng.integers(1, 9)) if K is None else K
    S = int(rng.integers(1, 4)) if S is None else S
    NV = int(rng.integers(1, 6)) if NV is None else NV
    N = NV * _vl(dtype)
    layout = rng.integers(0, 3)
    if layout == 0:      # A rows (i) contiguous in k, like x read in place by the forward
        ldk, lda = 1, K + int(rng.integers(0, 4))
    elif layout == 1:    # transposed A (i contiguous), like the weight gradient's x
        lda, ldk = 1, M + int(rng.integers(0, 4))
    else:                # strided both ways
        lda, ldk = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    # segments may overlap (conv: kernel rows shifted by one image row)
    sa = int(rng.integers(0, M * lda + K * ldk + 2))
    ldb = N + int(rng.integers(-N + 1, 9)) if rng.random() < 0.3 else N + int(rng.integers(0, 9))
    sb = int(rng.integers(0, K * ldb + 2))
    ldc = N + int(rng.integers(0, 9))
    a_off, b_off, c_off = (int(rng.integers(0, 7)) for _ in range(3))
    a_size = a_off + (S - 1) * sa + (M - 1) * lda + (K - 1) * ldk + 1 + int(rng.integers(0, 5))
    b_size = b_off + (S - 1) * sb + (K - 1) * ldb + N + int(rng.integers(0, 5))
    c_size = c_off + (M - 1) * ldc + N + int(rng.integers(0, 5))
    A = rng.uniform(-1, 1, a_size).astype(dtype)
    B = rng.uniform(-1, 1, b_size).astype(dtype)
    C = rng.uniform(-1, 1, c_size).astype(dtype)
    return C, (c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV)


def _reference(C, args):
    """(expected C in float64, mask of the C elements the product writes)."""
    c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV = args
    N = NV * _vl(C.dtype)
    s = np.arange(S)[:, None, None]
    i = np.arange(M)[None, :, None]
    k = np.arange(K)[None, None, :]
    a = A.reshape(-1).astype(np.float64)[a_off + s * sa + i * lda + k * ldk]                  # (S, M, K)
    kk = np.arange(K)[None, :, None]
    j = np.arange(N)[None, None, :]
    b = B.reshape(-1).astype(np.float64)[b_off + s * sb + kk * ldb + j]                       # (S, K, N)
    cidx = c_off + np.arange(M)[:, None] * ldc + np.arange(N)[None, :]                        # (M, N)
    expected = C.reshape(-1).astype(np.float64).copy()
    expected[cidx] += np.einsum("smk,skn->mn", a, b)
    mask = np.zeros(C.size, bool)
    mask[cidx] = True
    return expected.reshape(C.shape), mask.reshape(C.shape)


def _check(fn, C, args):
    expected, mask = _reference(C, args)
    before = C.copy()
    fn(C, *args)
    K, S = args[9], args[10]
    if C.dtype == np.float32:
        tol = dict(rtol=1e-5, atol=1e-6 * K * S)
    else:
        tol = dict(rtol=1e-13, atol=1e-14 * K * S)
    np.testing.assert_allclose(C[mask], expected[mask], **tol)
    np.testing.assert_array_equal(C[~mask], before[~mask])  # nothing else written


def _jit(C, *args):
    G.ensure_gemm(C.dtype)
    _gemm_jit(C, *args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [_jit, G.gemm_numpy], ids=["gemm", "gemm_numpy"])
def test_random_strided_problems_match_reference(fn, dtype):
    rng = np.random.default_rng(0)
    for _ in range(60):
        C, args = _problem(rng, dtype)
        _check(fn, C, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [_jit, G.gemm_numpy], ids=["gemm", "gemm_numpy"])
def test_every_tile_shape(fn, dtype):
    # rows around the MR-row tile (full tiles, remainders 1..5, the last 7 or 8 rows as 4 + 3 or
    # 4 + 4 with AVX2, 4-row tiles and 3 + 2 or 3 + 3 in 3-vector blocks), column vectors 1..2*NB+2
    # (the blocks of NB, 3, 2 and 1 vectors, the last 4 as 2 + 2 with AVX2).
    rng = np.random.default_rng(1)
    for M in range(1, 2 * G.MR + 3):
        for NV in range(1, 2 * G.NB + 3):
            C, args = _problem(rng, dtype, M=M, NV=NV, K=int(rng.integers(1, 5)), S=int(rng.integers(1, 3)))
            _check(fn, C, args)


@jit_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_tiles_never_change_the_bits(dtype):
    """Each C element is summed in one order (segments, then k) whatever tile its row falls in: a
    product of M rows equals, bit for bit, its rows computed one at a time (1-row tiles)."""
    rng = np.random.default_rng(2)
    for M in range(1, 2 * G.MR + 3):
        C, args = _problem(rng, dtype, M=M, NV=int(rng.integers(1, 2 * G.NV + 2)), K=int(rng.integers(1, 40)),
                           S=int(rng.integers(1, 3)))
        c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, _, NV = args
        one_by_one = C.copy()
        _jit(C, *args)
        for i in range(M):
            _jit(one_by_one, c_off + i * ldc, ldc, A, a_off + i * lda, lda, ldk, B, b_off, ldb, K, S, sa, sb, 1, NV)
        assert C.tobytes() == one_by_one.tobytes(), M


@jit_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_blocks_never_change_the_bits(dtype):
    """Each column is summed in one order whatever column block (NB, 3, 2 or 1 vectors) it falls in:
    a product of NV vectors equals, bit for bit, its vectors computed one at a time."""
    rng = np.random.default_rng(3)
    vl = _vl(dtype)
    for NV in range(1, 3 * G.NB + 2):
        C, args = _problem(rng, dtype, M=int(rng.integers(1, 2 * G.MR + 3)), NV=NV, K=int(rng.integers(1, 40)),
                           S=int(rng.integers(1, 3)))
        c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, _ = args
        one_by_one = C.copy()
        _jit(C, *args)
        for j in range(NV):
            _jit(one_by_one, c_off + j * vl, ldc, A, a_off, lda, ldk, B, b_off + j * vl, ldb, K, S, sa, sb, M, 1)
        assert C.tobytes() == one_by_one.tobytes(), NV


@pytest.mark.parametrize("fn", [_jit, G.gemm_numpy], ids=["gemm", "gemm_numpy"])
def test_arrays_of_any_shape_indexed_flat(fn):
    # C, A, B as 2-D / 3-D C-contiguous arrays: offsets count from the first element.
    rng = np.random.default_rng(2)
    vl = _vl(np.float32)
    C = rng.standard_normal((5, 2 * vl)).astype(np.float32)
    A = rng.standard_normal((5, 3, 4)).astype(np.float32)
    B = rng.standard_normal((12, 2 * vl)).astype(np.float32)
    args = (0, 2 * vl, A, 0, 12, 1, B, 0, 2 * vl, 12, 1, 0, 0, 5, 2)
    expected = C.astype(np.float64) + A.reshape(5, 12).astype(np.float64) @ B.astype(np.float64)
    fn(C, *args)
    np.testing.assert_allclose(C, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [_jit, G.gemm_numpy], ids=["gemm", "gemm_numpy"])
@pytest.mark.parametrize("empty", ["K", "S", "M"])
def test_empty_problem_writes_nothing(fn, empty):
    rng = np.random.default_rng(3)
    C, args = _problem(rng, np.float64, M=3, K=2, S=2, NV=1)
    args = list(args)
    args[{"K": 9, "S": 10, "M": 13}[empty]] = 0
    before = C.copy()
    fn(C, *args)
    np.testing.assert_array_equal(C, before)


def test_gemm_numpy_is_computed_in_the_dtype():
    # float32 inputs: float32 products (as the microkernel), not float64 rounded at the end.
    rng = np.random.default_rng(4)
    vl = _vl(np.float32)
    A = rng.standard_normal(64 * 64).astype(np.float32)
    B = rng.standard_normal(64 * vl).astype(np.float32)
    C = np.zeros(64 * vl, np.float32)
    G.gemm_numpy(C, 0, vl, A, 0, 64, 1, B, 0, vl, 64, 1, 0, 0, 64, 1)
    exact = (A.reshape(64, 64).astype(np.float64) @ B.reshape(64, vl).astype(np.float64)).reshape(-1)
    assert C.dtype == np.float32
    np.testing.assert_allclose(C, exact, rtol=1e-4, atol=1e-4)
    assert np.mean(C != exact.astype(np.float32)) > 0.05


def test_gemm_numpy_checks_bounds_and_arguments():
    vl = _vl(np.float64)
    A = np.ones(8)
    B = np.ones(4 * vl)
    C = np.zeros(2 * vl)
    G.gemm_numpy(C, 0, vl, A, 0, 4, 1, B, 0, vl, 4, 1, 0, 0, 2, 1)   # the largest problem that fits
    np.testing.assert_array_equal(C, 4.0)
    with pytest.raises(IndexError, match="A"):
        G.gemm_numpy(C, 0, vl, A, 1, 4, 1, B, 0, vl, 4, 1, 0, 0, 2, 1)
    with pytest.raises(IndexError, match="B"):
        G.gemm_numpy(C, 0, vl, A, 0, 4, 1, B, 1, vl, 4, 1, 0, 0, 2, 1)
    with pytest.raises(IndexError, match="C"):
        G.gemm_numpy(C, 0, vl, A, 0, 4, 1, B, 0, vl, 4, 1, 0, 0, 2, 2)
    with pytest.raises(IndexError, match="A"):
        G.gemm_numpy(C, 0, vl, A, 0, 4, 1, B, 0, vl, 4, 2, 4, 0, 2, 1)  # a second segment past A's end
    with pytest.raises(TypeError):
        G.gemm_numpy(C, 0, vl, A.astype(np.float32), 0, 4, 1, B, 0, vl, 4, 1, 0, 0, 2, 1)
    with pytest.raises(ValueError, match="contiguous"):
        G.gemm_numpy(np.zeros((2 * vl, 2))[:, 0], 0, vl, A, 0, 4, 1, B, 0, vl, 4, 1, 0, 0, 2, 1)


def test_ensure_gemm_rejects_other_dtypes():
    for dtype in (np.float32, np.float64):
        G.ensure_gemm(dtype)
        G.ensure_gemm(dtype)  # idempotent
    with pytest.raises(TypeError, match="float32 and float64"):
        G.ensure_gemm(np.int32)
    with pytest.raises(TypeError, match="float32 and float64"):
        G.ensure_gemm(np.float16)


def test_constants_and_mode():
    assert G.VBYTES in (32, 64)
    assert G.NV == (4 if G.VBYTES == 64 else 2)
    assert G.MR == 6
    assert G.DISABLE_JIT == bool(numba.config.DISABLE_JIT)
    assert (G.gemm is G.gemm_numpy) == G.DISABLE_JIT


def test_helpers():
    a = np.arange(10, dtype=np.float32)
    b = np.zeros(7, np.float32)
    G.copy_vector(b, a)
    np.testing.assert_array_equal(b, a[:7])
    G.fill(b[2:5], np.float32(-1))
    np.testing.assert_array_equal(b, [0, 1, -1, -1, -1, 5, 6])
    opts = G.prange_only()
    assert opts["prange"] is True and not any(v for k, v in opts.items() if k != "prange")
    assert G.prange_only() is not opts  # a fresh dict per use (Numba pops the keys it reads)


_DISABLE_JIT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from fastcnn.kernels import conv, dense, gemm
    assert gemm.DISABLE_JIT and gemm.gemm is gemm.gemm_numpy
    rng = np.random.default_rng(0)
    out = {}
    # conv: im2col forward, direct forward (KW*Cin >= 32) with padding, stride 2 + dilation, 1x1 (products
    # over several output rows; the weight gradient's row items over pixels of several images)
    for name, (N, H, W, Cin, Cout, KH, KW, sh, sw, pt, pl, dh, dw) in {
            "a": (2, 7, 8, 3, 5, 3, 3, 1, 1, 0, 0, 1, 1),
            "b": (2, 7, 8, 16, 20, 3, 3, 1, 1, 1, 1, 1, 1),
            "c": (2, 9, 10, 4, 8, 3, 2, 2, 2, 1, 0, 2, 1),
            "d": (3, 5, 6, 80, 10, 1, 1, 1, 1, 0, 0, 1, 1)}.items():
        x = rng.standard_normal((N, H, W, Cin))
        w = rng.standard_normal((KH, KW, Cin, Cout))
        b = rng.standard_normal(Cout)
        OH = (H + 2 * pt - dh * (KH - 1) - 1) // sh + 1
        OW = (W + 2 * pl - dw * (KW - 1) - 1) // sw + 1
        args = (sh, sw, pt, pl, dh, dw)
        y = np.empty((N, OH, OW, Cout)); conv.conv2d_forward(x, w, b, y, *args)
        dy = rng.standard_normal(y.shape)
        dx = np.empty_like(x); conv.conv2d_backward_input(dy, w, dx, *args)
        gw = np.empty_like(w); gb = np.empty_like(b); conv.conv2d_backward_weight(x, dy, gw, gb, *args)
        out.update({name + k: v for k, v in dict(x=x, w=w, b=b, dy=dy, y=y, dx=dx, gw=gw, gb=gb).items()})
    x = rng.standard_normal((5, 20)); w = rng.standard_normal((20, 16)); b = rng.standard_normal(16)
    y = np.empty((5, 16)); dense.dense_forward(x, w, b, y)
    out.update(dx_=x, dw_=w, db_=b, dy_=y)
    np.savez(sys.argv[1], **out)
""")


def test_conv_and_dense_kernels_run_under_disable_jit(tmp_path):
    """The kernels as plain Python (NUMBA_DISABLE_JIT=1, gemm_numpy) give the compiled kernels' results."""
    from fastcnn.kernels import conv, dense

    script = tmp_path / "nojit.py"
    script.write_text(_DISABLE_JIT_SCRIPT)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "out.npz")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "out.npz")
    tol = dict(rtol=1e-10, atol=1e-10)
    for name, (sh, sw, pt, pl, dh, dw) in {"a": (1, 1, 0, 0, 1, 1), "b": (1, 1, 1, 1, 1, 1),
                                           "c": (2, 2, 1, 0, 2, 1), "d": (1, 1, 0, 0, 1, 1)}.items():
        x, w, b, dy = (got[name + k] for k in ("x", "w", "b", "dy"))
        args = (sh, sw, pt, pl, dh, dw)
        y = np.empty_like(got[name + "y"])
        conv.conv2d_forward(x, w, b, y, *args)
        dx = np.empty_like(x)
        conv.conv2d_backward_input(dy, w, dx, *args)
        gw = np.empty_like(w)
        gb = np.empty_like(b)
        conv.conv2d_backward_weight(x, dy, gw, gb, *args)
        for key, val in dict(y=y, dx=dx, gw=gw, gb=gb).items():
            np.testing.assert_allclose(got[name + key], val, err_msg=name + key, **tol)
    y = np.empty((5, 16))
    dense.dense_forward(got["dx_"], got["dw_"], got["db_"], y)
    np.testing.assert_allclose(got["dy_"], y, **tol)
