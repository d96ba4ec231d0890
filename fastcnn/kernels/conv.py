"""2-D convolution kernels (Numba).

Layout: activations NHWC ``(N, H, W, C)``, weights HWIO ``(KH, KW, Cin, Cout)``,
bias ``(Cout,)``. Cross-correlation with PyTorch semantics. Every kernel
writes into output arrays the caller allocated (C-contiguous) and returns
None; all arrays of one call share one dtype (float32 or float64), and the
arithmetic stays in that dtype.

Padding is given as ``pad_top``/``pad_left`` only: the output size comes from
the output array's shape, the bottom/right padding is implied, and input
positions outside ``[0, H) x [0, W)`` count as zeros.

Every kernel is a sequence of small matrix products done by the register-
blocked GEMM of fastcnn/kernels/gemm.py, ``gemm``:
``C[i, :] += sum_k A[i, k] * B[k, :]`` in tiles of up to 6 rows and a few
SIMD vectors of columns, the accumulators held in registers. A and B are
addressed with strides (``a_off + i*lda + k*ldk``, ``b_off + k*ldb``), so the
products read the activations where they lie, with no im2col copy where the
layout allows. The public entry points call ``gemm.ensure_gemm`` first; under
NUMBA_DISABLE_JIT the kernels run as Python with gemm's NumPy version.

* forward, per output row (n, oh) (rows dealt to _ROW_CHUNKS chunks, the
  prange), ``y[n, oh] = b + sum`` over the kernel taps. When dil_w == 1 and
  every kernel column is inside the image (no left/right padding needed), one
  product covers all the taps: for each kernel row kh inside the image (a
  segment of the microkernel's reduction), ``A[ow, kw*Cin + ci] = x[n, ih,
  ow*sw + kw, ci]`` (row stride sw*Cin) times ``w[kh]`` seen as (KW*Cin, Cout);
  x is read in place, no im2col. Otherwise, when dil_w == 1 and either few
  inputs per kernel row (KW*Cin < _MIN_DIRECT, e.g. a first layer with
  padding) or a small weight panel (KH*KW*Cin rows by one microkernel tile of
  columns within _SLAB_PANEL_BYTES: a 3x3 kernel over up to 85 channels with
  AVX2 and 16 or more filters), the kernel rows are copied into zero-padded
  rows and one product reads them as the full-width case reads x; else, when
  KW*Cin >= _MIN_DIRECT, one product per kernel column kw over the output
  pixels whose input column is inside the image; else (few channels, dilated
  columns) an im2col row ``(OW, KH*KW*Cin)`` is gathered and done as one product.
  One input channel at stride 1 with fewer filters than a vector (a grayscale
  first layer such as LeNet's) runs transposed instead, per block of output
  rows of an image: the filters are the microkernel's rows and the output
  pixels its vector columns, read from the zero-padded input rows.
  A 1x1 kernel at stride 1 without padding (a pointwise convolution) does a
  chunk's output rows, across images, in products of up to _POINTWISE_PIXELS
  pixels (x and y rows follow each other in memory): an 8x8 layer's product
  is no longer 8 rows (a 6-row and a 2-row tile). Each output is summed in the
  same order, so the same bits; measured on a Zen 3, 2 threads, batch 128:
  1.13-1.34x on 8x8 and 4x4 layers, 1.0-1.07x on 16x16 and 32x32 ones.
  The forward's epilogue runs on each output row just after its products,
  while the row is in cache: a residual branch's row added (the evaluation
  forward of a residual block ending in conv + batch norm) and ReLU (the
  conv + ReLU block, and conv + batch norm + ReLU in evaluation, the batch
  norm folded into the weights), so those take no pass over y of their own.
* backward input: at stride 1 with fewer than _VIA_FORWARD_FILTERS filters and
  a kernel of more than one tap, the forward above run on dy with the kernel
  flipped and transposed to (KH, KW, Cout, Cin) and padding (K-1)*dil - pad
  (conv2d_backward_input; not when that padding would be negative). Otherwise,
  per input row (n, ih): the transpose of the forward:
  for each (kh, kw) whose output row exists, ``dx[n, ih, iw] += dy[n, oh, ow]
  @ w[kh, kw].T`` over the range of ``ow`` that lands inside the row, C rows
  at stride sw*Cin. Each dx row is written by one thread: no races, fixed order.
  A chunk's rows go in blocks of _DX_BLOCK_BYTES, each tap's products done for
  the whole block before the next tap's, so a tap's weights are read once per
  block (from L2), not once per row; each dx element still adds the taps in
  (kh, kw) order: the same bits (measured on a Zen 3, 2 threads: 1.04-1.18x on
  8x8 and 16x16 layers of 128-256 channels and at stride 2, 1.0x elsewhere).
  1x1 at stride 1 without padding: several rows per product, as in the
  forward (1.10-1.21x on 8x8 and 4x4 layers, the same bits).
* backward weight: the split of the work never depends on the thread count,
  so dw is bit-identical run to run and whatever the number of threads. The
  path is chosen by _weight_gradient_path (``weight_gradient_path`` names it).
  Filter-row path (more than one tap, and the products' columns, KW*Cin, or Cin
  with dilated columns, at least _FILTER_ROWS_MIN_VECTORS vectors with at most
  an eighth of padding; or few filters for the vector length, a fifth or more
  of Cout's padded columns being padding, and at least 2 vectors of columns no
  more padded than that): per kernel row kh (per tap with dilated columns),
  image and block of output rows, one product ``dwT[kh] += dy.T @ X`` with the
  filters as its rows, ``A[co, (oh, ow)] = dy[n, oh, ow, co]`` broadcast, and
  ``X[(oh, ow), kw*Cin + ci] = x[n, ih, ow*sw + kw, ci]``: the kernel row's
  inputs at an output pixel, KW*Cin contiguous elements read as vectors in
  place (from a zero-padded copy of x when a kernel column falls outside the
  image, or when the columns are padded to the vector length: the extra columns
  read the next inputs and are dropped). Items of (kernel row, block of at most
  _FILTER_ROWS_BLOCK filters) reduce over every image in order, then write
  their block of dwT into dw. Each element of dw sums its terms in the order
  of the row path below, so where it ran before, the same bits. Measured on a
  Zen 3, 2 threads, 16-image chunks, against the paths it replaced (the row
  path, and a channel-major copy of x for 64+ input channels): 1.2-1.46x for
  3x3 32x32x16 -> 16, 32x32x64 -> 64, 16x16x64 -> 128, 5x5 28x28x10 -> 24
  and odd filter counts (24, 48, 100); 0.9-1.1x on 8x8x128..256 and stride 2.
  Otherwise (1x1 kernels, few columns), direct path (dil_w == 1): per image
  and kernel row kh one product ``dw[kh] += A @ dy[n]`` with ``A[kw*Cin + ci,
  (oh, ow)] = x[n, ih, ow*sw + kw, ci]``, reducing over all the image's output
  pixels (output rows are the segments) in registers, in products of a few
  output rows each (_B_BLOCK_BYTES: the block of dy stays in L1). When a
  kernel column falls outside the image, x is first copied with zero columns;
  when Cout is not a multiple of the vector length, dy with zero columns (and
  dw goes through a padded buffer); these copies are made when the whole
  batch's copies fit _COPY_BUDGET_BYTES; else such layers take the im2col path
  below. With enough (kh, kw, ci) rows (at least _MIN_ROW_TILES microkernel
  tiles) the rows are dealt to a multiple of the thread count of items (about
  _ROW_TILES_PER_ITEM tiles each), each owning its rows of dw and reducing
  over every image in order: no partial buffers and no reduction pass; which
  item sums a row never changes its bits (for a 1x1 kernel at stride 1 without
  padding, an item's products run over blocks of the pixels of all the images
  at once, not image by image: the same bits, 1.6x on 4x4 layers, 1.05-1.1x on
  8x8 and 16x16 ones). Otherwise work is dealt in order to a
  fixed number of chunks (of images, or of blocks of _PIXEL_BLOCK pixels whose
  im2col rows are gathered and ``col_block.T @ dy_block`` added), each with its
  own ``(KH*KW*Cin, Cout)`` partial, and the partials are added in chunk order.
  On the item paths db is summed in partials over a split of the pixels fixed
  by the shape.

Columns (Cout for forward and weight gradient, Cin for input gradient) are
padded to a multiple of the vector length in packed weights/scratch rows when
they are not one already.
"""

