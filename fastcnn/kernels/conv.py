"""2-D convolution kernels (Numba).

Layout: activations NHWC ``(N, H, W, C)``, weights HWIO ``(KH, KW, Cin, Cout)``,
bias ``(Cout,)``. Cross-correlation with PyTorch semantics. Every kernel
writes into output arrays the caller allocated (C-contiguous) and returns
None; all arrays of one call share one dtype (float32 or float64), and the
arithmetic stays in that dtype.

Padding is given as ``pad_top``/``pad_left`` only: the output size comes from
the output array's shape, the bottom/right padding is implied, and input
positions outside ``[0, H) x [0, W)`` count as zeros.

Every kernel is a sequence of small matrix products done by one register-
blocked microkernel, ``_mk`` (written in LLVM IR through ``numba.extending.
intrinsic``, because Numba's loop vectorizer will not keep a tile of
accumulators in registers across a reduction): ``C[i, :] += sum_k A[i, k] *
B[k, :]`` for up to 6 rows i and up to 4 SIMD vectors of columns (6 x 64
float32 with AVX-512: 24 accumulator registers), each loaded B vector reused
by the 6 rows, each A element broadcast. A and B are addressed with strides
(``a_off + i*lda + k*ldk``, ``b_off + k*ldb``), so the products read the
activations where they lie, with no im2col copy where the layout allows.

* forward, per output row (n, oh) (rows dealt to _ROW_CHUNKS chunks, the
  prange), ``y[n, oh] = b + sum`` over the kernel taps. When dil_w == 1 and
  every kernel column is inside the image (no left/right padding needed), one
  product covers all the taps: for each kernel row kh inside the image (a
  segment of the microkernel's reduction), ``A[ow, kw*Cin + ci] = x[n, ih,
  ow*sw + kw, ci]`` (row stride sw*Cin) times ``w[kh]`` seen as (KW*Cin, Cout);
  x is read in place, no im2col. Otherwise, when KW*Cin >= _MIN_DIRECT, one
  product per kernel column kw over the output pixels whose input column is
  inside the image; else (few, small taps) an im2col row ``(OW, KH*KW*Cin)``
  is gathered and done as one product.
* backward input, per input row (n, ih): the transpose of the forward:
  for each (kh, kw) whose output row exists, ``dx[n, ih, iw] += dy[n, oh, ow]
  @ w[kh, kw].T`` over the range of ``ow`` that lands inside the row, C rows
  at stride sw*Cin. Each dx row is written by one thread: no races, fixed order.
* backward weight: the split of the work never depends on the thread count,
  so dw is bit-identical run to run and whatever the number of threads.
  Direct path (no kernel column outside the image, Cout a multiple of the
  vector length): per image and kernel row kh one product ``dw[kh] += A @
  dy[n]`` with ``A[kw*Cin + ci, (oh, ow)] = x[n, ih, ow*sw + kw, ci]``,
  reducing over all the image's output pixels (output rows are the segments)
  in registers. With enough (kh, kw, ci) rows (at least _MIN_ROW_TILES
  microkernel tiles) the rows are dealt to items of _ROW_TILES_PER_ITEM tiles,
  each owning its rows of dw and reducing over every image in order: no
  partial buffers and no reduction pass. Otherwise work is dealt in order to a
  fixed number of chunks (of images, or of blocks of _PIXEL_BLOCK pixels whose
  im2col rows are gathered and ``col_block.T @ dy_block`` added), each with its
  own ``(KH*KW*Cin, Cout)`` partial, and the partials are added in chunk order.

Columns (Cout for forward and weight gradient, Cin for input gradient) are
padded to a multiple of the vector length in packed weights/scratch rows when
they are not one already.
"""
import os

import numba
import numpy as np
from llvmlite import ir
from numba import cfunc, njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from fastcnn.shapes import pair, same_padding, window_output_size


