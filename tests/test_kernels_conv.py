"""Tests of the Numba convolution kernels (fastcnn.kernels.conv).

Checked against the plain NumPy loops (fastcnn.kernels.reference_conv), a
central-difference gradient check, and PyTorch's autograd where torch is
importable.

Also passes under NUMBA_DISABLE_JIT=1 (the kernels run as Python with
fastcnn.kernels.gemm's NumPy product): the same cases, in about 15 s, so no
smaller set is needed there. Thread-count determinism: tests/test_determinism.py.
"""
import numpy as np
import pytest

from fastcnn.kernels import conv
from fastcnn.kernels import reference_conv as ref
from fastcnn.shapes import same_padding, window_output_size

# (N, H, W, Cin, Cout, (KH, KW), (sh, sw), (top, bottom, left, right), (dh, dw))
CASES = {
    "basic_3x3": (2, 7, 8, 3, 5, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    "stride2": (2, 9, 9, 4, 8, (3, 3), (2, 2), (0, 0, 0, 0), (1, 1)),
    "stride2_leftover": (1, 10, 8, 3, 9, (3, 3), (2, 2), (0, 0, 0, 0), (1, 1)),
    "asym_stride_1_2": (2, 8, 11, 3, 16, (3, 3), (1, 2), (0, 0, 0, 0), (1, 1)),
    "pad_int": (2, 6, 7, 5, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "pad_pair": (1, 7, 6, 2, 10, (3, 3), (1, 1), (2, 2, 1, 1), (1, 1)),
    "same_odd_5x5": (2, 9, 7, 3, 4, (5, 5), (1, 1), same_padding(5) + same_padding(5), (1, 1)),
    "same_even_4x4": (2, 8, 9, 3, 11, (4, 4), (1, 1), same_padding(4) + same_padding(4), (1, 1)),
    "same_even_2x3": (1, 6, 7, 4, 9, (2, 3), (1, 1), same_padding(2) + same_padding(3), (1, 1)),
    "rect_2x3": (2, 7, 9, 3, 8, (2, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    "dilation2": (2, 11, 10, 3, 9, (3, 3), (1, 1), (0, 0, 0, 0), (2, 2)),
    "dilation_2_1_pad_stride": (2, 12, 11, 4, 10, (3, 2), (2, 1), (2, 2, 1, 1), (2, 1)),
    "odd_sizes_batch1": (1, 13, 11, 7, 13, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    "cin1": (3, 10, 9, 1, 16, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    "cin1_cout1": (2, 8, 8, 1, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "cout_small": (2, 8, 7, 9, 3, (3, 3), (2, 1), (1, 1, 0, 0), (1, 1)),
    "stride3_pad_kernel1": (2, 10, 10, 6, 8, (1, 1), (3, 3), (1, 1, 1, 1), (1, 1)),
    "kernel_covers_input": (2, 4, 5, 3, 8, (4, 5), (1, 1), (0, 0, 0, 0), (1, 1)),
    "stride_larger_than_kernel": (2, 11, 12, 3, 8, (2, 2), (3, 4), (1, 1, 2, 2), (1, 1)),
    "big_channels": (2, 6, 6, 20, 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # KW*Cin >= 32: the forward reads x in place (no im2col row; with padding, the zero-padded
    # kernel rows while the weight panel is small, see below); Cout and Cin multiples of the
    # vector length (outputs written in place) or not (padded scratch columns); column counts
    # past one microkernel tile.
    "direct_valid": (2, 7, 8, 16, 32, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    "direct_pad_stride_dil": (2, 12, 11, 16, 20, (3, 2), (2, 3), (2, 1, 1, 2), (2, 2)),
    "direct_stride2_pad": (3, 9, 10, 32, 64, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "direct_wide_cout": (1, 5, 14, 11, 70, (2, 3), (1, 1), (0, 0, 1, 1), (1, 1)),
    "direct_cout_over_tile": (2, 6, 9, 32, 136, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    # Padding and a weight panel past _SLAB_PANEL_BYTES with AVX2 or AVX-512 (3x3x96 rows):
    # the forward's one product per kernel column, not the zero-padded slab.
    "direct_pad_wide_panel": (2, 6, 7, 96, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "direct_pad_wide_panel_stride2": (2, 7, 9, 100, 70, (3, 3), (2, 2), (1, 2, 1, 1), (1, 1)),
    "direct_right_edge_wide_panel_dil_h": (2, 9, 8, 96, 24, (3, 3), (1, 1), (2, 1, 0, 1), (2, 1)),
    # weight gradient straight from x and dy (no im2col): kernel rows clipped
    # by top/bottom padding, row stride and dilation.
    "direct_rows_dil_pad_top": (2, 11, 10, 3, 16, (3, 3), (2, 1), (1, 2, 0, 0), (2, 1)),
    # ... with enough columns for the filter-row path: kernel rows clipped (row stride and
    # dilation), and x read in place (no padding, KW*Cin a multiple of the vector length).
    "filter_rows_kernel_rows_clipped": (3, 9, 10, 20, 32, (3, 3), (2, 1), (1, 1, 0, 0), (2, 1)),
    "filter_rows_in_place": (2, 7, 8, 16, 16, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    # Few channels and a kernel column outside the image: the forward copies the kernel
    # rows into zero-padded rows (any stride, row dilation); the weight gradient reads a
    # zero-padded copy of x, and a zero-padded copy of dy when Cout is not a multiple
    # of the vector length (partials, or row items straight into a padded dw).
    "padded_rows_cin1_5x5": (3, 12, 11, 1, 6, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),
    "padded_rows_cin3_7x7_stride2": (2, 15, 18, 3, 24, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),
    "padded_rows_right_edge_only": (2, 9, 10, 2, 5, (3, 3), (2, 2), (0, 1, 0, 1), (1, 1)),
    "padded_rows_dil_h": (2, 11, 9, 3, 8, (3, 3), (2, 1), (2, 2, 1, 1), (2, 1)),
    "padded_row_items_cout24": (2, 8, 9, 10, 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "padded_row_items_cout100": (2, 7, 7, 48, 100, (3, 5), (1, 1), (1, 1, 2, 2), (1, 1)),
    # One input channel, stride 1, fewer filters than a vector: the forward's product runs
    # transposed (filters as rows, output pixels as vector columns), with or without padding.
    "transposed_cin1_cout10_valid": (2, 9, 23, 1, 10, (3, 4), (1, 1), (0, 0, 0, 0), (1, 1)),
    "transposed_cin1_cout3_pad_stride_h": (2, 10, 18, 1, 3, (5, 3), (2, 1), (2, 1, 1, 2), (2, 1)),
    # The weight gradient's filter-row path (products with the filters as rows, the kernel row's
    # (kw, ci) as columns): padding (a zero-padded copy of x), dilated columns (one product per
    # tap), stride, asymmetric padding, a last row tile of fewer than 4 filters, a last block of
    # filters shorter than the others (Cout 130 or 100), columns padded to the vector length
    # (KW*Cin = 210, 50: the copy of x then has a tail), column stride 2, one filter.
    "filter_rows_same": (2, 6, 7, 64, 128, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "filter_rows_stride_dil_cols": (2, 9, 10, 64, 130, (3, 2), (2, 1), (2, 1, 1, 2), (1, 2)),
    "filter_rows_cin_tail": (1, 5, 6, 70, 120, (2, 3), (2, 1), (0, 1, 0, 2), (2, 1)),
    "filter_rows_col_stride2": (2, 8, 9, 64, 128, (3, 3), (1, 2), (1, 1, 1, 1), (1, 1)),
    "filter_rows_tail_valid": (2, 9, 11, 10, 12, (3, 5), (1, 1), (0, 0, 0, 0), (1, 1)),
    "filter_rows_cout1": (2, 6, 7, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # Few filters for the vector (10 in 16 columns with 8 lanes): filter rows from 2 vectors of columns
    # (KW*Cin = 15 in 16), x read from its zero-padded copy.
    "filter_rows_narrow": (3, 9, 10, 5, 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # Too few columns for it (KW*Cin = 21) but enough row tiles: the row items, x and dy (Cout 20)
    # read from zero-padded copies.
    "row_items_cin7_padcols": (2, 8, 9, 7, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # ... and larger images (the weight gradient's copies of x past 100 KiB per image; its im2col
    # blocks are left for dilated columns: dilation2, direct_pad_stride_dil).
    "padded_large_image": (1, 24, 24, 48, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # The input gradient's per-tap products over blocks of rows (more rows than the 64 row chunks, a
    # chunk's rows in blocks of _DX_BLOCK_BYTES): dx in padded scratch rows (Cin 250: blocks of 2 rows
    # and a last one in float32, single rows in float64), and in place (Cin 64, one block).
    "input_grad_row_blocks": (4, 48, 32, 250, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "input_grad_row_blocks_in_place": (4, 48, 32, 64, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    # 1x1 at stride 1 without padding: the forward's and the input gradient's products span
    # several output rows, across images (more rows than the 64 row chunks): a chunk's rows in one
    # product (GP >= rows per chunk), or in products of GP rows and a shorter last one; outputs in
    # place or in padded scratch columns (Cout 20, Cin 5).
    "pointwise_rows_merged": (8, 40, 3, 5, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    "pointwise_wide_rows_padded_cout": (4, 36, 40, 16, 20, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    # ... and enough input channels for the weight gradient's row items: products over blocks of
    # the batch's pixels across images (a block boundary inside an image), Cout padded in float32.
    "pointwise_weight_rows_blocks": (8, 6, 6, 80, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
}

TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}

# The weight gradient's path of some of the cases at 8 elements per vector (float32 with AVX2,
# float64 with AVX-512): together they take every path (conv.WEIGHT_GRADIENT_PATHS).
WEIGHT_GRADIENT_PATHS = {
    "filter_rows_same": "filter_rows", "filter_rows_stride_dil_cols": "filter_rows",
    "filter_rows_cin_tail": "filter_rows", "filter_rows_col_stride2": "filter_rows",
    "filter_rows_tail_valid": "filter_rows", "filter_rows_cout1": "filter_rows",
    "filter_rows_in_place": "filter_rows", "filter_rows_narrow": "filter_rows",
    "row_items_cin7_padcols": "rows", "padded_rows_cin3_7x7_stride2": "rows", "pointwise_weight_rows_blocks": "rows",
    "padded_rows_cin1_5x5": "direct", "direct_rows_dil_pad_top": "direct", "dilation2": "im2col",
}


def test_the_cases_take_every_weight_gradient_path():
    from fastcnn.kernels.gemm import VBYTES

    dtype = np.float32 if VBYTES == 32 else np.float64
    for name, path in WEIGHT_GRADIENT_PATHS.items():
        N, H, W, Cin, Cout, (KH, KW), (sh, sw), (pt, pb, pl, pr), (dh, dw) = CASES[name]
        OH = window_output_size(H, KH, sh, pt, pb, dh)
        OW = window_output_size(W, KW, sw, pl, pr, dw)
        got = conv.weight_gradient_path((N, H, W, Cin), (KH, KW, Cin, Cout), (N, OH, OW, Cout), sw, pl, dw, dtype)
        assert got == path, name
    assert set(WEIGHT_GRADIENT_PATHS.values()) == set(conv.WEIGHT_GRADIENT_PATHS)


def _make(case, dtype, seed=0):
    N, H, W, Cin, Cout, (KH, KW), stride, padding, dilation = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H, W, Cin)).astype(dtype)
    w = rng.standard_normal((KH, KW, Cin, Cout)).astype(dtype)
    b = rng.standard_normal(Cout).astype(dtype)
    OH = window_output_size(H, KH, stride[0], padding[0], padding[1], dilation[0])
    OW = window_output_size(W, KW, stride[1], padding[2], padding[3], dilation[1])
    assert OH >= 1 and OW >= 1
    dy = rng.standard_normal((N, OH, OW, Cout)).astype(dtype)
    return x, w, b, dy, stride, padding, dilation


def _args(stride, padding, dilation):
    return stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1]


def _forward(x, w, b, out_shape, stride, padding, dilation):
    y = np.full(out_shape, np.nan, dtype=x.dtype)   # every slot must be written
    conv.conv2d_forward(x, w, b, y, *_args(stride, padding, dilation))
    return y


def _backward_input(dy, w, x_shape, stride, padding, dilation):
    dx = np.full(x_shape, np.nan, dtype=dy.dtype)
    conv.conv2d_backward_input(dy, w, dx, *_args(stride, padding, dilation))
    return dx


def _backward_weight(x, dy, w_shape, stride, padding, dilation):
    dw = np.full(w_shape, np.nan, dtype=x.dtype)
    db = np.full(w_shape[3], np.nan, dtype=x.dtype)
    conv.conv2d_backward_weight(x, dy, dw, db, *_args(stride, padding, dilation))
    return dw, db


def _scaled_tol(dtype, ref_value, fan):
    # float32 sums of `fan` products: error grows with the size of the sum.
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(ref_value).max())) if ref_value.size else 1.0
    return dict(rtol=tol["rtol"], atol=tol["atol"] * scale * max(1.0, np.sqrt(fan) / 4))


# ---------------------------------------------------------------------------
# Against the NumPy reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(name, dtype):
    x, w, b, dy, stride, padding, dilation = _make(CASES[name], dtype)
    KH, KW, Cin, Cout = w.shape

    y_ref = ref.conv2d_forward_ref(x, w, b, stride, padding, dilation)
    y = _forward(x, w, b, y_ref.shape, stride, padding, dilation)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **_scaled_tol(dtype, y_ref, KH * KW * Cin))

    dx_ref = ref.conv2d_backward_input_ref(dy, w, x.shape, stride, padding, dilation)
    dx = _backward_input(dy, w, x.shape, stride, padding, dilation)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, dx_ref, **_scaled_tol(dtype, dx_ref, KH * KW * Cout))

    dw_ref, db_ref = ref.conv2d_backward_weight_ref(x, dy, w.shape, stride, padding, dilation)
    dw, db = _backward_weight(x, dy, w.shape, stride, padding, dilation)
    assert dw.dtype == dtype and db.dtype == dtype
    fan = dy.shape[0] * dy.shape[1] * dy.shape[2]
    np.testing.assert_allclose(dw, dw_ref, **_scaled_tol(dtype, dw_ref, fan))
    np.testing.assert_allclose(db, db_ref, **_scaled_tol(dtype, db_ref, fan))


def test_backward_input_zero_where_no_window_reads():
    # stride 3 with a 1x1 kernel: only every third pixel is read; the rest of dx must be 0, not garbage.
    x, w, b, dy, stride, padding, dilation = _make(CASES["stride3_pad_kernel1"], np.float64)
    dx = _backward_input(dy, w, x.shape, stride, padding, dilation)
    assert np.isfinite(dx).all()
    mask = np.zeros(x.shape[1:3], bool)
    mask[2::3, 2::3] = True      # pad 1, stride 3: input rows/cols 2, 5, 8 are read
    assert np.all(dx[:, ~mask, :] == 0)
    assert np.all(dx[:, mask, :] != 0)


def test_float32_is_computed_in_float32():
    # The float32 result should be as accurate as float32 math can be, yet differ
    # from the float64 result (a kernel that secretly computed in float64 and
    # rounded at the end would match it to the last bit nearly everywhere).
    x64, w64, b64, dy64, stride, padding, dilation = _make(CASES["big_channels"], np.float64)
    x32, w32, b32 = x64.astype(np.float32), w64.astype(np.float32), b64.astype(np.float32)
    y64 = _forward(x32.astype(np.float64), w32.astype(np.float64), b32.astype(np.float64),
                   dy64.shape, stride, padding, dilation)
    y32 = _forward(x32, w32, b32, dy64.shape, stride, padding, dilation)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-5, atol=1e-4)
    rounded = y64.astype(np.float32)
    assert np.mean(y32 != rounded) > 0.05


# ---------------------------------------------------------------------------
# Central-difference gradient check (float64, random upstream gradient)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name", ["pad_int", "dilation_2_1_pad_stride", "same_even_2x3", "cin1_cout1", "stride2_leftover",
             "padded_rows_cin1_5x5", "padded_row_items_cout24", "transposed_cin1_cout3_pad_stride_h",
             "filter_rows_stride_dil_cols", "filter_rows_tail_valid", "filter_rows_narrow", "row_items_cin7_padcols",
             "pointwise_rows_merged", "pointwise_weight_rows_blocks"]
)
def test_gradients_central_difference(name):
    x, w, b, G, stride, padding, dilation = _make(CASES[name], np.float64, seed=1)
    out_shape = G.shape

    def loss(x_, w_, b_):
        return float(np.sum(_forward(x_, w_, b_, out_shape, stride, padding, dilation) * G))

    dx = _backward_input(G, w, x.shape, stride, padding, dilation)
    dw, db = _backward_weight(x, G, w.shape, stride, padding, dilation)

    rng = np.random.default_rng(2)
    h = 1e-5
    for param, grad, which in ((x, dx, 0), (w, dw, 1), (b, db, 2)):
        flat = param.reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, 25), replace=False)
        for i in idx:
            old = flat[i]
            flat[i] = old + h
            lp = loss(x, w, b)
            flat[i] = old - h
            lm = loss(x, w, b)
            flat[i] = old
            numeric = (lp - lm) / (2 * h)
            assert grad.reshape(-1)[i] == pytest.approx(numeric, rel=1e-6, abs=1e-7), (which, i)


# ---------------------------------------------------------------------------
# Against PyTorch autograd
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["basic_3x3", "dilation_2_1_pad_stride", "same_even_4x4", "asym_stride_1_2", "cin1"])
def test_against_torch(name):
    torch = pytest.importorskip("torch", reason="torch not installed: PyTorch comparison skipped")
    F = torch.nn.functional
    x, w, b, dy, stride, padding, dilation = _make(CASES[name], np.float64, seed=3)
    top, bottom, left, right = padding

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    out = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, bt, stride=stride, dilation=dilation)
    assert tuple(out.shape) == (dy.shape[0], dy.shape[3], dy.shape[1], dy.shape[2])
    out.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()))

    y = _forward(x, w, b, dy.shape, stride, padding, dilation)
    dx = _backward_input(dy, w, x.shape, stride, padding, dilation)
    dw, db = _backward_weight(x, dy, w.shape, stride, padding, dilation)
    tol = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, out.detach().numpy().transpose(0, 2, 3, 1), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), **tol)
    np.testing.assert_allclose(dw, wt.grad.numpy().transpose(2, 3, 1, 0), **tol)
    np.testing.assert_allclose(db, bt.grad.numpy(), **tol)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_convenience_same_matches_torch_same():
    torch = pytest.importorskip("torch", reason="torch not installed: PyTorch comparison skipped")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 7, 8, 3))
    w = rng.standard_normal((4, 3, 3, 5))
    b = rng.standard_normal(5)
    y = conv.conv2d(x, w, b, padding="same", dilation=(1, 2))
    yt = torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w.transpose(3, 2, 0, 1).copy()),
        torch.from_numpy(b), padding="same", dilation=(1, 2))
    assert y.shape == (2, 7, 8, 5)
    np.testing.assert_allclose(y, yt.numpy().transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# Random small shapes (hypothesis)
# ---------------------------------------------------------------------------

try:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    def _geometries(cin, cout, size, kernel, stride, col_stride=None):
        """Hypothesis strategies for a random convolution: (n, h, w, cin, cout, kh, kw, sh, sw, dh, dw,
        pt, pb, pl, pr, seed), channel counts, image sides, kernel sides and strides (column stride:
        ``col_stride`` when given) from these ranges."""
        ints = st.integers
        return dict(n=ints(1, 2), h=ints(*size), w_=ints(*size), cin=ints(*cin), cout=ints(*cout),
                    kh=ints(*kernel), kw=ints(*kernel), sh=ints(*stride), sw=ints(*(col_stride or stride)),
                    dh=ints(1, 2),
                    dw=ints(1, 2), pt=ints(0, 2), pb=ints(0, 2), pl=ints(0, 2), pr=ints(0, 2), seed=ints(0, 2**16))

    def _random_case(n, h, w_, cin, cout, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, seed, taps=1):
        """The arrays of one drawn geometry (float64); skips it (hypothesis.assume) when the output
        would be empty or the kernel has fewer than ``taps`` taps."""
        OH = window_output_size(h, kh, sh, pt, pb, dh)
        OW = window_output_size(w_, kw, sw, pl, pr, dw)
        assume(OH >= 1 and OW >= 1 and kh * kw >= taps)
        case = (n, h, w_, cin, cout, (kh, kw), (sh, sw), (pt, pb, pl, pr), (dh, dw))
        return _make(case, np.float64, seed)

    def _assert_weight_gradient_matches_reference(x, dy, w, stride, padding, dilation):
        dw_, db_ = _backward_weight(x, dy, w.shape, stride, padding, dilation)
        dw_ref, db_ref = ref.conv2d_backward_weight_ref(x, dy, w.shape, stride, padding, dilation)
        np.testing.assert_allclose(dw_, dw_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(db_, db_ref, rtol=1e-10, atol=1e-10)

    @settings(max_examples=25, deadline=None)
    @given(**_geometries(cin=(1, 5), cout=(1, 10), size=(1, 9), kernel=(1, 4), stride=(1, 3)))
    def test_random_shapes_match_reference(**geometry):
        x, w, b, dy, stride, padding, dilation = _random_case(**geometry)
        tol = dict(rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(_forward(x, w, b, dy.shape, stride, padding, dilation),
                                   ref.conv2d_forward_ref(x, w, b, stride, padding, dilation), **tol)
        np.testing.assert_allclose(_backward_input(dy, w, x.shape, stride, padding, dilation),
                                   ref.conv2d_backward_input_ref(dy, w, x.shape, stride, padding, dilation), **tol)
        _assert_weight_gradient_matches_reference(x, dy, w, stride, padding, dilation)

    @settings(max_examples=12, deadline=None)
    @given(**_geometries(cin=(24, 70), cout=(1, 140), size=(1, 7), kernel=(1, 3), stride=(1, 3)))
    def test_random_shapes_weight_gradient_filter_rows(**geometry):
        """The weight gradient's filter-row path on random geometries (any stride, dilation, padding)."""
        x, w, b, dy, stride, padding, dilation = _random_case(**geometry, taps=2)
        assume(conv.weight_gradient_path(x.shape, w.shape, dy.shape, stride[1], padding[2], dilation[1], x.dtype)
               == "filter_rows")
        _assert_weight_gradient_matches_reference(x, dy, w, stride, padding, dilation)


# ---------------------------------------------------------------------------
# The forward's epilogue: a residual row added, ReLU
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_epilogue_equals_the_separate_passes(dtype, name):
    """relu=True and residual= give, bit for bit, what the plain forward then NumPy's add and ReLU
    give (the same float operations), on every path of the forward (products in place or in padded
    rows, transposed, slab, per kernel column, im2col); NaN and inf in the residual keep torch's
    ReLU semantics (NaN stays), and a sum of -0.0 gives +0.0 as the ReLU layer does."""
    x, w, b, dy, stride, padding, dilation = _make(CASES[name], dtype)
    args = _args(stride, padding, dilation)
    y = _forward(x, w, b, dy.shape, stride, padding, dilation)
    r = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
    r.reshape(-1)[:4] = [np.nan, -np.inf, np.inf, 0.0]
    r.reshape(-1)[4:6] = -y.reshape(-1)[4:6]  # sums of exactly 0 (+0 or -0)
    z = y + r
    zr = np.where(z <= 0, dtype(0), z)
    for kwargs, expected in (({"relu": True}, np.where(y <= 0, dtype(0), y)), ({"residual": r}, z),
                             ({"residual": r, "relu": True}, zr)):
        out = np.full(dy.shape, np.nan, dtype=dtype)
        conv.conv2d_forward(x, w, b, out, *args, **kwargs)
        assert out.tobytes() == expected.tobytes(), kwargs
    with pytest.raises(ValueError, match="residual must be"):
        conv.conv2d_forward(x, w, b, np.empty_like(y), *args, residual=r[:, :-1] if r.shape[1] > 1 else r[:0])
    out = y.copy()
    with pytest.raises(ValueError, match="must not share memory with y"):  # y += conv(x) is not this
        conv.conv2d_forward(x, w, b, out, *args, residual=out)
    assert out.tobytes() == y.tobytes()


# ---------------------------------------------------------------------------
# Overwrite semantics, determinism
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outputs_overwritten_not_accumulated(dtype):
    x, w, b, dy, stride, padding, dilation = _make(CASES["dilation_2_1_pad_stride"], dtype)
    args = _args(stride, padding, dilation)
    dw = np.empty_like(w)
    db = np.empty_like(b)
    conv.conv2d_backward_weight(x, dy, dw, db, *args)
    dw1, db1 = dw.copy(), db.copy()
    conv.conv2d_backward_weight(x, dy, dw, db, *args)
    np.testing.assert_array_equal(dw, dw1)
    np.testing.assert_array_equal(db, db1)

    dx = np.empty_like(x)
    conv.conv2d_backward_input(dy, w, dx, *args)
    dx1 = dx.copy()
    conv.conv2d_backward_input(dy, w, dx, *args)
    np.testing.assert_array_equal(dx, dx1)

    y = np.empty_like(dy)
    conv.conv2d_forward(x, w, b, y, *args)
    y1 = y.copy()
    conv.conv2d_forward(x, w, b, y, *args)
    np.testing.assert_array_equal(y, y1)


@pytest.mark.parametrize("name", ["big_channels", "filter_rows_kernel_rows_clipped", "padded_rows_cin3_7x7_stride2",
                                  "padded_row_items_cout100", "filter_rows_stride_dil_cols", "filter_rows_tail_valid",
                                  "row_items_cin7_padcols",
                                  "pointwise_weight_rows_blocks"])
def test_weight_gradient_deterministic_across_thread_counts(name):
    import numba

    x, w, b, dy, stride, padding, dilation = _make(CASES[name], np.float32)
    x = np.repeat(x, 8, axis=0)            # enough rows for every chunk
    dy = np.repeat(dy, 8, axis=0)
    results = []
    old = numba.get_num_threads()
    try:
        for threads in sorted({1, old}):
            numba.set_num_threads(threads)
            for _ in range(2):
                results.append(_backward_weight(x, dy, w.shape, stride, padding, dilation))
    finally:
        numba.set_num_threads(old)
    for dw, db in results[1:]:
        np.testing.assert_array_equal(dw, results[0][0])
        np.testing.assert_array_equal(db, results[0][1])


@pytest.mark.parametrize("name", ["direct_valid", "direct_pad_stride_dil", "direct_pad_wide_panel", "same_odd_5x5",
                                  "padded_row_items_cout24", "pointwise_wide_rows_padded_cout",
                                  "input_grad_row_blocks"])
def test_forward_and_input_gradient_deterministic_across_thread_counts(name):
    import numba

    x, w, b, dy, stride, padding, dilation = _make(CASES[name], np.float32)
    x = np.repeat(x, 4, axis=0)
    dy = np.repeat(dy, 4, axis=0)
    results = []
    old = numba.get_num_threads()
    try:
        for threads in sorted({1, old}):
            numba.set_num_threads(threads)
            for _ in range(2):
                results.append((_forward(x, w, b, dy.shape, stride, padding, dilation),
                                _backward_input(dy, w, x.shape, stride, padding, dilation)))
    finally:
        numba.set_num_threads(old)
    for y, dx in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])


# ---------------------------------------------------------------------------
# conv2d() convenience
# ---------------------------------------------------------------------------

def test_convenience_matches_reference_and_keeps_dtype():
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 9, 8, 3)).astype(dtype)
        w = rng.standard_normal((3, 2, 3, 8)).astype(dtype)
        b = rng.standard_normal(8).astype(dtype)
        for padding, pads in ((0, (0, 0, 0, 0)), ("valid", (0, 0, 0, 0)), (1, (1, 1, 1, 1)),
                              ((2, 1), (2, 2, 1, 1)), ("same", (1, 1, 0, 1))):
            y = conv.conv2d(x, w, b, padding=padding)
            assert y.dtype == dtype
            np.testing.assert_allclose(y, ref.conv2d_forward_ref(x, w, b, (1, 1), pads, (1, 1)),
                                       **_scaled_tol(dtype, y, 18))
        y = conv.conv2d(x, w, None, stride=(2, 1), padding=1, dilation=(1, 2))
        np.testing.assert_allclose(
            y, ref.conv2d_forward_ref(x, w, np.zeros(8, dtype), (2, 1), (1, 1, 1, 1), (1, 2)),
            **_scaled_tol(dtype, y, 18))