import numba
import numpy as np
from numba import njit, prange

from fastcnn.kernels.gemm import MR, NB, NV, VBYTES, copy_vector, ensure_gemm, fill, gemm, prange_only
from fastcnn.shapes import pair, same_padding, window_output_size

# Number of partial buffers of the weight gradient: fixed (never the thread
# count), so dw is bit-identical whatever the number of threads; fewer when
# the partials would hold more than _PARTIAL_BUDGET elements.
_WEIGHT_CHUNKS = 16
_PARTIAL_BUDGET = 1 << 23
# Forward and input gradient: rows are dealt to this many chunks (scratch is
# allocated once per chunk; rows are independent, so the split never changes
# a result). A constant: numba.get_num_threads() inside a kernel defeats caching.
_ROW_CHUNKS = 64
# Output pixels per block of the weight gradient.
_PIXEL_BLOCK = 256
# Weight gradient, direct path: when the (kh, kw, ci) rows of dw make at least
# _MIN_ROW_TILES microkernel row tiles, the tiles are dealt to a multiple of the
# thread count of items of about _ROW_TILES_PER_ITEM tiles (an item may span kernel
# rows), and each item reduces over all the images itself: no partial buffers, no
# reduction pass. _ROW_TILES_PER_ITEM also fixes the split of the db partials.
_MIN_ROW_TILES = 12
_ROW_TILES_PER_ITEM = 8
# Weight gradient: each product reduces over at most as many pixels as make this many
# bytes of dy columns (a block of gemm's NB column vectors per pixel): they stay in L1
# (32 KiB or more) while the product's row tiles read them.
_B_BLOCK_BYTES = 16 * 1024
# Weight gradient, filter-row path (module docstring): for kernels of more than one tap whose
# products have at least this many vectors of columns (KW*Cin, or Cin with dilated columns), of which
# at most an eighth are padding; in items of at most _FILTER_ROWS_BLOCK filters.
_FILTER_ROWS_MIN_VECTORS = 3
_FILTER_ROWS_BLOCK = 32
# Weight gradient: the direct path reads zero-padded copies of x and dy (padding, Cout not a
# multiple of the vector length) when the copies of the whole batch take at most this many
# bytes (e.g. not for a batch of 224x224 images into 24 filters, whose dy copy would take
# 400 MB); else im2col. (An earlier rule also asked that an image of both take at most 192 KiB
# or KW*Cin < 32: measured again on a Zen 3, 2 threads, 16-image chunks, the direct path was
# 0.98-1.45x as fast as im2col on every shape tried, e.g. 1.36x for 16x16x128 -> 128 and 1.42x
# for 32x32x32 -> 32, never slower beyond noise.)
_COPY_BUDGET_BYTES = 1 << 28
# Forward, one input channel and fewer filters than a vector: output pixels per
# transposed product (whole rows of SW padded columns).
_TPOSED_COLUMNS = 1024
# Input gradient at stride 1: below this many filters, the forward kernel on dy (flipped kernel).
_VIA_FORWARD_FILTERS = 64
# Forward with a kernel column outside the image: below this many contiguous inputs per kernel
# row (KW*Cin), the kernel rows are always copied into zero-padded rows (dil_w == 1), or an
# im2col row is gathered (dilated columns), for one product (K = KH*KW*Cin) instead of one
# per kernel column.
_MIN_DIRECT = 32
# Forward with a kernel column outside the image (padding, or a right edge), dil_w == 1:
# the kernel rows are also copied into zero-padded rows for one product over all the taps
# while the product's weight panel (KH*KW*Cin rows, one microkernel tile of columns)
# takes at most this many bytes; past it (and from _MIN_DIRECT inputs per kernel row), one
# product per kernel column. Measured on a Zen 3 (AVX2), 2 threads: 3x3 with 16 to 64
# input channels 1.02-1.23x faster than one product per column; with every padded layer
# copied, 128 channels ran at 0.96x and 256 channels at 0.76x.
_SLAB_PANEL_BYTES = 48 * 1024
# 1x1 convolution at stride 1 without padding (forward and input gradient): the output rows of
# a chunk are done in products of up to this many pixels (whole rows, across images).
_POINTWISE_PIXELS = 96
# Input gradient (per-tap products): rows of dx in blocks of at most this many bytes (at least one
# row), each tap's products done for the whole block before the next tap.
_DX_BLOCK_BYTES = 64 * 1024


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