def _vector_bytes():
    """SIMD width the microkernel is written for: 64 (AVX-512) or 32 bytes."""
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if not features:
        try:
            import llvmlite.binding as llvm

            features = llvm.get_host_cpu_features().flatten()
        except Exception:  # noqa: BLE001
            features = ""
    return 64 if "+avx512f" in features.split(",") else 32


_VBYTES = _vector_bytes()
# Column vectors per microkernel tile (4 x 16 float32 with AVX-512: 24 of the
# 32 vector registers hold accumulators; with 16 registers, 2).
_NV = 4 if _VBYTES == 64 else 2
# Rows per microkernel tile.
_MR = 6
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
# _MIN_ROW_TILES microkernel row tiles, the rows are dealt to items of (at most)
# _ROW_TILES_PER_ITEM tiles of one kernel row, and each item reduces over all
# the images itself: no partial buffers, no reduction pass.
_MIN_ROW_TILES = 12
_ROW_TILES_PER_ITEM = 8
# Forward: below this many contiguous inputs per kernel row (KW*Cin), gather
# an im2col row and do one product (K = KH*KW*Cin) instead of one per tap.
_MIN_DIRECT = 32


# --------------------------------------------------------------------------
# Microkernel
# --------------------------------------------------------------------------

@intrinsic
def _mk(typingctx, C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, MR, NV):
    """C[c_off + i*ldc + j] += sum_{s<S, k<K} A[a_off + s*sa + i*lda + k*ldk] * B[b_off + s*sb + k*ldb + j]

    for i < MR, j < NV * VL (VL = vector length of the dtype): S segments of
    K steps each (e.g. kernel rows, or output rows), all accumulated in
    registers. MR and NV are
    compile-time literals. C, A, B: arrays of one float dtype (any shape,
    contiguous; offsets count elements from their first element), or
    pointers to their first elements. No bounds
    checks: the caller guarantees every index is inside its array.
    """
    if not isinstance(MR, types.IntegerLiteral) or not isinstance(NV, types.IntegerLiteral):
        return None
    mr = MR.literal_value
    nv = NV.literal_value
    dt = C.dtype
    vl = _VBYTES * 8 // dt.bitwidth
    sig = types.void(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, MR, NV)

    def codegen(context, builder, signature, args):
        argtys = signature.args
        i64 = ir.IntType(64)

        def as64(i):
            return context.cast(builder, args[i], argtys[i], types.int64)

        def data(i):
            if isinstance(argtys[i], types.CPointer):
                return args[i]
            return context.make_array(argtys[i])(context, builder, args[i]).data

        cp, ap, bp = data(0), data(3), data(7)
        coff, ldc_, aoff, lda_, ldk_, boff, ldb_, kk, ss, sa_, sb_ = (
            as64(i) for i in (1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13))
        fty = context.get_value_type(dt)
        vty = ir.VectorType(fty, vl)
        vpty = vty.as_pointer()
        ebytes = dt.bitwidth // 8
        zero_mask = ir.Constant(ir.VectorType(ir.IntType(32), vl), [0] * vl)
        undef = ir.Constant(vty, ir.Undefined)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty]),
            "llvm.fma.v%d%s" % (vl, "f32" if dt.bitwidth == 32 else "f64"))

        def vptr(ptr, idx):
            return builder.bitcast(builder.gep(ptr, [idx], inbounds=True), vpty)

        def cidx(r, j):
            return builder.add(coff, builder.add(builder.mul(ir.Constant(i64, r), ldc_), ir.Constant(i64, j * vl)))

        # Accumulators in allocas: LLVM's mem2reg turns them into registers.
        accs = []
        for r in range(mr):
            row = []
            for j in range(nv):
                slot = cgutils.alloca_once(builder, vty)
                builder.store(builder.load(vptr(cp, cidx(r, j)), align=ebytes, typ=vty), slot)
                row.append(slot)
            accs.append(row)
        with cgutils.for_range(builder, ss, intp=i64) as seg:
            aseg = builder.add(aoff, builder.mul(seg.index, sa_))
            bseg = builder.add(boff, builder.mul(seg.index, sb_))
            with cgutils.for_range(builder, kk, intp=i64) as loop:
                k = loop.index
                bbase = builder.add(bseg, builder.mul(k, ldb_))
                bv = [builder.load(vptr(bp, builder.add(bbase, ir.Constant(i64, j * vl))), align=ebytes, typ=vty)
                      for j in range(nv)]
                abase = builder.add(aseg, builder.mul(k, ldk_))
                for r in range(mr):
                    aidx = builder.add(abase, builder.mul(ir.Constant(i64, r), lda_))
                    s = builder.load(builder.gep(ap, [aidx], inbounds=True), typ=fty)
                    sv = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(i64, 0)), undef,
                                                zero_mask)
                    for j in range(nv):
                        acc = builder.load(accs[r][j], typ=vty)
                        builder.store(builder.call(fma, [sv, bv[j], acc]), accs[r][j])
        for r in range(mr):
            for j in range(nv):
                builder.store(builder.load(accs[r][j], typ=vty), vptr(cp, cidx(r, j)), align=ebytes)
        return context.get_dummy_value()

    return sig, codegen