def test_convenience_same_with_stride_raises():
    x = np.zeros((1, 8, 8, 1), np.float32)
    w = np.zeros((3, 3, 1, 2), np.float32)
    with pytest.raises(ValueError, match="same"):
        conv.conv2d(x, w, padding="same", stride=2)
    with pytest.raises(ValueError, match="same"):
        conv.conv2d(x, w, padding="same", stride=(1, 2))


def test_convenience_output_below_one_raises():
    x = np.zeros((1, 4, 4, 1), np.float32)
    w = np.zeros((5, 3, 1, 2), np.float32)
    with pytest.raises(ValueError, match="below 1"):
        conv.conv2d(x, w)
    with pytest.raises(ValueError, match="below 1"):
        conv.conv2d(np.zeros((1, 4, 4, 1)), np.zeros((3, 3, 1, 1)), dilation=2)


def test_convenience_rejects_bad_padding():
    x = np.zeros((1, 4, 4, 1))
    w = np.zeros((3, 3, 1, 1))
    with pytest.raises(ValueError):
        conv.conv2d(x, w, padding="full")
    with pytest.raises(ValueError):
        conv.conv2d(x, w, padding=-1)
    with pytest.raises(ValueError):
        conv.conv2d(x, np.zeros((3, 3, 2, 1)))