@njit(error_model="numpy", cache=True, fastmath=True)
def _im2col_pixel(x3, crow, n, oh, ow, H, W, Cin, KH, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """crow[(kh*KW + kw)*Cin + ci] = x[n, oh*sh - pt + kh*dh, ow*sw - pl + kw*dw, ci] (0 outside).

    x3 is x seen as (N, H, W*Cin). When the kernel row lies inside the image
    and dil_w == 1, its KW*Cin inputs are contiguous: one copy.
    """
    zero = crow.dtype.type(0)
    iw0 = ow * stride_w - pad_left
    L = KW * Cin
    for kh in range(KH):
        ih = oh * stride_h - pad_top + kh * dil_h
        base = kh * L
        if ih < 0 or ih >= H:
            fill(crow[base:base + L], zero)
            continue
        xrow = x3[n, ih]
        if dil_w == 1 and iw0 >= 0 and iw0 + KW <= W:
            copy_vector(crow[base:base + L], xrow[iw0 * Cin:iw0 * Cin + L])
            continue
        for kw in range(KW):
            iw = iw0 + kw * dil_w
            off = base + kw * Cin
            if iw < 0 or iw >= W:
                fill(crow[off:off + Cin], zero)
            else:
                copy_vector(crow[off:off + Cin], xrow[iw * Cin:iw * Cin + Cin])


@njit(error_model="numpy", cache=True)
def _ceil_div(a, b):
    """ceil(a / b) for b > 0 and any integer a."""
    return -((-a) // b)


@njit(error_model="numpy", cache=True, inline="always")
def _row_piece(q, q1, TK, L):
    """The weight gradient's row tiles q..q1-1 (tile q: kernel row q // TK, rows of its tile q % TK,
    TK tiles of MR rows per kernel row of L rows): (kh, r0, r1, next q) of the piece from tile q to
    the end of its kernel row or q1, the rows r0 <= r < r1 of kernel row kh."""
    kh = q // TK
    r0 = (q - kh * TK) * MR
    r1 = min(L, (min(q1, (kh + 1) * TK) - kh * TK) * MR)
    return kh, r0, r1, (kh + 1) * TK


@njit(error_model="numpy", cache=True)
def tap_output_row(ih, kh, pad_top, dil_h, stride_h, OH):
    """The output row oh whose kernel row kh reads input row ih (ih = oh*stride_h + kh*dil_h - pad_top),
    or -1 when there is none (the input gradients, which go by input rows)."""
    t = ih + pad_top - kh * dil_h
    if t < 0:
        return -1
    oh = t // stride_h
    if oh * stride_h != t or oh >= OH:
        return -1
    return oh


@njit(error_model="numpy", cache=True)
def _pointwise(KH, KW, stride_h, stride_w, pad_top, pad_left, H, W, OH, OW):
    """A 1x1 kernel at stride 1 without padding (so OH == H and OW == W): the pixels of x and of the
    output follow each other in memory in the same order, across rows and images, and a product may
    span several output rows."""
    return (KH == 1 and KW == 1 and stride_h == 1 and stride_w == 1 and pad_top == 0 and pad_left == 0
            and OH == H and OW == W)


@njit(error_model="numpy", cache=True, inline="always")
def _pointwise_product(out2, acc, init, a2, w2, p0, P, in_place, write_out):
    """Rows p0 <= p < p0 + P of out2 (pixels, C) = init (Cp,) + a2[p] (pixels, K) @ w2 (K, Cp): the
    1x1 convolution's product over several output rows (its forward, and its input gradient). In out2
    itself when ``in_place`` (C == Cp), else in acc's first P rows (Cp wide), then copied to out2 when
    ``write_out`` (else the caller's epilogue reads them there). Inlined: called, it measured 0.88-0.90x
    on a 32x32x16 -> 20 layer (`scripts/bench_conv_ab.py`), inlined 0.94-1.0x of the code it replaced."""
    K = a2.shape[1]
    Cp = w2.shape[1]
    C = out2.shape[1]
    out = out2[p0:p0 + P] if in_place else acc[:P]
    for p in range(P):
        copy_vector(out[p], init)
    gemm(out2.reshape(-1) if in_place else acc.reshape(-1), p0 * Cp if in_place else 0, Cp, a2.reshape(-1), p0 * K,
          K, 1, w2.reshape(-1), 0, Cp, K, 1, 0, 0, P, Cp // (VBYTES // out2.itemsize))
    if write_out and not in_place:
        for p in range(P):
            copy_vector(out2[p0 + p], acc[p, :C])


# The weight gradient's paths (module docstring), as _weight_gradient_path names them.
WG_IM2COL, WG_DIRECT, WG_ROWS, WG_FILTER_ROWS = 0, 1, 2, 3
WEIGHT_GRADIENT_PATHS = ("im2col", "direct", "rows", "filter_rows")


@njit(error_model="numpy", cache=True)
def _padded_width(W, KW, OW, stride_w, pad_left, dil_w):
    """The width of x's rows with the zero columns the kernel windows reach (left padding, past the
    right edge): W when every kernel column falls inside the image."""
    return max(pad_left + W, (OW - 1) * stride_w + (KW - 1) * dil_w + 1)


@njit(error_model="numpy", cache=True)
def _weight_gradient_path(N, H, W, Cin, KH, KW, Cout, OH, OW, stride_w, pad_left, dil_w, itemsize):
    """The weight gradient's path for this shape (WG_*; the one home of the rule, module docstring).

    Filter rows: more than one tap and at least _FILTER_ROWS_MIN_VECTORS vectors of columns (KW*Cin,
    or Cin with dilated columns) of which at most an eighth are padding, or few filters for the vector
    length (``narrow`` below), and x's copy (when padded) within _COPY_BUDGET_BYTES. Else direct
    (dil_w == 1, the copies of x and dy within the budget), as row items with at least _MIN_ROW_TILES
    row tiles; else im2col.
    """
    VL = VBYTES // itemsize
    WP = _padded_width(W, KW, OW, stride_w, pad_left, dil_w)
    wide = WP > W
    LG = KW * Cin if dil_w == 1 else Cin
    LGP = ((LG + VL - 1) // VL) * VL
    fr_bytes = (N * H * WP * Cin + LGP if wide or LGP != LG else 0) * itemsize
    Np = ((Cout + VL - 1) // VL) * VL
    # Few filters for the vector length (a fifth or more of the padded columns Np are padding, e.g. 8 or
    # 12 filters in AVX-512's 16 lanes, 37 in 48): the other paths' product columns are the filters;
    # filter rows from 2 vectors of columns that are no more padded. Measured on a Zen 4 (AVX-512),
    # 2 threads, 16-image chunks, against the row path: 1.65x for 28x28x8 -> 8, 1.28x for 14x14x12 -> 12,
    # 1.36x for 15x15x13 -> 37, 0.99x for 5x5 28x28x10 -> 24.
    narrow = LGP >= 2 * VL and LG * Np >= LGP * Cout and 5 * Cout <= 4 * Np
    if (KH * KW > 1 and fr_bytes <= _COPY_BUDGET_BYTES
            and (narrow or (LG >= _FILTER_ROWS_MIN_VECTORS * VL and (LGP - LG) * 8 <= LGP))):
        return WG_FILTER_ROWS
    copy_bytes = N * ((H * WP * Cin if wide else 0) + (OH * OW * Np if Np != Cout else 0)) * itemsize
    if dil_w != 1 or copy_bytes > _COPY_BUDGET_BYTES:
        return WG_IM2COL
    if KH * ((KW * Cin + MR - 1) // MR) >= _MIN_ROW_TILES:
        return WG_ROWS
    return WG_DIRECT


@njit(error_model="numpy", cache=True)
def _pack_columns(m, cols_padded):
    """(R, Cc) -> (R, cols_padded) C-contiguous, zeros in the extra columns."""
    R, Cc = m.shape
    out = np.zeros((R, cols_padded), dtype=m.dtype)
    for r in range(R):
        for c in range(Cc):
            out[r, c] = m[r, c]
    return out


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------

@njit(error_model="numpy", cache=True, inline="always")
def _epilogue_pass(a, y, r, res, relu):
    """y = relu?(a (+ r)) over 1-D views indexed from 0 (``a`` may be ``y``: in place), one loop per
    case: a loop that tests a flag does not vectorize (measured 3-4x slower).

    The ReLU reads ``v + 0``: it equals v (and is +0 for -0, which the ReLU makes 0 anyway), but LLVM
    cannot prove the stored value is the loaded one, so an in-place ReLU stays a plain vector pass
    instead of masked stores of the zeros alone (which Zen 3 runs about 4x slower)."""
    zero = y.dtype.type(0)
    if res and relu:
        for t in range(y.shape[0]):
            v = a[t] + r[t]
            y[t] = zero if v <= zero else v
    elif res:
        for t in range(y.shape[0]):
            y[t] = a[t] + r[t]
    elif relu:
        for t in range(y.shape[0]):
            v = a[t] + zero
            y[t] = zero if v <= zero else v
    else:
        for t in range(y.shape[0]):
            y[t] = a[t]


@njit(error_model="numpy", cache=True)
def _epilogue(acc, yrow, rrow, relu, in_place):
    """(A function called, not inlined into the forward's three call sites: inlined, each site's copy
    of the four loops cost the forward's cold compile about 3 s; its compile went from 23 s to 14 s,
    the same speed within noise: `scripts/bench_conv_ab.py --epilogue relu`. _epilogue_pass stays
    inlined into it: called, its in-place pass would see two aliasing arguments and fall back to
    LLVM's scalar loop.)

    An output row's products, in cache, written to yrow (OW, Cout): plus the same row of a residual
    branch (``rrow``, when not empty), then ReLU (``relu``; NaN stays, as torch.relu; -0.0 gives +0.0,
    as the ReLU layer). The products are in yrow itself (``in_place``: one loop over the whole row) or
    in acc (OW, Np > Cout: padded columns; one loop per pixel).

    In place, the pass reads and writes one view (two views of the same row make LLVM's overlap check
    fail at run time and take its scalar loop: measured 2.5x slower)."""
    OW, Cout = yrow.shape
    res = rrow.shape[0] > 0
    if in_place:
        yf = yrow.reshape(-1)
        _epilogue_pass(yf, yf, rrow.reshape(-1), res, relu)
    else:
        for ow in range(OW):
            _epilogue_pass(acc[ow, :Cout], yrow[ow], rrow[ow] if res else yrow[ow], res, relu)


@njit(error_model="numpy", parallel=prange_only(), cache=True)
def _conv2d_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, res, relu):
    """y (N, OH, OW, Cout) = conv(x (N, H, W, Cin), w (KH, KW, Cin, Cout)) + b; y overwritten; then
    plus ``res`` (y's shape) when not empty and ReLU when ``relu`` (_epilogue), on each output row
    while it is in cache."""
    N, H, W, Cin = x.shape
    KH, KW, _, Cout = w.shape
    OH = y.shape[1]
    OW = y.shape[2]
    K = KH * KW * Cin
    VL = VBYTES // y.itemsize
    NVt = (Cout + VL - 1) // VL
    Np = NVt * VL
    # Weights as (K, Np): row (kh*KW + kw)*Cin + ci, zero columns past Cout.
    wp = _pack_columns(np.ascontiguousarray(w).reshape(K, Cout), Np)
    wflat = wp.reshape(-1)
    bp = np.zeros(Np, dtype=y.dtype)
    for co in range(Cout):
        bp[co] = b[co]
    x3 = x.reshape(N, H, W * Cin)
    zero = y.dtype.type(0)
    # Output columns whose every kernel column is inside the image.
    full_w = dil_w == 1 and pad_left == 0 and (OW - 1) * stride_w + KW <= W
    # A kernel column outside the image (padding, or a right edge), and few inputs per kernel
    # row or a small weight panel: the output row's kernel rows are copied into a slab of
    # zero-padded rows of SW inputs each, and one product reads it as the full-width case reads x.
    slab = not full_w and dil_w == 1 and (
        KW * Cin < _MIN_DIRECT or K * min(NVt, NV) * VBYTES <= _SLAB_PANEL_BYTES)
    direct = not slab and KW * Cin >= _MIN_DIRECT
    SW = max(pad_left + W, (OW - 1) * stride_w + KW)
    # One input channel, stride 1 and fewer filters than a vector (e.g. LeNet's first
    # layer): the product runs transposed, the filters as the microkernel's rows and the
    # output pixels of up to G output rows of an image as its vector columns, column
    # g*SW + ow for pixel (oh0 + g, ow): A = the weights wt (KH, Cout, KW), B = the G +
    # (KH-1)*dh input rows, zero-padded to SW columns (zero rows outside the image), one
    # after the other in pin, read at column index + kh*dh*SW + kw; into accT (Cout, JP),
    # then written out to y.
    tposed = Cin == 1 and stride_h == 1 and stride_w == 1 and dil_w == 1 and Cout < VL
    # 1x1 at stride 1 without padding: the rows of x and y follow each other in memory (across
    # images too), so one product covers GP output rows: M = GP*OW rows instead of OW (an 8x8
    # layer's 8 rows make a 6-row and a 2-row tile, the 2-row tile short of accumulators to hide
    # the FMA latency). Each output element is still summed in the same order: the same bits.
    pointwise = not tposed and _pointwise(KH, KW, stride_h, stride_w, pad_top, pad_left, H, W, OH, OW)
    GP = max(1, _POINTWISE_PIXELS // OW) if pointwise else 1
    x2 = x.reshape(N * H * W, Cin)
    y2 = y.reshape(N * OH * OW, Cout)
    res2 = res.reshape(N * OH * OW if res.shape[0] > 0 else 0, Cout)
    G = max(1, min(OH, _TPOSED_COLUMNS // SW))
    JP = ((G * SW + VL - 1) // VL) * VL
    wt = np.empty((KH if tposed else 0, Cout, KW), dtype=y.dtype)
    for kh in range(wt.shape[0]):
        for co in range(Cout):
            for kw in range(KW):
                wt[kh, co, kw] = w[kh, kw, 0, co]
    wtf = wt.reshape(-1)
    # Without padded columns the products accumulate straight into y.
    in_place = Np == Cout
    epilogue = relu or res.shape[0] > 0
    R = N * OH
    nchunks = min(R, _ROW_CHUNKS)
    for c in prange(nchunks):
        # Scratch once per chunk of rows (rows are independent: any split
        # gives the same result).
        acc = np.empty((OW * GP, Np), dtype=y.dtype)
        col = np.empty((OW, 0 if direct or slab else K), dtype=y.dtype)
        colf = col.reshape(-1)
        # Zero columns left and right of the copied inputs, written once.
        rows_p = np.zeros((KH if slab else 0, SW * Cin), dtype=y.dtype)
        rows_pf = rows_p.reshape(-1)
        accT = np.empty((Cout if tposed else 0, JP), dtype=y.dtype)
        nores = np.empty((0, Cout), dtype=y.dtype)
        accTf = accT.reshape(-1)
        # Input rows, and zeros past the last one for the columns read beyond it.
        pin = np.zeros(((G + (KH - 1) * dil_h) * SW + VL + KW) if tposed else 0, dtype=y.dtype)
        r = (c * R) // nchunks
        r_end = ((c + 1) * R) // nchunks
        while tposed and r < r_end:
            n = r // OH
            oh0 = r - n * OH
            g = min(G, OH - oh0, r_end - r)
            nrows = g + (KH - 1) * dil_h
            for i in range(nrows):
                ih = oh0 - pad_top + i
                if 0 <= ih < H:
                    copy_vector(pin[i * SW + pad_left:i * SW + pad_left + W], x3[n, ih])
                else:
                    fill(pin[i * SW:(i + 1) * SW], zero)
            fill(pin[nrows * SW:], zero)
            for co in range(Cout):
                fill(accT[co], b[co])
            gemm(accTf, 0, JP, wtf, 0, KW, 1, pin, 0, 1, KW, KH, Cout * KW, dil_h * SW, Cout,
                  (g * SW + VL - 1) // VL)
            for i in range(g):
                yrow = y[n, oh0 + i]
                for ow in range(OW):
                    for co in range(Cout):
                        yrow[ow, co] = accT[co, i * SW + ow]
            if epilogue:  # once over the block's g rows (short rows: one pass each cost more than a pass)
                yblk = y[n, oh0:oh0 + g].reshape(g * OW, Cout)
                _epilogue(yblk, yblk, res[n, oh0:oh0 + g].reshape(g * OW, Cout) if res.shape[0] > 0 else nores,
                          relu, True)
            r += g
        while pointwise and r < r_end:
            g = min(GP, r_end - r)
            p0 = r * OW
            P = g * OW
            _pointwise_product(y2, acc, bp, x2, wp, p0, P, in_place, not epilogue)
            if epilogue:
                _epilogue(acc[:P], y2[p0:p0 + P], res2[p0:p0 + P] if res.shape[0] > 0 else nores, relu, in_place)
            r += g
        for r in range(r_end if tposed or pointwise else (c * R) // nchunks, r_end):
            n = r // OH
            oh = r - n * OH
            # Kernel rows inside the image: kh0 <= kh < kh1.
            t = pad_top - oh * stride_h
            kh0 = max(0, _ceil_div(t, dil_h))
            kh1 = min(KH, _ceil_div(H + t, dil_h))
            if in_place:
                af = y[n, oh].reshape(-1)
                out = y[n, oh]
            else:
                af = acc.reshape(-1)
                out = acc
            for ow in range(OW):
                copy_vector(out[ow], bp)
            if full_w:
                # All taps of all valid kernel rows in one product: for kernel
                # row kh, A[ow, kw*Cin + ci] = x3[n, ih, ow*sw*Cin + kw*Cin + ci].
                if kh1 > kh0:
                    gemm(af, 0, Np, x3[n].reshape(-1), (kh0 * dil_h - t) * W * Cin, stride_w * Cin, 1,
                          wflat, kh0 * KW * Cin * Np, Np, KW * Cin, kh1 - kh0, dil_h * W * Cin, KW * Cin * Np,
                          OW, NVt)
            elif slab:
                if kh1 > kh0:
                    for kh in range(kh0, kh1):
                        copy_vector(rows_p[kh, pad_left * Cin:(pad_left + W) * Cin], x3[n, kh * dil_h - t])
                    gemm(af, 0, Np, rows_pf, kh0 * SW * Cin, stride_w * Cin, 1, wflat, kh0 * KW * Cin * Np, Np,
                          KW * Cin, kh1 - kh0, SW * Cin, KW * Cin * Np, OW, NVt)
            elif direct:
                for kw in range(KW):
                    # ow with 0 <= ow*sw - pl + kw*dw < W
                    u = pad_left - kw * dil_w
                    ow0 = max(0, _ceil_div(u, stride_w))
                    ow1 = min(OW, _ceil_div(W + u, stride_w))
                    if ow1 <= ow0 or kh1 <= kh0:
                        continue
                    gemm(af, ow0 * Np, Np, x3[n].reshape(-1),
                          (kh0 * dil_h - t) * W * Cin + (ow0 * stride_w - u) * Cin, stride_w * Cin, 1,
                          wflat, (kh0 * KW + kw) * Cin * Np, Np, Cin, kh1 - kh0, dil_h * W * Cin, KW * Cin * Np,
                          ow1 - ow0, NVt)
            else:
                for ow in range(OW):
                    _im2col_pixel(x3, col[ow], n, oh, ow, H, W, Cin, KH, KW, stride_h, stride_w, pad_top,
                                  pad_left, dil_h, dil_w)
                gemm(af, 0, Np, colf, 0, K, 1, wflat, 0, Np, K, 1, 0, 0, OW, NVt)
            if epilogue:
                _epilogue(acc, y[n, oh], res[n, oh] if res.shape[0] > 0 else nores, relu, in_place)
            elif not in_place:
                yrow = y[n, oh]
                for ow in range(OW):
                    copy_vector(yrow[ow], acc[ow, :Cout])


@njit(error_model="numpy", parallel=prange_only(), cache=True)
def _conv2d_backward_input(dy, w, dx, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dx (N, H, W, Cin) = dL/dx given dy (N, OH, OW, Cout); dx fully overwritten.

    Per input row (n, ih), for each tap (kh, kw) whose output row
    oh = (ih + pt - kh*dh) / sh exists: dx[n, ih, iw] += dy[n, oh, ow] @
    w[kh, kw].T for the ow with iw = ow*sw - pl + kw*dw inside the row.
    """
    N, H, W, Cin = dx.shape
    KH, KW, _, Cout = w.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    VL = VBYTES // dx.itemsize
    NVt = (Cin + VL - 1) // VL
    Cp = NVt * VL
    # wt[(kh*KW + kw)*Cout + co, ci] = w[kh, kw, ci, co], zero columns past Cin.
    wt = np.zeros((KH * KW * Cout, Cp), dtype=dx.dtype)
    for kh in range(KH):
        for kw in range(KW):
            base = (kh * KW + kw) * Cout
            for ci in range(Cin):
                for co in range(Cout):
                    wt[base + co, ci] = w[kh, kw, ci, co]
    wflat = wt.reshape(-1)
    dy3 = dy.reshape(N, OH, OW * Cout)
    zero = dx.dtype.type(0)
    in_place = Cp == Cin
    # 1x1 at stride 1 without padding: GP input rows per product, as in the forward.
    pointwise = _pointwise(KH, KW, stride_h, stride_w, pad_top, pad_left, H, W, OH, OW)
    GP = max(1, _POINTWISE_PIXELS // W) if pointwise else 1
    dy2 = dy.reshape(N * OH * OW, Cout)
    dx2 = dx.reshape(N * H * W, Cin)
    dxf = dx.reshape(-1)
    zeros = np.zeros(Cp, dtype=dx.dtype)
    R = N * H
    nchunks = min(R, _ROW_CHUNKS)
    # Rows in blocks of RB: each tap's weights (Cout x Cp) are read once per block of rows, from L2,
    # not once per row; each dx element still adds the taps in (kh, kw) order: the same bits.
    RB = max(1, _DX_BLOCK_BYTES // (W * Cp * dx.itemsize))
    for c in prange(nchunks):
        acc = np.empty((W * max(GP, 1 if in_place else RB), Cp), dtype=dx.dtype)
        accf = acc.reshape(-1)
        r = (c * R) // nchunks
        r_end = ((c + 1) * R) // nchunks
        while pointwise and r < r_end:
            g = min(GP, r_end - r)
            _pointwise_product(dx2, acc, zeros, dy2, wt, r * W, g * W, in_place, True)
            r += g
        for r0 in range(r_end if pointwise else (c * R) // nchunks, r_end, RB):
            r1 = min(r_end, r0 + RB)
            for r in range(r0, r1):
                n = r // H
                ih = r - n * H
                out = dx[n, ih] if in_place else acc[(r - r0) * W:(r - r0 + 1) * W]
                for iw in range(W):
                    fill(out[iw], zero)
            for kh in range(KH):
                for kw in range(KW):
                    # iw = ow*sw + s with s = kw*dw - pl; 0 <= iw < W, 0 <= ow < OW
                    s = kw * dil_w - pad_left
                    ow0 = max(0, _ceil_div(-s, stride_w))
                    ow1 = min(OW, _ceil_div(W - s, stride_w))
                    if ow1 <= ow0:
                        continue
                    for r in range(r0, r1):
                        n = r // H
                        ih = r - n * H
                        oh = tap_output_row(ih, kh, pad_top, dil_h, stride_h, OH)
                        if oh < 0:
                            continue
                        c0 = r * W * Cp if in_place else (r - r0) * W * Cp
                        gemm(dxf if in_place else accf, c0 + (ow0 * stride_w + s) * Cp, stride_w * Cp, dy3[n, oh],
                             ow0 * Cout, Cout, 1, wflat, (kh * KW + kw) * Cout * Cp, Cp, Cout, 1, 0, 0, ow1 - ow0,
                             NVt)
            if not in_place:
                for r in range(r0, r1):
                    n = r // H
                    ih = r - n * H
                    dxrow = dx[n, ih]
                    for iw in range(W):
                        copy_vector(dxrow[iw], acc[(r - r0) * W + iw, :Cin])


@njit(error_model="numpy", parallel=prange_only(), cache=True)
def _conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, threads):
    """dw (KH, KW, Cin, Cout) and db (Cout,) = dL/dw, dL/db; both overwritten (not accumulated).

    ``threads``: Numba's thread count, used only to deal the items of the filter-row and
    row paths evenly (which item computes an element of dw never changes its sum).

    Filter-row path (more than one tap, enough columns; see the module docstring): per
    group (kernel row, or tap with dilated columns), image and block of output rows, one
    product dwT[g, co, (kw, ci)] += sum_p dy[p, co] * x[p's input pixel, (kw, ci)], the
    filters its rows; items of (group, block of filters) reduce over every image in order,
    then write their block of dwT into dw. Row path (direct, dil_w == 1, at least
    _MIN_ROW_TILES row tiles; see the module docstring for when x and dy are read from
    zero-padded copies): the (kh, kw, ci) rows of dw, dealt to items of whole microkernel
    tiles, each reducing over every image in order straight from x and dy. On both, db is
    summed in partials over a split of the dy rows fixed by the shape (iteration c <
    nchunks sums partial c). Otherwise the images are dealt to (at most) _WEIGHT_CHUNKS
    chunks in order (direct); or the N*OH*OW output pixels are cut into blocks of
    _PIXEL_BLOCK, dealt to the chunks in order, and each chunk adds col_block.T @ dy_block
    (im2col) into its partial. Each chunk has its own (K, Cout) partial and the partials
    are added in chunk order: the result does not depend on scheduling or the thread count.
    """
    N = x.shape[0]
    KH, KW, Cin, Cout = dw.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    K = KH * KW * Cin
    P = N * OH * OW
    VL = VBYTES // dw.itemsize
    NVt = (Cout + VL - 1) // VL
    Np = NVt * VL
    OHW = OH * OW
    H = x.shape[1]
    W = x.shape[2]
    x3 = x.reshape(N, H, W * Cin)
    dy2 = dy.reshape(P, Cout)
    budget = max(1, _PARTIAL_BUDGET // max(1, K * Np))
    T = max(1, threads)
    path = _weight_gradient_path(N, H, W, Cin, KH, KW, Cout, OH, OW, stride_w, pad_left, dil_w, dw.itemsize)
    fr = path == WG_FILTER_ROWS
    rows = path == WG_ROWS
    direct = rows or path == WG_DIRECT
    # The filter-row and direct paths read x from a copy xw with zero columns, rows of WP inputs, when
    # a kernel column falls outside the image (padding, or a right edge).
    WP = _padded_width(W, KW, OW, stride_w, pad_left, dil_w)
    wide = (fr or direct) and WP > W
    # Filter-row path: groups g of LG columns (kw, ci): kernel rows (LG = KW*Cin), or with dilated
    # columns kernel taps (LG = Cin); dwT (NG, Cout, LGP) holds the products' rows (filters) with the
    # columns padded to a multiple of the vector length, whose extra columns read the next inputs of
    # x's rows and are dropped (x is then read from xw, which has a tail of LGP zeros).
    LG = KW * Cin if dil_w == 1 else Cin
    NG = KH if dil_w == 1 else KH * KW
    LGP = ((LG + VL - 1) // VL) * VL
    fr_copy = fr and (wide or LGP != LG)
    # Direct paths: when Cout is not a multiple of the vector length, dy is read from a copy dyw
    # with zero columns (rows of Np) and the rows of dw go to dwp (K, Np) first.
    padcols = direct and Np != Cout
    PB = _PIXEL_BLOCK
    nblocks = (P + PB - 1) // PB
    if direct:
        nchunks = min(N, _WEIGHT_CHUNKS, budget)
    else:
        nchunks = min(nblocks, _WEIGHT_CHUNKS, budget)
    L = KW * Cin
    # Row items: the (kh, kw, ci) rows of dw, in groups of L = KW*Cin rows (one kernel row, one
    # product) of TG tiles of MR rows, are dealt to items of whole microkernel tiles; each item owns
    # its rows and reduces over every image in order. No dw partials.
    TG = (L + MR - 1) // MR
    nitems = 0
    if rows:
        # db partials: a split fixed by the shape (never by the thread count).
        nchunks = KH * ((TG + _ROW_TILES_PER_ITEM - 1) // _ROW_TILES_PER_ITEM)
        # The KH*TG tiles cut into a multiple of the thread count of items of at most about
        # _ROW_TILES_PER_ITEM tiles (3 items on 2 threads left one idle a third of the time).
        nitems = min(KH * TG, T * _ceil_div(KH * TG, T * _ROW_TILES_PER_ITEM))
    # Filter-row items: (group, block of FB filters, a multiple of the TR rows of gemm's tiles in
    # NB-vector blocks), at least two per thread where the filters allow; db partials over a split
    # fixed by the shape.
    TR = 4 if NB == 3 else MR
    FB = TR
    nfb = 1
    if fr:
        nfb = max(_ceil_div(Cout, _FILTER_ROWS_BLOCK), _ceil_div(2 * T, NG))
        FB = TR * _ceil_div(_ceil_div(Cout, min(nfb, _ceil_div(Cout, TR))), TR)
        nfb = _ceil_div(Cout, FB)
        nitems = NG * nfb
        nchunks = min(_WEIGHT_CHUNKS, max(1, P // PB))
    # Output rows per product: the microkernel's columns of B (dy on the row path, x on the
    # filter-row path) for that many pixels (a block of NB vectors per pixel) stay in L1 across its
    # row tiles. Splitting the pixels over successive products never changes a sum (the
    # accumulators go through dw exactly).
    SB = max(1, (_B_BLOCK_BYTES // (min(LGP // VL if fr else NVt, NB) * VBYTES)) // max(1, OW))
    # 1x1 at stride 1 without padding on the row path: the chunk's pixels, across images, follow
    # each other in x and dy, so the products run over blocks of PK pixels of the whole chunk
    # (SB output rows' worth) instead of image by image: a 4x4 image's 16 pixels made products
    # too short for the accumulators' loads and stores. Each dw element still sums its terms in
    # pixel order: the same bits.
    pointwise = rows and _pointwise(KH, KW, stride_h, stride_w, pad_top, pad_left, H, W, OH, OW)
    PK = SB * max(1, OW)
    partial = np.zeros((0 if rows or fr else nchunks, K * Np), dtype=dw.dtype)
    partial_b = np.zeros((nchunks, Cout), dtype=dw.dtype)
    zero = dw.dtype.type(0)
    # x with zero columns: rows of WP inputs (and LGP elements of slack on the filter-row path).
    xw = np.empty(N * H * WP * Cin + LGP if (direct and wide) or fr_copy else 0, dtype=dw.dtype)
    dyw = np.empty((N if padcols else 0, OHW, Np), dtype=dw.dtype)
    if (direct and wide) or padcols or fr_copy:
        for n in prange(N):
            if (direct and wide) or fr_copy:
                for ih in range(H):
                    xrow = xw[(n * H + ih) * WP * Cin:(n * H + ih + 1) * WP * Cin]
                    fill(xrow[:pad_left * Cin], zero)
                    copy_vector(xrow[pad_left * Cin:(pad_left + W) * Cin], x3[n, ih])
                    fill(xrow[(pad_left + W) * Cin:], zero)
            if padcols:
                for t in range(OHW):
                    copy_vector(dyw[n, t, :Cout], dy2[n * OHW + t])
                    fill(dyw[n, t, Cout:], zero)
        if fr_copy:
            fill(xw[N * H * WP * Cin:], zero)
    dwp = np.empty((K if padcols and rows else 0, Np), dtype=dw.dtype)
    dwT = np.empty((NG if fr else 0, Cout, LGP), dtype=dw.dtype)
    dwf = dwT.reshape(-1) if fr else (dwp.reshape(-1) if padcols else dw.reshape(-1))
    xf = xw if (direct and wide) or fr_copy else x.reshape(-1)
    dyf = dyw.reshape(-1) if padcols else dy.reshape(-1)
    HWC = H * WP * Cin
    OHWC = OHW * Np
    dw4 = dw.reshape(KH, KW * Cin, Cout)
    # One prange for all the paths: each prange is compiled as its own gufunc. On the item paths the
    # iterations are the items, and iteration c also sums the db partials j = c, c + nitems, ...
    # (Numba deals the iterations to the threads in contiguous ranges: with the partials as
    # iterations of their own, the items all fell to the first thread.)
    nloop = nitems if rows or fr else nchunks
    for c in prange(nloop):
        if rows or fr:
            for j in range(c, nchunks, nloop):
                pb = partial_b[j]
                for p in range((j * P) // nchunks, ((j + 1) * P) // nchunks):
                    dp = dy2[p]
                    for co in range(Cout):
                        pb[co] += dp[co]
        if fr:
            g = c // nfb
            co0 = (c - g * nfb) * FB
            co1 = min(Cout, co0 + FB)
            kh = g if dil_w == 1 else g // KW
            kw = 0 if dil_w == 1 else g - kh * KW
            fill(dwf[(g * Cout + co0) * LGP:(g * Cout + co1) * LGP], zero)
            u = pad_top - kh * dil_h
            oh0 = max(0, _ceil_div(u, stride_h))
            oh1 = min(OH, _ceil_div(H + u, stride_h))
            for n in range(N):
                for s0 in range(oh0, oh1, SB):
                    s1 = min(oh1, s0 + SB)
                    gemm(dwf, (g * Cout + co0) * LGP, LGP, dyf, (n * OH + s0) * OW * Cout + co0, 1, Cout,
                         xf, n * HWC + (s0 * stride_h - u) * WP * Cin + kw * dil_w * Cin, stride_w * Cin,
                         OW, s1 - s0, OW * Cout, stride_h * WP * Cin, co1 - co0, LGP // VL)
            # dw[kh, kw, ci, co] = dwT[g, co, (kw, ci)] for the item's filters.
            for j in range(LG):
                dwrow = dw4[kh, kw * Cin + j]
                for co in range(co0, co1):
                    dwrow[co] = dwT[g, co, j]
        elif rows:
            # Tiles q0 <= q < q1 (tile q: kernel row q // TG, rows of its tile q % TG), in pieces of
            # one kernel row each.
            q0 = c * KH * TG // nitems
            q1 = (c + 1) * KH * TG // nitems
            q = q0
            while q < q1:
                g, r0, r1, q = _row_piece(q, q1, TG, L)
                fill(dwf[(g * L + r0) * Np:(g * L + r1) * Np], zero)
            for p0 in range(0, P if pointwise else 0, PK):
                q = q0
                while q < q1:
                    g, r0, r1, q = _row_piece(q, q1, TG, L)
                    gemm(dwf, r0 * Np, Np, xf, p0 * Cin + r0, 1, Cin, dyf, p0 * Np, Np, min(PK, P - p0), 1, 0, 0,
                          r1 - r0, NVt)
            for n in range(0 if pointwise else N):
                q = q0
                while q < q1:
                    g, r0, r1, q = _row_piece(q, q1, TG, L)
                    # Row r of kernel row g at output pixel (oh, ow) of image n: x[n, oh*sh + g*dh -
                    # pad_top, ow*sw + kw - pad_left, ci] with r = kw*Cin + ci: in x (or xw) adjacent
                    # (lda 1), pixels sw*Cin apart, output rows sh*WP*Cin.
                    u = pad_top - g * dil_h
                    oh0 = max(0, _ceil_div(u, stride_h))
                    oh1 = min(OH, _ceil_div(H + u, stride_h))
                    a0 = n * HWC - u * WP * Cin + r0
                    for s0 in range(oh0, oh1, SB):
                        s1 = min(oh1, s0 + SB)
                        gemm(dwf, (g * L + r0) * Np, Np, xf, a0 + s0 * stride_h * WP * Cin, 1, stride_w * Cin,
                             dyf, n * OHWC + s0 * OW * Np, Np, OW, s1 - s0, stride_h * WP * Cin, OW * Np, r1 - r0,
                             NVt)
        elif direct:
            pc = partial[c]
            pb = partial_b[c]
            for n in range((c * N) // nchunks, ((c + 1) * N) // nchunks):
                for kh in range(KH):
                    # oh with 0 <= ih = oh*sh - u < H
                    u = pad_top - kh * dil_h
                    oh0 = max(0, _ceil_div(u, stride_h))
                    oh1 = min(OH, _ceil_div(H + u, stride_h))
                    for s0 in range(oh0, oh1, SB):
                        s1 = min(oh1, s0 + SB)
                        gemm(pc, kh * L * Np, Np, xf, n * HWC + (s0 * stride_h - u) * WP * Cin, 1, stride_w * Cin,
                              dyf, n * OHWC + s0 * OW * Np, Np, OW, s1 - s0, stride_h * WP * Cin, OW * Np, L,
                              NVt)
                for t in range(OHW):
                    dp = dy2[n * OHW + t]
                    for co in range(Cout):
                        pb[co] += dp[co]
        else:
            pc = partial[c]
            pb = partial_b[c]
            blk0 = (c * nblocks) // nchunks
            blk1 = ((c + 1) * nblocks) // nchunks
            col = np.empty((PB, K), dtype=dw.dtype)
            colf = col.reshape(-1)
            dyp = np.zeros((PB, Np), dtype=dw.dtype)
            dypf = dyp.reshape(-1)
            for blk in range(blk0, blk1):
                p0 = blk * PB
                cnt = min(PB, P - p0)
                for t in range(cnt):
                    p = p0 + t
                    n = p // OHW
                    rem = p - n * OHW
                    oh = rem // OW
                    ow = rem - oh * OW
                    _im2col_pixel(x3, col[t], n, oh, ow, H, W, Cin, KH, KW, stride_h, stride_w, pad_top,
                                  pad_left, dil_h, dil_w)
                if Np != Cout:
                    for t in range(cnt):
                        copy_vector(dyp[t, :Cout], dy2[p0 + t])
                    gemm(pc, 0, Np, colf, 0, 1, K, dypf, 0, Np, cnt, 1, 0, 0, K, NVt)
                else:
                    gemm(pc, 0, Np, colf, 0, 1, K, dy2[p0:p0 + cnt].reshape(-1), 0, Np, cnt, 1, 0, 0, K, NVt)
                for t in range(cnt):
                    dp = dy2[p0 + t]
                    for co in range(Cout):
                        pb[co] += dp[co]
    # Fixed-order reduction of the partials.
    if rows and padcols:
        dwm = dw.reshape(K, Cout)
        for k in range(K):
            copy_vector(dwm[k], dwp[k, :Cout])
    if not rows and not fr:
        # Serial: a third prange would cost about 2 s of cold compile, and these partials are small
        # (few rows of dw, or the rare im2col path: nchunks adds per dw element against 2*P
        # flops for its products). Element by element ((p0 + p1) + p2) + ..., in chunk order.
        dwm = dw.reshape(K, Cout)
        for k in range(K):
            row = dwm[k]
            copy_vector(row, partial[0, k * Np:k * Np + Cout])
            for c in range(1, nchunks):
                pc = partial[c, k * Np:k * Np + Cout]
                for co in range(Cout):
                    row[co] += pc[co]
    for co in range(Cout):
        s = partial_b[0, co]
        for c in range(1, nchunks):
            s += partial_b[c, co]
        db[co] = s


# --------------------------------------------------------------------------
# Public entry points: register the gemm symbol, then call the kernel
# --------------------------------------------------------------------------

def conv2d_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, relu=False, residual=None):
    """y (N, OH, OW, Cout) = conv(x (N, H, W, Cin), w (KH, KW, Cin, Cout)) + b; y overwritten.

    The epilogue, on each output row while it is in cache: ``residual`` (y's shape) added, then
    ``relu`` (y = max(y, 0), NaN stays)."""
    ensure_gemm(y.dtype)
    if residual is None:
        residual = np.empty((0, 0, 0, 0), y.dtype)
    elif residual.shape != y.shape or residual.dtype != y.dtype or not residual.flags.c_contiguous:
        raise ValueError(f"conv2d_forward: residual must be a C-contiguous {y.dtype} array of shape {y.shape}, "
                         f"got {residual.dtype} {residual.shape}")
    elif np.may_share_memory(residual, y):  # the products overwrite y before the epilogue reads it
        raise ValueError("conv2d_forward: residual must not share memory with y")
    _conv2d_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, residual, bool(relu))


def conv2d_backward_input(dy, w, dx, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dx (N, H, W, Cin) = dL/dx given dy (N, OH, OW, Cout); dx fully overwritten.

    At stride 1 with few filters this is the forward kernel on dy with the kernel flipped
    (``w[::-1, ::-1]`` as (KH, KW, Cout, Cin)) and padding ``(K-1)*dil - pad``: its products
    reduce over KW*Cout or KH*Cout per call where the per-tap products of
    _conv2d_backward_input reduce over Cout alone (measured 1.1-1.3x faster below
    _VIA_FORWARD_FILTERS filters for 3x3 and 5x5 kernels; no faster above, nor for 1x1).
    """
    ensure_gemm(dx.dtype)
    KH, KW, Cin, Cout = w.shape
    pt, pl = (KH - 1) * dil_h - pad_top, (KW - 1) * dil_w - pad_left
    if input_gradient_via_forward(w.shape, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
        flipped = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))
        _conv2d_forward(dy, flipped, np.zeros(Cin, dx.dtype), dx, 1, 1, pt, pl, dil_h, dil_w,
                        np.empty((0, 0, 0, 0), dx.dtype), False)
        return
    _conv2d_backward_input(dy, w, dx, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)


def input_gradient_via_forward(w_shape, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """Whether conv2d_backward_input runs the forward kernel (on dy, the kernel flipped) for weights of
    shape ``w_shape`` (KH, KW, Cin, Cout) and this geometry: stride 1, fewer than _VIA_FORWARD_FILTERS
    filters; not for 1x1 kernels (one tap: nothing to gain, measured 0.92-0.97x) nor for padding past
    the kernel's extent (the forward's padding would be negative)."""
    KH, KW, _, Cout = w_shape
    pt, pl = (KH - 1) * dil_h - pad_top, (KW - 1) * dil_w - pad_left
    return (stride_h == 1 and stride_w == 1 and Cout < _VIA_FORWARD_FILTERS and KH * KW > 1 and pt >= 0
            and pl >= 0)


def weight_gradient_path(x_shape, w_shape, dy_shape, stride_w, pad_left, dil_w, dtype):
    """The name of the path (WEIGHT_GRADIENT_PATHS) conv2d_backward_weight takes for these shapes
    (NHWC x and dy, HWIO w) and column geometry."""
    N, H, W, Cin = x_shape
    KH, KW, _, Cout = w_shape
    path = _weight_gradient_path(N, H, W, Cin, KH, KW, Cout, dy_shape[1], dy_shape[2], stride_w, pad_left, dil_w,
                                 np.dtype(dtype).itemsize)
    return WEIGHT_GRADIENT_PATHS[path]


def conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dw (KH, KW, Cin, Cout) and db (Cout,) = dL/dw, dL/db; both overwritten (not accumulated)."""
    ensure_gemm(dw.dtype)
    _conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
                            numba.get_num_threads())


# --------------------------------------------------------------------------
# Convenience (plain Python)
# --------------------------------------------------------------------------

def resolve_padding(padding, kernel_size, stride=1, dilation=1):
    """(pad_top, pad_bottom, pad_left, pad_right) from an int, a pair, "valid" or "same"."""
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, 0, 0, 0
        if mode == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {(sh, sw)}")
            top, bottom = same_padding(kh, dh)
            left, right = same_padding(kw, dw)
            return top, bottom, left, right
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = pair(padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    return ph, ph, pw, pw


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """y = conv2d(x NHWC, w HWIO) + b, allocated with x.dtype. padding: int, pair, "valid" or "same"."""
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"expected x (N, H, W, C) and w (KH, KW, Cin, Cout), got {x.shape} and {w.shape}")
    N, H, W, Cin = x.shape
    KH, KW, wcin, Cout = w.shape
    if wcin != Cin:
        raise ValueError(f"x has {Cin} channels but w expects {wcin}")
    if b is None:
        b = np.zeros(Cout, dtype=x.dtype)
    b = np.ascontiguousarray(b, dtype=x.dtype)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    if min(sh, sw, dh, dw) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got stride {(sh, sw)}, dilation {(dh, dw)}")
    top, bottom, left, right = resolve_padding(padding, (KH, KW), (sh, sw), (dh, dw))
    OH = window_output_size(H, KH, sh, top, bottom, dh)
    OW = window_output_size(W, KW, sw, left, right, dw)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"conv2d output size {OH}x{OW} is below 1: input {H}x{W}, kernel {KH}x{KW}, "
            f"stride {(sh, sw)}, padding {(top, bottom, left, right)}, dilation {(dh, dw)}"
        )
    y = np.empty((N, OH, OW, Cout), dtype=x.dtype)
    conv2d_forward(x, w, b, y, sh, sw, top, left, dh, dw)
    return y