@njit(error_model="numpy", cache=True, inline="always")
def _tile(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, m, nv):
    """_mk with runtime m (1.._MR) and nv (1, 2 or _NV) dispatched to literal instances."""
    if nv == _NV:
        if m == 6:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 6, _NV)
        elif m == 5:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 5, _NV)
        elif m == 4:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 4, _NV)
        elif m == 3:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 3, _NV)
        elif m == 2:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 2, _NV)
        else:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 1, _NV)
    elif nv == 2:
        if m == 6:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 6, 2)
        elif m == 5:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 5, 2)
        elif m == 4:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 4, 2)
        elif m == 3:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 3, 2)
        elif m == 2:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 2, 2)
        else:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 1, 2)
    else:
        if m == 6:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 6, 1)
        elif m == 5:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 5, 1)
        elif m == 4:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 4, 1)
        elif m == 3:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 3, 1)
        elif m == 2:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 2, 1)
        else:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 1, 1)


def _gemm_impl(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV):
    """_gemm's body (compiled as a C-callable cfunc, see _gemm): tiles of _MR
    rows x (up to) _NV vectors; columns outermost so a block of B stays in
    cache across the row tiles. C, A, B are pointers to float32 or float64.
    """
    if K <= 0 or M <= 0 or S <= 0:
        return
    VL = _vector_length(C)
    j = 0
    while j < NV:
        nv = NV - j
        if nv >= _NV:
            nv = _NV
        elif nv >= 2:
            nv = 2
        cj = c_off + j * VL
        bj = b_off + j * VL
        i = 0
        while i < M:
            m = min(_MR, M - i)
            _tile(C, cj + i * ldc, ldc, A, a_off + i * lda, lda, ldk, B, bj, ldb, K, S, sa, sb, m, nv)
            i += _MR
        j += nv


@intrinsic
def _vector_length(typingctx, C):
    """Elements of C's dtype per SIMD vector (a constant)."""
    vl = _VBYTES * 8 // C.dtype.bitwidth

    def codegen(context, builder, signature, args):
        return context.get_constant(types.int64, vl)

    return types.int64(C), codegen


# Why a cfunc called by symbol name: Numba links the LLVM IR of every jitted
# callee into each caller and optimizes and compiles it again there, and a
# prange loop is a chain of four modules (gufunc, two wrappers, the kernel),
# so the microkernel instances (the bulk of this module's machine code) were
# compiled about a dozen times on a cold start. Compiled once per dtype as a
# cfunc and registered with LLVM under a fixed symbol name, they are compiled
# once, and the kernels only hold an external call (cacheable: no address is
# baked into their code; the symbol is resolved when they are loaded).
# The dense kernels (dense.py) call the same cfunc.
_GEMM_CFUNCS = {}


def _gemm_symbol(dtype):
    return "fastcnn_conv_gemm_" + np.dtype(dtype).name


