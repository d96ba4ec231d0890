"""Tests of the depthwise and grouped convolution kernels (fastcnn.kernels.depthwise).

Checked against the plain NumPy references (fastcnn.kernels.reference_conv: the depthwise ones,
written element-wise along the channels, and the grouped ones, which split the channels and run the
plain conv references), and against PyTorch's grouped conv2d where torch is importable.

Both paths of every kernel are covered, on any machine: the register tiles (channel multiplier 1,
channels a multiple of the SIMD vector length: the cases use multiples of 16, whole vectors for
float32 and float64 with AVX2 or AVX-512) and the runs (a channel multiplier, or channels such as 3
or 5). Outputs start as NaN, so a slot the kernel forgets shows.

Also passes under NUMBA_DISABLE_JIT=1 (the kernels run as Python with NumPy versions of the tile and
run helpers); the random sweep is shorter there. Thread-count determinism: tests/test_determinism.py.
"""
import numba
import numpy as np
import pytest

from fastcnn.kernels import conv
from fastcnn.kernels import depthwise as D
from fastcnn.kernels import reference_conv as ref
from fastcnn.shapes import same_padding, window_output_size

# (N, H, W, C, m, (KH, KW), (sh, sw), (top, bottom, left, right), (dh, dw))
CASES = {
    # register tiles (m 1, C a multiple of 16)
    "tiles_3x3_same": (2, 9, 10, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "tiles_3x3_valid": (2, 7, 8, 32, 1, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    "tiles_stride2_pad1": (3, 9, 11, 16, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "tiles_stride2_same": (2, 8, 8, 48, 1, (3, 3), (2, 2), same_padding(3, 1, 2, 8) * 2, (1, 1)),
    "tiles_stride3_5x5": (2, 13, 12, 16, 1, (5, 5), (3, 3), (2, 2, 2, 2), (1, 1)),
    "tiles_stride_1_2_asym": (2, 9, 13, 16, 1, (3, 4), (1, 2), (2, 0, 0, 3), (1, 1)),
    "tiles_dilation2": (2, 11, 12, 16, 1, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    "tiles_dil_stride_mixed": (2, 12, 13, 32, 1, (3, 2), (2, 3), (2, 1, 1, 2), (2, 3)),
    "tiles_1x1_stride2": (2, 7, 9, 16, 1, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),
    "tiles_7x7_wide_channels": (1, 9, 8, 80, 1, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1)),
    "tiles_kernel_covers_input": (2, 3, 4, 16, 1, (4, 5), (1, 1), (1, 0, 2, 0), (1, 1)),
    "tiles_stride_larger_than_kernel": (2, 11, 12, 16, 1, (2, 2), (3, 4), (1, 1, 2, 2), (1, 1)),
    # rows and columns that see only padding (bias only / zero gradient)
    "tiles_padding_only_rows": (2, 3, 3, 16, 1, (2, 2), (1, 1), (3, 3, 3, 3), (1, 1)),
    "tiles_4x4_cifar_tail": (4, 4, 4, 64, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "tiles_batch1_width1": (1, 6, 1, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # runs (channel multiplier, or channels not whole vectors)
    "runs_c3": (2, 7, 8, 3, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "runs_c5_stride2": (2, 9, 9, 5, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "runs_m2_same_stride2": (2, 8, 7, 4, 2, (3, 3), (2, 2), same_padding(3, 1, 2, 8) + same_padding(3, 1, 2, 7),
                             (1, 1)),
    "runs_m3_dilation": (2, 10, 9, 3, 3, (3, 2), (1, 1), (2, 2, 1, 1), (2, 2)),
    "runs_m2_c16": (2, 6, 7, 16, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "runs_c1_m4": (3, 8, 8, 1, 4, (3, 3), (2, 1), (0, 1, 1, 0), (1, 1)),
    "runs_c7_asym_stride3": (2, 11, 10, 7, 1, (4, 3), (3, 2), (2, 1, 0, 2), (1, 2)),
    "runs_padding_only_rows": (2, 3, 3, 5, 2, (2, 2), (1, 1), (3, 3, 3, 3), (1, 1)),
}

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _make(case, dtype, seed=0):
    N, H, W, C, m, (KH, KW), stride, padding, dilation = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    w = rng.standard_normal((KH, KW, 1, C * m)).astype(dtype)
    b = rng.standard_normal(C * m).astype(dtype)
    OH = window_output_size(H, KH, stride[0], padding[0], padding[1], dilation[0])
    OW = window_output_size(W, KW, stride[1], padding[2], padding[3], dilation[1])
    assert OH >= 1 and OW >= 1
    dy = rng.standard_normal((N, OH, OW, C * m)).astype(dtype)
    return x, w, b, dy, stride, padding, dilation


def _geometry(stride, padding, dilation):
    return stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1]


def _run(x, w, b, dy, stride, padding, dilation):
    """(y, dx, dw, db) from the kernels, outputs prefilled with NaN."""
    g = _geometry(stride, padding, dilation)
    y = np.full(dy.shape, np.nan, x.dtype)
    D.depthwise_forward(x, w, b, y, *g)
    dx = np.full(x.shape, np.nan, x.dtype)
    D.depthwise_backward_input(dy, w, dx, *g)
    dw = np.full(w.shape, np.nan, x.dtype)
    db = np.full(b.shape, np.nan, x.dtype)
    D.depthwise_backward_weight(x, dy, dw, db, *g)
    return y, dx, dw, db


def _refs(x, w, b, dy, stride, padding, dilation):
    """The float64 references of (y, dx, dw, db)."""
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    y = ref.depthwise_forward_ref(x64, w64, b64, stride, padding, dilation)
    dx = ref.depthwise_backward_input_ref(dy64, w64, x.shape, stride, padding, dilation)
    dw, db = ref.depthwise_backward_weight_ref(x64, dy64, w.shape, stride, padding, dilation)
    return y, dx, dw, db


def _check(got, want, dtype, what):
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)


def test_cases_cover_both_paths():
    """The register tiles and the runs are both exercised, for both dtypes, on this machine."""
    for dtype in DTYPES:
        itemsize = np.dtype(dtype).itemsize
        paths = {D._fast(c[3], c[4], itemsize) for c in CASES.values()}
        assert paths == {True, False}, dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_depthwise_matches_reference(name, dtype):
    x, w, b, dy, stride, padding, dilation = _make(CASES[name], dtype)
    got = _run(x, w, b, dy, stride, padding, dilation)
    want = _refs(x, w, b, dy, stride, padding, dilation)
    for what, g, r in zip(("forward", "backward_input", "backward_weight dw", "backward_weight db"), got, want):
        assert g.dtype == dtype
        assert np.isfinite(g).all(), f"{name} {what}: slots left unwritten"
        _check(g, r, dtype, f"{name} {what}")


@pytest.mark.parametrize("name", ["tiles_stride2_pad1", "tiles_dil_stride_mixed", "runs_m2_same_stride2", "runs_c3"])
def test_fused_backward_is_both_gradients(name):
    """depthwise_backward (both gradients in one parallel region) gives the bits of the two separate
    entry points, and skips dx when it is None; grouped_backward likewise."""
    x, w, b, dy, stride, padding, dilation = _make(CASES[name], np.float32)
    g = _geometry(stride, padding, dilation)
    _, dx, dw, db = _run(x, w, b, dy, stride, padding, dilation)
    dx2, dw2, db2 = np.full_like(x, np.nan), np.full_like(w, np.nan), np.full_like(b, np.nan)
    D.depthwise_backward(x, dy, w, dx2, dw2, db2, *g)
    assert dx2.tobytes() == dx.tobytes() and dw2.tobytes() == dw.tobytes() and db2.tobytes() == db.tobytes()
    dw3, db3 = np.full_like(w, np.nan), np.full_like(b, np.nan)
    D.depthwise_backward(x, dy, w, None, dw3, db3, *g)
    assert dw3.tobytes() == dw.tobytes() and db3.tobytes() == db.tobytes()
    dx4, dw4, db4 = np.full_like(x, np.nan), np.full_like(w, np.nan), np.full_like(b, np.nan)
    D.grouped_backward(x, dy, w, dx4, dw4, db4, x.shape[3], *g)
    assert dx4.tobytes() == dx.tobytes() and dw4.tobytes() == dw.tobytes() and db4.tobytes() == db.tobytes()
    with pytest.raises(ValueError, match="do not fit"):
        D.depthwise_backward(x, dy, w, dx2[:1], dw2, db2, *g)


def test_depthwise_reference_is_grouped_reference():
    """The two references agree: depthwise is grouped convolution with groups = input channels."""
    for name in ("tiles_stride2_pad1", "runs_m2_same_stride2", "runs_m3_dilation", "runs_c1_m4"):
        x, w, b, dy, stride, padding, dilation = _make(CASES[name], np.float64)
        C = x.shape[3]
        np.testing.assert_allclose(ref.depthwise_forward_ref(x, w, b, stride, padding, dilation),
                                   ref.grouped_conv2d_forward_ref(x, w, b, C, stride, padding, dilation), atol=1e-12)
        np.testing.assert_allclose(ref.depthwise_backward_input_ref(dy, w, x.shape, stride, padding, dilation),
                                   ref.grouped_conv2d_backward_input_ref(dy, w, x.shape, C, stride, padding,
                                                                         dilation), atol=1e-12)
        for a, c in zip(ref.depthwise_backward_weight_ref(x, dy, w.shape, stride, padding, dilation),
                        ref.grouped_conv2d_backward_weight_ref(x, dy, w.shape, C, stride, padding, dilation)):
            np.testing.assert_allclose(a, c, atol=1e-12)


def test_random_geometries():
    """A sweep of random shapes, strides, paddings (asymmetric), dilations, multipliers and dtypes."""
    rng = np.random.default_rng(7)
    count = 0
    while count < (25 if numba.config.DISABLE_JIT else 60):
        dtype = [np.float32, np.float64][int(rng.integers(0, 2))]
        C = int(rng.choice([1, 2, 3, 8, 16, 32, 48]))
        m = int(rng.choice([1, 1, 1, 2, 3]))
        KH, KW, sh, sw = (int(v) for v in rng.integers(1, [6, 6, 4, 4]))
        dh, dw = (int(v) for v in rng.integers(1, 3, 2))
        H, W = (int(v) for v in rng.integers(1, 13, 2))
        padding = tuple(int(v) for v in rng.integers(0, 4, 4))
        case = (int(rng.integers(1, 4)), H, W, C, m, (KH, KW), (sh, sw), padding, (dh, dw))
        if window_output_size(H, KH, sh, padding[0], padding[1], dh) < 1 or \
                window_output_size(W, KW, sw, padding[2], padding[3], dw) < 1:
            continue
        count += 1
        x, w, b, dy, stride, padding, dilation = _make(case, dtype, seed=count)
        for what, g, r in zip(("forward", "backward_input", "dw", "db"), _run(x, w, b, dy, stride, padding, dilation),
                              _refs(x, w, b, dy, stride, padding, dilation)):
            _check(g, r, dtype, f"{case} {dtype.__name__} {what}")


def test_tiles_and_runs_agree():
    """One problem (C = 16: the register tiles) and the same problem cut into 3 + 13 channels (the runs)."""
    x, w, b, dy, stride, padding, dilation = _make(CASES["tiles_stride2_pad1"], np.float64)
    assert D._fast(16, 1, 8) and not D._fast(3, 1, 8) and not D._fast(13, 1, 8)
    want = _run(x, w, b, dy, stride, padding, dilation)
    parts = [_run(np.ascontiguousarray(x[..., s]), np.ascontiguousarray(w[..., s]), b[s].copy(),
                  np.ascontiguousarray(dy[..., s]), stride, padding, dilation) for s in (slice(0, 3), slice(3, 16))]
    for i, r in enumerate(want):
        joined = np.concatenate([p[i] for p in parts], axis=-1)
        np.testing.assert_allclose(joined, r, rtol=1e-12, atol=1e-12)


def test_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for name in ("tiles_stride2_pad1", "tiles_dil_stride_mixed", "runs_m2_c16", "runs_c7_asym_stride3"):
        x, w, b, dy, stride, padding, dilation = _make(CASES[name], np.float64)
        top, bottom, left, right = padding
        C = x.shape[3]
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
        bt = torch.from_numpy(b.copy()).requires_grad_(True)
        yt = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, bt, stride=stride, dilation=dilation, groups=C)
        yt.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()))
        y, dx, dw, db = _run(x, w, b, dy, stride, padding, dilation)
        np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


# -- any groups ---------------------------------------------------------------

# (N, H, W, Cin, Cout, groups, (KH, KW), (sh, sw), padding, (dh, dw))
GROUPED = {
    "g2": (2, 7, 8, 4, 6, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "g4_stride2_asym": (2, 9, 8, 8, 12, 4, (3, 2), (2, 1), (1, 0, 0, 1), (1, 1)),
    "g3_dilation_1x1_out": (1, 10, 9, 6, 3, 3, (3, 3), (1, 2), (2, 2, 2, 2), (2, 1)),
    "g2_wide": (2, 6, 6, 32, 64, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "g1_is_conv": (2, 6, 7, 3, 5, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "gC_is_depthwise": (2, 6, 7, 16, 32, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(GROUPED))
def test_grouped_matches_reference(name, dtype):
    N, H, W, Cin, Cout, G, (KH, KW), stride, padding, dilation = GROUPED[name]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, H, W, Cin)).astype(dtype)
    w = rng.standard_normal((KH, KW, Cin // G, Cout)).astype(dtype)
    b = rng.standard_normal(Cout).astype(dtype)
    OH = window_output_size(H, KH, stride[0], padding[0], padding[1], dilation[0])
    OW = window_output_size(W, KW, stride[1], padding[2], padding[3], dilation[1])
    dy = rng.standard_normal((N, OH, OW, Cout)).astype(dtype)
    g = _geometry(stride, padding, dilation)
    y = np.full(dy.shape, np.nan, dtype)
    D.grouped_forward(x, w, b, y, G, *g)
    dx = np.full(x.shape, np.nan, dtype)
    D.grouped_backward_input(dy, w, dx, G, *g)
    dw = np.full(w.shape, np.nan, dtype)
    db = np.full(b.shape, np.nan, dtype)
    D.grouped_backward_weight(x, dy, dw, db, G, *g)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    want_dw, want_db = ref.grouped_conv2d_backward_weight_ref(x64, dy64, w.shape, G, stride, padding, dilation)
    for what, got, want in (("forward", y, ref.grouped_conv2d_forward_ref(x64, w64, b64, G, stride, padding, dilation)),
                            ("backward_input", dx, ref.grouped_conv2d_backward_input_ref(dy64, w64, x.shape, G, stride,
                                                                                        padding, dilation)),
                            ("dw", dw, want_dw), ("db", db, want_db)):
        assert got.dtype == dtype
        _check(got, want, dtype, f"{name} {what}")


def test_grouped_dispatch():
    """groups 1 is the conv kernel's result exactly, groups = C the depthwise kernel's."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 6, 16)).astype(np.float32)
    w1 = rng.standard_normal((3, 3, 16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    y, y_conv = np.empty((2, 6, 6, 8), np.float32), np.empty((2, 6, 6, 8), np.float32)
    D.grouped_forward(x, w1, b, y, 1, 1, 1, 1, 1, 1, 1)
    conv.conv2d_forward(x, w1, b, y_conv, 1, 1, 1, 1, 1, 1)
    assert y.tobytes() == y_conv.tobytes()
    wd = rng.standard_normal((3, 3, 1, 32)).astype(np.float32)
    bd = rng.standard_normal(32).astype(np.float32)
    y, y_dw = np.empty((2, 6, 6, 32), np.float32), np.empty((2, 6, 6, 32), np.float32)
    D.grouped_forward(x, wd, bd, y, 16, 1, 1, 1, 1, 1, 1)
    D.depthwise_forward(x, wd, bd, y_dw, 1, 1, 1, 1, 1, 1)
    assert y.tobytes() == y_dw.tobytes()


def test_bad_arguments():
    x = np.zeros((1, 4, 4, 4), np.float32)
    y = np.zeros((1, 4, 4, 4), np.float32)
    b = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="depthwise"):
        D.depthwise_forward(x, np.zeros((3, 3, 2, 4), np.float32), b, y, 1, 1, 1, 1, 1, 1)   # not (KH, KW, 1, .)
    with pytest.raises(ValueError, match="depthwise"):
        D.depthwise_forward(x, np.zeros((3, 3, 1, 6), np.float32), np.zeros(6, np.float32),
                            np.zeros((1, 4, 4, 6), np.float32), 1, 1, 1, 1, 1, 1)            # 6 % 4 != 0
    with pytest.raises(ValueError, match="strides and dilations"):
        D.depthwise_forward(x, np.zeros((3, 3, 1, 4), np.float32), b, y, 0, 1, 1, 1, 1, 1)
    with pytest.raises(TypeError, match="float32 and float64"):
        D.depthwise_forward(x.astype(np.float16), np.zeros((3, 3, 1, 4), np.float16), b.astype(np.float16),
                            y.astype(np.float16), 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="groups 3"):
        D.grouped_forward(x, np.zeros((3, 3, 1, 4), np.float32), b, y, 3, 1, 1, 1, 1, 1, 1)