def _ensure_gemm(dtype):
    """Compile (or load from cache) the dtype's gemm cfunc and register its symbol; before any kernel call."""
    dtype = np.dtype(dtype)
    if dtype in _GEMM_CFUNCS:
        return
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"conv kernels support float32 and float64, got {dtype}")
    import llvmlite.binding as llvm

    ptr = types.CPointer(numba.from_dtype(dtype))
    i64 = types.int64
    sig = types.void(ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i64)
    cf = cfunc(sig, cache=True, error_model="numpy")(_gemm_impl)
    llvm.add_symbol(_gemm_symbol(dtype), cf.address)
    _GEMM_CFUNCS[dtype] = cf


@intrinsic
def _gemm(typingctx, C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV):
    """C[c_off + i*ldc + j] += sum_{s<S, k<K} A[a_off + s*sa + i*lda + k*ldk] * B[b_off + s*sb + k*ldb + j]

    for i < M, j < NV*VL: a call of the dtype's _gemm_impl cfunc (registered
    by _ensure_gemm) through its symbol. C, A, B: contiguous arrays of one float dtype.
    """
    sig = types.void(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV)
    symbol = _gemm_symbol(str(C.dtype))

    def codegen(context, builder, signature, args):
        argtys = signature.args
        vals = []
        for ty, val in zip(argtys, args):
            if isinstance(ty, types.Array):
                vals.append(context.make_array(ty)(context, builder, val).data)
            else:
                vals.append(context.cast(builder, val, ty, types.int64))
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in vals])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, symbol), vals)
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

@njit(error_model="numpy", cache=True, fastmath=True)
def _copy(dst, src):
    """dst[:] = src[:] for 1-D views indexed from 0 (so the loop vectorizes)."""
    for t in range(dst.shape[0]):
        dst[t] = src[t]


@njit(error_model="numpy", cache=True, fastmath=True)
def _fill(dst, value):
    for t in range(dst.shape[0]):
        dst[t] = value


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
            _fill(crow[base:base + L], zero)
            continue
        xrow = x3[n, ih]
        if dil_w == 1 and iw0 >= 0 and iw0 + KW <= W:
            _copy(crow[base:base + L], xrow[iw0 * Cin:iw0 * Cin + L])
            continue
        for kw in range(KW):
            iw = iw0 + kw * dil_w
            off = base + kw * Cin
            if iw < 0 or iw >= W:
                _fill(crow[off:off + Cin], zero)
            else:
                _copy(crow[off:off + Cin], xrow[iw * Cin:iw * Cin + Cin])


@njit(error_model="numpy", cache=True)
def _ceil_div(a, b):
    """ceil(a / b) for b > 0 and any integer a."""
    return -((-a) // b)


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

def _prange_only():
    """``parallel=`` option: only the explicit prange loops run in parallel.

    With plain ``parallel=True`` every np.zeros/np.empty in the kernels also
    becomes a parfor, and each parfor is compiled as a separate gufunc (plus
    its wrapper), most of the kernels' compile time outside the microkernel.
    A fresh dict per use: Numba pops the keys it reads.
    """
    return {"prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
            "setitem": False, "numpy": False, "stencil": False, "fusion": False}


@njit(error_model="numpy", parallel=_prange_only(), cache=True)
def _conv2d_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """y (N, OH, OW, Cout) = conv(x (N, H, W, Cin), w (KH, KW, Cin, Cout)) + b; y overwritten."""
    N, H, W, Cin = x.shape
    KH, KW, _, Cout = w.shape
    OH = y.shape[1]
    OW = y.shape[2]
    K = KH * KW * Cin
    VL = _VBYTES // y.itemsize
    NVt = (Cout + VL - 1) // VL
    Np = NVt * VL
    # Weights as (K, Np): row (kh*KW + kw)*Cin + ci, zero columns past Cout.
    wp = _pack_columns(np.ascontiguousarray(w).reshape(K, Cout), Np)
    wflat = wp.reshape(-1)
    bp = np.zeros(Np, dtype=y.dtype)
    for co in range(Cout):
        bp[co] = b[co]
    x3 = x.reshape(N, H, W * Cin)
    direct = KW * Cin >= _MIN_DIRECT
    # Output columns whose every kernel column is inside the image.
    full_w = dil_w == 1 and pad_left == 0 and (OW - 1) * stride_w + KW <= W
    # Without padded columns the products accumulate straight into y.
    in_place = Np == Cout
    R = N * OH
    nchunks = min(R, _ROW_CHUNKS)
    for c in prange(nchunks):
        # Scratch once per chunk of rows (rows are independent: any split
        # gives the same result).
        acc = np.empty((OW, Np), dtype=y.dtype)
        col = np.empty((OW, 0 if direct else K), dtype=y.dtype)
        colf = col.reshape(-1)
        for r in range((c * R) // nchunks, ((c + 1) * R) // nchunks):
            n = r // OH
            oh = r - n * OH
            if in_place:
                af = y[n, oh].reshape(-1)
                out = y[n, oh]
            else:
                af = acc.reshape(-1)
                out = acc
            for ow in range(OW):
                _copy(out[ow], bp)
            # Kernel rows inside the image: kh0 <= kh < kh1.
            t = pad_top - oh * stride_h
            kh0 = max(0, _ceil_div(t, dil_h))
            kh1 = min(KH, _ceil_div(H + t, dil_h))
            if full_w:
                # All taps of all valid kernel rows in one product: for kernel
                # row kh, A[ow, kw*Cin + ci] = x3[n, ih, ow*sw*Cin + kw*Cin + ci].
                if kh1 > kh0:
                    _gemm(af, 0, Np, x3[n].reshape(-1), (kh0 * dil_h - t) * W * Cin, stride_w * Cin, 1,
                          wflat, kh0 * KW * Cin * Np, Np, KW * Cin, kh1 - kh0, dil_h * W * Cin, KW * Cin * Np,
                          OW, NVt)
            elif direct:
                for kw in range(KW):
                    # ow with 0 <= ow*sw - pl + kw*dw < W
                    u = pad_left - kw * dil_w
                    ow0 = max(0, _ceil_div(u, stride_w))
                    ow1 = min(OW, _ceil_div(W + u, stride_w))
                    if ow1 <= ow0 or kh1 <= kh0:
                        continue
                    _gemm(af, ow0 * Np, Np, x3[n].reshape(-1),
                          (kh0 * dil_h - t) * W * Cin + (ow0 * stride_w - u) * Cin, stride_w * Cin, 1,
                          wflat, (kh0 * KW + kw) * Cin * Np, Np, Cin, kh1 - kh0, dil_h * W * Cin, KW * Cin * Np,
                          ow1 - ow0, NVt)
            else:
                for ow in range(OW):
                    _im2col_pixel(x3, col[ow], n, oh, ow, H, W, Cin, KH, KW, stride_h, stride_w, pad_top,
                                  pad_left, dil_h, dil_w)
                _gemm(af, 0, Np, colf, 0, K, 1, wflat, 0, Np, K, 1, 0, 0, OW, NVt)
            if not in_place:
                yrow = y[n, oh]
                for ow in range(OW):
                    _copy(yrow[ow], acc[ow, :Cout])


@njit(error_model="numpy", parallel=_prange_only(), cache=True)
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
    VL = _VBYTES // dx.itemsize
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
    R = N * H
    nchunks = min(R, _ROW_CHUNKS)
    for c in prange(nchunks):
        acc = np.empty((W, Cp), dtype=dx.dtype)
        for r in range((c * R) // nchunks, ((c + 1) * R) // nchunks):
            n = r // H
            ih = r - n * H
            out = dx[n, ih] if in_place else acc
            for iw in range(W):
                _fill(out[iw], zero)
            af = out.reshape(-1)
            for kh in range(KH):
                t = ih + pad_top - kh * dil_h
                if t < 0:
                    continue
                oh = t // stride_h
                if oh * stride_h != t or oh >= OH:
                    continue
                dyrow = dy3[n, oh]
                for kw in range(KW):
                    # iw = ow*sw + s with s = kw*dw - pl; 0 <= iw < W, 0 <= ow < OW
                    s = kw * dil_w - pad_left
                    ow0 = max(0, _ceil_div(-s, stride_w))
                    ow1 = min(OW, _ceil_div(W - s, stride_w))
                    if ow1 <= ow0:
                        continue
                    _gemm(af, (ow0 * stride_w + s) * Cp, stride_w * Cp, dyrow, ow0 * Cout, Cout, 1,
                          wflat, (kh * KW + kw) * Cout * Cp, Cp, Cout, 1, 0, 0, ow1 - ow0, NVt)
            if not in_place:
                dxrow = dx[n, ih]
                for iw in range(W):
                    _copy(dxrow[iw], acc[iw, :Cin])


@njit(error_model="numpy", parallel=_prange_only(), cache=True)
def _conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dw (KH, KW, Cin, Cout) and db (Cout,) = dL/dw, dL/db; both overwritten (not accumulated).

    Direct path (no kernel column outside the image, Cout a multiple of the
    vector length): per image and kernel row, one product reduces over all the
    image's output pixels straight from x and dy. With at least _MIN_ROW_TILES
    row tiles, the rows of dw are dealt to items (a block of rows of one kernel
    row each) that reduce over every image in order, and each item sums a fixed
    share of the dy rows into its db partial. Otherwise the images are dealt to
    (at most) _WEIGHT_CHUNKS chunks in order; or, off the direct path, the
    N*OH*OW output pixels are cut into blocks of _PIXEL_BLOCK, dealt to the
    chunks in order, and each chunk adds col_block.T @ dy_block (im2col) into
    its partial. Each chunk has its own (K, Cout) partial and the partials are
    added in chunk order: the result does not depend on scheduling or the
    thread count.
    """
    N = x.shape[0]
    KH, KW, Cin, Cout = dw.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    K = KH * KW * Cin
    P = N * OH * OW
    VL = _VBYTES // dw.itemsize
    NVt = (Cout + VL - 1) // VL
    Np = NVt * VL
    OHW = OH * OW
    H = x.shape[1]
    W = x.shape[2]
    x3 = x.reshape(N, H, W * Cin)
    dy2 = dy.reshape(P, Cout)
    budget = max(1, _PARTIAL_BUDGET // max(1, K * Np))
    # Direct (no im2col): every kernel column inside the image and no padded
    # columns; per image and kernel row kh, one product reduces over all the
    # output pixels of the image: A[kw*Cin + ci, (oh, ow)] = x[n, ih, ow*sw + kw, ci].
    direct = dil_w == 1 and pad_left == 0 and (OW - 1) * stride_w + KW <= W and Np == Cout
    PB = _PIXEL_BLOCK
    nblocks = (P + PB - 1) // PB
    if direct:
        nchunks = min(N, _WEIGHT_CHUNKS, budget)
    else:
        nchunks = min(nblocks, _WEIGHT_CHUNKS, budget)
    L = KW * Cin
    # Row items (direct path with enough rows): the (kh, kw, ci) rows of dw
    # are dealt to items of RB rows of one kernel row; each item owns its rows
    # and reduces over every image in order, and also sums the dy rows of its
    # fixed share of the pixels into its db partial. No dw partials.
    rows = direct and KH * ((L + _MR - 1) // _MR) >= _MIN_ROW_TILES
    RB = _ROW_TILES_PER_ITEM * _MR
    nrb = (L + RB - 1) // RB
    if rows:
        nchunks = KH * nrb
    partial = np.zeros((0 if rows else nchunks, K * Np), dtype=dw.dtype)
    partial_b = np.zeros((nchunks, Cout), dtype=dw.dtype)
    dwf = dw.reshape(-1)
    xf = x.reshape(-1)
    dyf = dy.reshape(-1)
    zero = dw.dtype.type(0)
    HWC = H * W * Cin
    OHWC = OHW * Cout
    # One prange for all the paths: each prange is compiled as its own gufunc.
    for c in prange(nchunks):
        pb = partial_b[c]
        if rows:
            for p in range((c * P) // nchunks, ((c + 1) * P) // nchunks):
                dp = dy2[p]
                for co in range(Cout):
                    pb[co] += dp[co]
            kh = c // nrb
            r0 = (c - kh * nrb) * RB
            r1 = min(L, r0 + RB)
            _fill(dwf[(kh * L + r0) * Cout:(kh * L + r1) * Cout], zero)
            u = pad_top - kh * dil_h
            oh0 = max(0, _ceil_div(u, stride_h))
            oh1 = min(OH, _ceil_div(H + u, stride_h))
            if oh1 > oh0:
                for n in range(N):
                    _gemm(dwf, (kh * L + r0) * Cout, Cout, xf, n * HWC + (oh0 * stride_h - u) * W * Cin + r0, 1,
                          stride_w * Cin, dyf, n * OHWC + oh0 * OW * Cout, Cout, OW, oh1 - oh0,
                          stride_h * W * Cin, OW * Cout, r1 - r0, NVt)
        elif direct:
            pc = partial[c]
            for n in range((c * N) // nchunks, ((c + 1) * N) // nchunks):
                for kh in range(KH):
                    # oh with 0 <= ih = oh*sh - u < H
                    u = pad_top - kh * dil_h
                    oh0 = max(0, _ceil_div(u, stride_h))
                    oh1 = min(OH, _ceil_div(H + u, stride_h))
                    if oh1 <= oh0:
                        continue
                    _gemm(pc, kh * L * Np, Np, xf, n * HWC + (oh0 * stride_h - u) * W * Cin, 1, stride_w * Cin,
                          dyf, n * OHWC + oh0 * OW * Cout, Cout, OW, oh1 - oh0, stride_h * W * Cin, OW * Cout, L,
                          NVt)
                for t in range(OHW):
                    dp = dy2[n * OHW + t]
                    for co in range(Cout):
                        pb[co] += dp[co]
        else:
            pc = partial[c]
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
                        _copy(dyp[t, :Cout], dy2[p0 + t])
                    _gemm(pc, 0, Np, colf, 0, 1, K, dypf, 0, Np, cnt, 1, 0, 0, K, NVt)
                else:
                    _gemm(pc, 0, Np, colf, 0, 1, K, dy2[p0:p0 + cnt].reshape(-1), 0, Np, cnt, 1, 0, 0, K, NVt)
                for t in range(cnt):
                    dp = dy2[p0 + t]
                    for co in range(Cout):
                        pb[co] += dp[co]
    # Fixed-order reduction of the partials.
    if not rows:
        dwm = dw.reshape(K, Cout)
        for k in prange(K):
            for co in range(Cout):
                s = partial[0, k * Np + co]
                for c in range(1, nchunks):
                    s += partial[c, k * Np + co]
                dwm[k, co] = s
    for co in range(Cout):
        s = partial_b[0, co]
        for c in range(1, nchunks):
            s += partial_b[c, co]
        db[co] = s


# --------------------------------------------------------------------------
# Public entry points: register the gemm symbol, then call the kernel
# --------------------------------------------------------------------------

def conv2d_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """y (N, OH, OW, Cout) = conv(x (N, H, W, Cin), w (KH, KW, Cin, Cout)) + b; y overwritten."""
    _ensure_gemm(y.dtype)
    _conv2d_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)


def conv2d_backward_input(dy, w, dx, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dx (N, H, W, Cin) = dL/dx given dy (N, OH, OW, Cout); dx fully overwritten."""
    _ensure_gemm(dx.dtype)
    _conv2d_backward_input(dy, w, dx, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)


def conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dw (KH, KW, Cin, Cout) and db (Cout,) = dL/dw, dL/db; both overwritten (not accumulated)."""
    _ensure_gemm(dw.dtype)
    _conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)


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
