"""Depthwise and grouped 2-D convolution kernels (Numba).

Layout as in fastcnn/kernels/conv.py: activations NHWC ``(N, H, W, C)``,
weights HWIO, bias ``(Cout,)``, cross-correlation with PyTorch semantics,
outputs written into arrays the caller allocated (C-contiguous, one dtype for
all arrays of a call, the arithmetic in that dtype), padding given as
``pad_top``/``pad_left`` with the bottom/right padding implied by the output
shape (input positions outside the image count as zeros).

Depthwise (``groups`` = input channels ``C``, channel multiplier ``m``):
weight ``(KH, KW, 1, C*m)``, and output channel ``o = c*m + j`` reads input
channel ``c = o // m`` only::

    y[n, oh, ow, c*m + j] = b[c*m + j] + sum_{kh, kw} x[n, oh*sh - pt + kh*dh, ow*sw - pl + kw*dw, c]
                                                      * w[kh, kw, 0, c*m + j]

Depthwise convolution does KH*KW multiply-adds per output element and no
channel reduction: it is memory-bound, the work is element-wise along the
channels, and the point is to touch each activation as few times as possible
and keep the accumulators in registers. Two paths, chosen by the shapes only
(never by the thread count):

**Register tiles** (``m == 1`` and ``C`` a multiple of the SIMD vector length
VL = VBYTES / itemsize: 8 float32 with AVX2, 16 with AVX-512). Two microkernels
written in LLVM IR (``_taps_mk``, ``_reduce_mk``; ``llvm.fma``, as gemm.py's):

* ``_taps_mk``: a tile of P output pixels x NV channel vectors (6 x 2, 2 x 2,
  1 x 2, and x 1 for an odd vector) starts from its initial values (the bias,
  or zeros) and accumulates, in registers, a grid of R x K kernel taps with
  constant strides in x and in w; one weight vector per tap and channel
  vector serves the P pixels; each output vector is stored once.
  - forward, per output row: R = the kernel rows inside the image, K = KW.
    The output columns whose every kernel column is inside the row are tiled;
    the few others (padding) go one by one with their valid kernel columns.
    The stride is just the pixel step of the x reads (sw*C).
  - backward input, per input row (n, ih): the input columns of one phase
    ``iw = q*sw + r`` receive from the kernel columns ``kw = kwa + i*ksw`` with
    ``r + pl - kw*dw`` divisible by sw, from output columns ``ow = q + e0 -
    i*de``; the kernel rows likewise (``kh = kha + j*ks``, ``oh = oha - j*dj``):
    a grid of taps with constant (negative) strides in dy, over consecutive
    output columns. So dx is gathered, each dx vector written once, whatever
    the stride and dilation; no scatter, no zeroing pass.
* ``_reduce_mk`` (weight gradient): the accumulators are the taps (up to 3
  kernel columns x up to 4 channel vectors), each dy vector loaded once for
  the 3 taps, and the reduction runs over S rows x P pixels: per image of a
  chunk and kernel row kh, all the chunk's output rows where kh is inside the
  image at once (the interior columns in one call, each edge column in one
  call down the rows), so the accumulators stay in registers over many rows.

The geometry (which kernel rows/columns are inside the image for each output
row/column, the input gradient's phases and edges) is tabulated once per call
(``_window_table``, ``_backward_input_tables``): no integer division with a
variable divisor in the row loops.

The two tile dispatchers (``_taps_impl``, ``_reduce_impl``) are C-callable
cfuncs compiled once per dtype and called by symbol (``ensure_depthwise``).

**Runs** (a channel multiplier, or C not a multiple of VL): every kernel is
built from one operation on long contiguous runs, ``_madd``: ``y[yo + i] +=
x[xo + i] * v[vo + i]`` for ``i < L``, which the compiler vectorizes (a
multiply then an add, no fastmath: the vector body and the scalar remainder
round alike). A run spans a stretch of an output row (all the pixels of one
kernel tap whose input column is inside the image, times all the channels):
a per-pixel loop over a few channels would hardly vectorize.

* Row sources. For one input row and one kernel column ``kw`` the input
  columns read by consecutive output columns are ``ow*sw + s`` (``s = kw*dw -
  pl``): contiguous pixels when ``sw == 1``. With a stride, the row is first
  split into its ``sw`` phases (``iw = q*sw + r`` stored at pixel ``r*Wp + q``,
  ``Wp = ceil(W / sw)``), where the tap's pixels are contiguous again; with a
  channel multiplier, each input channel is repeated ``m`` times in that
  buffer so that its channels line up with the output channels. With
  ``sw == 1`` and ``m == 1`` x is read in place.
* Weights and bias are tiled along the output row once per call
  (``wr[(kh*KW + kw)*OW*Cm + ow*Cm + o] = w[kh, kw, 0, o]``), so a run's
  multiplier is contiguous too.
* forward, per output row: the row is set to the bias, then for each kernel
  row inside the image and each kernel column, one run over the output
  columns whose input column is inside the row.
* backward input, per input row (n, ih): for each (kh, kw) whose output row
  exists, ``dx_row[ow*sw + s] += dy[n, oh, ow] * w[kh, kw]`` over the output
  columns landing inside the row, accumulated in the input row itself (stride
  1, m 1) or in a phase-split buffer that is then written back (summing the
  ``m`` output channels of each input channel, in order).
* backward weight: per tap, one accumulator per (output column, channel) of
  the chunk's partial, so the accumulation over the rows is the same
  element-wise run (``part[tap] += x_run * dy_run``).

Both paths: forward and input-gradient rows are dealt to _ROW_CHUNKS chunks
(each output row or dx row written by one thread, its terms added in a fixed
order). The weight gradient deals the ``N*OH`` output rows in order to a fixed
number of chunks (at most _WEIGHT_CHUNKS, never the thread count), each with
its own partial (the tap accumulators, then ``OW*Cm`` slots summing dy for the
bias), reduced in a fixed order (chunk, then output column) into ``dw`` and
``db``: bit-identical whatever the number of threads. The two gradients are
one kernel (``depthwise_backward``): one parallel region whose iterations are
the weight chunks interleaved with the dx chunks (each parallel region is a
wait for every thread; one per layer backward instead of two or three);
``depthwise_backward_input`` / ``_weight`` run it for one gradient.

General groups (``1 < groups < C``): ``grouped_*`` gather each group's channels
into a contiguous array (one transposing copy), run the conv kernels of
fastcnn/kernels/conv.py per group, and scatter the results back; groups 1 and
groups = C dispatch to conv and to the depthwise kernels.

Under NUMBA_DISABLE_JIT the kernels run as Python, with NumPy versions of the
run helpers and of the tile dispatchers (same sums; a multiply and an add where
the tiles use an FMA).
"""
import numba
import numpy as np
from llvmlite import ir
from numba import cfunc, njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from fastcnn.kernels.conv import tap_output_row
from fastcnn.kernels.gemm import DISABLE_JIT, VBYTES, prange_only, vector_length

# Forward and input gradient: rows are dealt to this many chunks (scratch is
# allocated once per chunk; rows are independent, so the split never changes a result).
_ROW_CHUNKS = 64
# Weight gradient: number of partial buffers (fixed, never the thread count).
_WEIGHT_CHUNKS = 16


# --------------------------------------------------------------------------
# Run helpers (1-D arrays, element offsets; views indexed from 0 vectorize)
# --------------------------------------------------------------------------

@njit(error_model="numpy", cache=True)
def _ceil_div(a, b):
    """ceil(a / b) for b > 0 and any integer a."""
    return -((-a) // b)


@njit(error_model="numpy", cache=True)
def _madd_jit(y, yo, x, xo, v, vo, L):
    """y[yo + i] += x[xo + i] * v[vo + i] for i < L."""
    ys = y[yo:yo + L]
    xs = x[xo:xo + L]
    vs = v[vo:vo + L]
    for i in range(L):
        ys[i] += xs[i] * vs[i]


@njit(error_model="numpy", cache=True)
def _add_jit(y, yo, x, xo, L):
    """y[yo + i] += x[xo + i] for i < L."""
    ys = y[yo:yo + L]
    xs = x[xo:xo + L]
    for i in range(L):
        ys[i] += xs[i]


@njit(error_model="numpy", cache=True)
def _copy_jit(y, yo, x, xo, L):
    """y[yo + i] = x[xo + i] for i < L."""
    ys = y[yo:yo + L]
    xs = x[xo:xo + L]
    for i in range(L):
        ys[i] = xs[i]


@njit(error_model="numpy", cache=True)
def _zero_jit(y, yo, L):
    ys = y[yo:yo + L]
    zero = y.dtype.type(0)
    for i in range(L):
        ys[i] = zero


@njit(error_model="numpy", cache=True)
def _split_row_jit(buf, x, xo, W, C, m, sw, Wp):
    """buf[((iw % sw)*Wp + iw // sw)*C*m + c*m + j] = x[xo + iw*C + c]: one input row split into
    its sw phases, each channel repeated m times."""
    Cm = C * m
    for r in range(sw):
        for q in range((W - r + sw - 1) // sw):
            src = x[xo + (q * sw + r) * C:xo + (q * sw + r + 1) * C]
            dst = buf[(r * Wp + q) * Cm:(r * Wp + q + 1) * Cm]
            if m == 1:
                for c in range(C):
                    dst[c] = src[c]
            else:
                for c in range(C):
                    v = src[c]
                    for j in range(m):
                        dst[c * m + j] = v


@njit(error_model="numpy", cache=True)
def _merge_row_jit(dx, dxo, buf, W, C, m, sw, Wp):
    """dx[dxo + iw*C + c] = sum_{j < m} buf[((iw % sw)*Wp + iw // sw)*C*m + c*m + j] (j in order):
    the inverse of _split_row for gradients."""
    Cm = C * m
    for r in range(sw):
        for q in range((W - r + sw - 1) // sw):
            dst = dx[dxo + (q * sw + r) * C:dxo + (q * sw + r + 1) * C]
            src = buf[(r * Wp + q) * Cm:(r * Wp + q + 1) * Cm]
            if m == 1:
                for c in range(C):
                    dst[c] = src[c]
            else:
                for c in range(C):
                    s = src[c * m]
                    for j in range(1, m):
                        s += src[c * m + j]
                    dst[c] = s


def _madd_numpy(y, yo, x, xo, v, vo, L):
    if L > 0:
        y[yo:yo + L] += x[xo:xo + L] * v[vo:vo + L]


def _add_numpy(y, yo, x, xo, L):
    if L > 0:
        y[yo:yo + L] += x[xo:xo + L]


def _copy_numpy(y, yo, x, xo, L):
    if L > 0:
        y[yo:yo + L] = x[xo:xo + L]


def _zero_numpy(y, yo, L):
    if L > 0:
        y[yo:yo + L] = 0


def _split_row_numpy(buf, x, xo, W, C, m, sw, Wp):
    row = x[xo:xo + W * C].reshape(W, C)
    if m > 1:
        row = np.repeat(row, m, axis=1)
    Cm = C * m
    for r in range(sw):
        q = (W - r + sw - 1) // sw
        buf[r * Wp * Cm:(r * Wp + q) * Cm] = row[r::sw].reshape(-1)


def _merge_row_numpy(dx, dxo, buf, W, C, m, sw, Wp):
    Cm = C * m
    out = dx[dxo:dxo + W * C].reshape(W, C)
    for r in range(sw):
        q = (W - r + sw - 1) // sw
        part = buf[r * Wp * Cm:(r * Wp + q) * Cm].reshape(q, C, m)
        s = part[:, :, 0].copy()
        for j in range(1, m):
            s += part[:, :, j]
        out[r::sw] = s


if DISABLE_JIT:
    _madd, _add, _copy, _zero = _madd_numpy, _add_numpy, _copy_numpy, _zero_numpy
    _split_row, _merge_row = _split_row_numpy, _merge_row_numpy
else:
    _madd, _add, _copy, _zero = _madd_jit, _add_jit, _copy_jit, _zero_jit
    _split_row, _merge_row = _split_row_jit, _merge_row_jit


# --------------------------------------------------------------------------
# Microkernels (LLVM IR): a tile of accumulators held in SIMD registers
# --------------------------------------------------------------------------

def _ir_helpers(context, builder, signature, args, dt):
    """Pointers, int64 arguments, vector type and an FMA for the microkernels' code generation."""
    argtys = signature.args
    i64 = ir.IntType(64)
    vl = VBYTES * 8 // dt.bitwidth
    fty = context.get_value_type(dt)
    vty = ir.VectorType(fty, vl)
    ebytes = dt.bitwidth // 8
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                         "llvm.fma.v%d%s" % (vl, "f32" if dt.bitwidth == 32 else "f64"))

    def data(i):
        if isinstance(argtys[i], types.CPointer):
            return args[i]
        return context.make_array(argtys[i])(context, builder, args[i]).data

    def as64(i):
        return context.cast(builder, args[i], argtys[i], types.int64)

    def load(ptr, idx):
        return builder.load(builder.bitcast(builder.gep(ptr, [idx], inbounds=True), vty.as_pointer()),
                            align=ebytes, typ=vty)

    def store(val, ptr, idx):
        builder.store(val, builder.bitcast(builder.gep(ptr, [idx], inbounds=True), vty.as_pointer()), align=ebytes)

    def const(v):
        return ir.Constant(i64, v)

    return i64, vl, vty, fma, data, as64, load, store, const


@intrinsic
def _taps_mk(typingctx, Y, y_off, ldy, I, i_off, ldi, X, x_off, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, MT, NB,
             P_, NV_):
    """For MT tiles of P_ output pixels and NB blocks of NV_ channel vectors (VL channels each):

        Y[yo + p*ldy + j] = I[io + p*ldi + j]
                            + sum_{r<R, k<K} X[xo + r*xsa + k*xsb + p*ldx + j] * Wt[wo + r*wsa + k*wsb + j]

    for p < P_, j < NV_ * VL, with yo = y_off + mt*P_*ldy + nb*NV_*VL, io = i_off + mt*P_*ldi +
    nb*NV_*VL, xo = x_off + mt*P_*ldx + nb*NV_*VL, wo = w_off + nb*NV_*VL (I: the initial values,
    e.g. the bias with ldi = 0): a grid of R x K kernel taps, each tile's P_ x NV_
    accumulator vectors in registers across all its taps, one weight vector per tap and channel
    vector reused by the P_ pixels, FMA. P_ and NV_ are compile-time literals; offsets and
    strides count elements (may be negative); no bounds checks.
    """
    if not isinstance(P_, types.IntegerLiteral) or not isinstance(NV_, types.IntegerLiteral):
        return None
    P, NV = P_.literal_value, NV_.literal_value
    dt = Y.dtype
    sig = types.void(Y, y_off, ldy, I, i_off, ldi, X, x_off, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, MT, NB, P_,
                     NV_)

    def codegen(context, builder, signature, args):
        i64, vl, vty, fma, data, as64, load, store, const = _ir_helpers(context, builder, signature, args, dt)
        yp, ip, xp, wp = data(0), data(3), data(6), data(11)
        yoff, ldy_, ioff, ldi_, xoff, ldx_, xsa_, xsb_, woff, wsa_, wsb_, rr, kk, mt_, nb_ = (
            as64(i) for i in (1, 2, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18))
        accs = [[cgutils.alloca_once(builder, vty) for _ in range(NV)] for _ in range(P)]
        with cgutils.for_range(builder, mt_, intp=i64) as mloop:
            ym = builder.add(yoff, builder.mul(mloop.index, builder.mul(const(P), ldy_)))
            im = builder.add(ioff, builder.mul(mloop.index, builder.mul(const(P), ldi_)))
            xm = builder.add(xoff, builder.mul(mloop.index, builder.mul(const(P), ldx_)))
            with cgutils.for_range(builder, nb_, intp=i64) as bloop:
                cb = builder.mul(bloop.index, const(NV * vl))
                yb = builder.add(ym, cb)
                ib = builder.add(im, cb)
                xb = builder.add(xm, cb)
                wb = builder.add(woff, cb)

                def yidx(p, v):
                    return builder.add(yb, builder.add(builder.mul(const(p), ldy_), const(v * vl)))

                for p in range(P):
                    for v in range(NV):
                        iidx = builder.add(ib, builder.add(builder.mul(const(p), ldi_), const(v * vl)))
                        builder.store(load(ip, iidx), accs[p][v])
                with cgutils.for_range(builder, rr, intp=i64) as rloop:
                    xr = builder.add(xb, builder.mul(rloop.index, xsa_))
                    wr = builder.add(wb, builder.mul(rloop.index, wsa_))
                    with cgutils.for_range(builder, kk, intp=i64) as kloop:
                        xk = builder.add(xr, builder.mul(kloop.index, xsb_))
                        wk = builder.add(wr, builder.mul(kloop.index, wsb_))
                        wv = [load(wp, builder.add(wk, const(v * vl))) for v in range(NV)]
                        for p in range(P):
                            xpix = builder.add(xk, builder.mul(const(p), ldx_))
                            for v in range(NV):
                                xv = load(xp, builder.add(xpix, const(v * vl)))
                                acc = builder.load(accs[p][v], typ=vty)
                                builder.store(builder.call(fma, [xv, wv[v], acc]), accs[p][v])
                for p in range(P):
                    for v in range(NV):
                        store(builder.load(accs[p][v], typ=vty), yp, yidx(p, v))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _reduce_mk(typingctx, A, a_off, lda, X, x_off, ldx, xsb, sx, D, d_off, ldd, sd, P, S, NB, NT_, NV_):
    """For NB blocks of NV_ channel vectors (VL channels each):

        A[ao + t*lda + j] += sum_{s<S, p<P} X[xo + s*sx + p*ldx + t*xsb + j] * D[do + s*sd + p*ldd + j]

    for t < NT_ (kernel taps), j < NV_ * VL, with ao, xo, do = a_off, x_off, d_off + nb*NV_*VL:
    the weight gradient's reduction over S rows of P output pixels, the NT_ x NV_ accumulator
    vectors in registers throughout, each dy vector reused by the NT_ taps, FMA. NT_ and NV_ are
    compile-time literals; no bounds checks.
    """
    if not isinstance(NT_, types.IntegerLiteral) or not isinstance(NV_, types.IntegerLiteral):
        return None
    NT, NV = NT_.literal_value, NV_.literal_value
    dt = A.dtype
    sig = types.void(A, a_off, lda, X, x_off, ldx, xsb, sx, D, d_off, ldd, sd, P, S, NB, NT_, NV_)

    def codegen(context, builder, signature, args):
        i64, vl, vty, fma, data, as64, load, store, const = _ir_helpers(context, builder, signature, args, dt)
        ap, xp, dp = data(0), data(3), data(8)
        aoff, lda_, xoff, ldx_, xsb_, sx_, doff, ldd_, sd_, pp, ss, nb_ = (
            as64(i) for i in (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14))
        accs = [[cgutils.alloca_once(builder, vty) for _ in range(NV)] for _ in range(NT)]
        with cgutils.for_range(builder, nb_, intp=i64) as bloop:
            cb = builder.mul(bloop.index, const(NV * vl))
            ab = builder.add(aoff, cb)
            xb = builder.add(xoff, cb)
            db_ = builder.add(doff, cb)

            def aidx(t, v):
                return builder.add(ab, builder.add(builder.mul(const(t), lda_), const(v * vl)))

            for t in range(NT):
                for v in range(NV):
                    builder.store(load(ap, aidx(t, v)), accs[t][v])
            with cgutils.for_range(builder, ss, intp=i64) as sloop:
                xs = builder.add(xb, builder.mul(sloop.index, sx_))
                ds = builder.add(db_, builder.mul(sloop.index, sd_))
                with cgutils.for_range(builder, pp, intp=i64) as ploop:
                    xpix = builder.add(xs, builder.mul(ploop.index, ldx_))
                    dpix = builder.add(ds, builder.mul(ploop.index, ldd_))
                    for v in range(NV):
                        dv = load(dp, builder.add(dpix, const(v * vl)))
                        for t in range(NT):
                            xv = load(xp, builder.add(xpix, builder.add(builder.mul(const(t), xsb_), const(v * vl))))
                            acc = builder.load(accs[t][v], typ=vty)
                            builder.store(builder.call(fma, [xv, dv, acc]), accs[t][v])
            for t in range(NT):
                for v in range(NV):
                    store(builder.load(accs[t][v], typ=vty), ap, aidx(t, v))
        return context.get_dummy_value()

    return sig, codegen


def _taps_impl(Y, y_off, ldy, I, i_off, ldi, X, x_off, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, P, NV):
    """Y[y_off + p*ldy + j] = I[i_off + p*ldi + j] + sum_{r<R, k<K} X[x_off + r*xsa + k*xsb + p*ldx + j]
    * Wt[w_off + r*wsa + k*wsb + j] for p < P, j < NV*VL: _taps_mk in tiles of (6 | 2 | 1) pixels x
    (2 | 1) channel vectors."""
    if P <= 0 or NV <= 0:
        return
    if R <= 0 or K <= 0:
        R = 0
        K = 0
    VL = vector_length(Y)
    n2 = NV // 2
    v1 = n2 * 2 * VL           # channel offset of the last odd vector
    odd = NV - 2 * n2
    m6 = P // 6
    m2 = (P - 6 * m6) // 2
    p2 = 6 * m6                # first pixel of the 2-pixel tiles
    p1 = p2 + 2 * m2           # the last odd pixel
    one = P - p1
    if m6 > 0:
        _taps_mk(Y, y_off, ldy, I, i_off, ldi, X, x_off, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, m6, n2, 6, 2)
        _taps_mk(Y, y_off + v1, ldy, I, i_off + v1, ldi, X, x_off + v1, ldx, xsa, xsb, Wt, w_off + v1, wsa, wsb,
                 R, K, m6, odd, 6, 1)
    if m2 > 0:
        y2, i2, x2 = y_off + p2 * ldy, i_off + p2 * ldi, x_off + p2 * ldx
        _taps_mk(Y, y2, ldy, I, i2, ldi, X, x2, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, m2, n2, 2, 2)
        _taps_mk(Y, y2 + v1, ldy, I, i2 + v1, ldi, X, x2 + v1, ldx, xsa, xsb, Wt, w_off + v1, wsa, wsb, R, K, m2,
                 odd, 2, 1)
    if one > 0:
        y1, i1, x1 = y_off + p1 * ldy, i_off + p1 * ldi, x_off + p1 * ldx
        _taps_mk(Y, y1, ldy, I, i1, ldi, X, x1, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, 1, n2, 1, 2)
        _taps_mk(Y, y1 + v1, ldy, I, i1 + v1, ldi, X, x1 + v1, ldx, xsa, xsb, Wt, w_off + v1, wsa, wsb, R, K, 1,
                 odd, 1, 1)


def _reduce_impl(A, a_off, lda, X, x_off, ldx, xsb, sx, D, d_off, ldd, sd, P, S, NT, NV):
    """A[a_off + t*lda + j] += sum_{s<S, p<P} X[x_off + s*sx + p*ldx + t*xsb + j] * D[d_off + s*sd + p*ldd + j]
    for t < NT, j < NV*VL: _reduce_mk in tiles of (3 | 2 | 1) taps x (4 | 2 | 1) channel vectors."""
    if P <= 0 or S <= 0 or NT <= 0 or NV <= 0:
        return
    VL = vector_length(A)
    n4 = NV // 4
    n2 = (NV - 4 * n4) // 2
    n1 = NV - 4 * n4 - 2 * n2
    c2 = 4 * n4 * VL
    c1 = c2 + 2 * n2 * VL
    t = 0
    while t < NT:
        nt = min(3, NT - t)
        ao = a_off + t * lda
        xo = x_off + t * xsb
        if nt == 3:
            _reduce_mk(A, ao, lda, X, xo, ldx, xsb, sx, D, d_off, ldd, sd, P, S, n4, 3, 4)
            _reduce_mk(A, ao + c2, lda, X, xo + c2, ldx, xsb, sx, D, d_off + c2, ldd, sd, P, S, n2, 3, 2)
            _reduce_mk(A, ao + c1, lda, X, xo + c1, ldx, xsb, sx, D, d_off + c1, ldd, sd, P, S, n1, 3, 1)
        elif nt == 2:
            _reduce_mk(A, ao, lda, X, xo, ldx, xsb, sx, D, d_off, ldd, sd, P, S, n4, 2, 4)
            _reduce_mk(A, ao + c2, lda, X, xo + c2, ldx, xsb, sx, D, d_off + c2, ldd, sd, P, S, n2, 2, 2)
            _reduce_mk(A, ao + c1, lda, X, xo + c1, ldx, xsb, sx, D, d_off + c1, ldd, sd, P, S, n1, 2, 1)
        else:
            _reduce_mk(A, ao, lda, X, xo, ldx, xsb, sx, D, d_off, ldd, sd, P, S, n4, 1, 4)
            _reduce_mk(A, ao + c2, lda, X, xo + c2, ldx, xsb, sx, D, d_off + c2, ldd, sd, P, S, n2, 1, 2)
            _reduce_mk(A, ao + c1, lda, X, xo + c1, ldx, xsb, sx, D, d_off + c1, ldd, sd, P, S, n1, 1, 1)
        t += nt


def _taps_numpy(Y, y_off, ldy, I, i_off, ldi, X, x_off, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, P, NV):
    """_taps_impl in NumPy (same sums, a multiply and an add instead of an FMA)."""
    n = NV * (VBYTES // Y.itemsize)
    if n <= 0:
        return
    for p in range(P):
        io = i_off + p * ldi
        acc = I[io:io + n].copy()
        for r in range(R if K > 0 else 0):
            for k in range(K):
                xo = x_off + r * xsa + k * xsb + p * ldx
                wo = w_off + r * wsa + k * wsb
                acc += X[xo:xo + n] * Wt[wo:wo + n]
        yo = y_off + p * ldy
        Y[yo:yo + n] = acc


def _reduce_numpy(A, a_off, lda, X, x_off, ldx, xsb, sx, D, d_off, ldd, sd, P, S, NT, NV):
    """_reduce_impl in NumPy."""
    n = NV * (VBYTES // A.itemsize)
    if P <= 0 or S <= 0 or n <= 0:
        return
    for t in range(NT):
        ao = a_off + t * lda
        acc = A[ao:ao + n]
        for s in range(S):
            for p in range(P):
                xo = x_off + s * sx + p * ldx + t * xsb
                do = d_off + s * sd + p * ldd
                acc += X[xo:xo + n] * D[do:do + n]


# The tile dispatchers are compiled once per dtype as C-callable cfuncs registered under a
# fixed symbol name, and the kernels call them by that name (as fastcnn/kernels/gemm.py does
# for gemm, and for the same reason: inlined, the microkernel instances were compiled again
# in each of the modules a prange loop is made of; a cold compile of the kernels took
# minutes). ``ensure_depthwise(dtype)`` compiles (or loads from Numba's cache) and registers them.
_CFUNCS = {}


def _symbol(name, dtype):
    return f"fastcnn_depthwise_{name}_{np.dtype(dtype).name}"


def ensure_depthwise(dtype):
    """Compile (or load from Numba's cache) the dtype's tile cfuncs and register their symbols.

    Plain Python; the public entry points call it (a dict lookup after the first time).
    TypeError for a dtype other than float32/float64; under NUMBA_DISABLE_JIT only the check.
    """
    dtype = np.dtype(dtype)
    if dtype in _CFUNCS:
        return
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"the fastcnn kernels support float32 and float64, got {dtype}")
    if DISABLE_JIT:
        _CFUNCS[dtype] = None
        return
    import llvmlite.binding as llvm

    ptr = types.CPointer(numba.from_dtype(dtype))
    i64 = types.int64
    taps = cfunc(types.void(ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, i64, i64, i64,
                            i64, i64), cache=True, error_model="numpy")(_taps_impl)
    reduce = cfunc(types.void(ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, i64, i64, i64, i64, i64),
                   cache=True, error_model="numpy")(_reduce_impl)
    llvm.add_symbol(_symbol("taps", dtype), taps.address)
    llvm.add_symbol(_symbol("reduce", dtype), reduce.address)
    _CFUNCS[dtype] = (taps, reduce)


def _call_by_symbol(name):
    """codegen for an intrinsic calling the registered cfunc ``name`` of the arrays' dtype."""

    def codegen(context, builder, signature, args):
        vals = []
        for ty, val in zip(signature.args, args):
            if isinstance(ty, types.Array):
                vals.append(context.make_array(ty)(context, builder, val).data)
            else:
                vals.append(context.cast(builder, val, ty, types.int64))
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in vals])
        symbol = _symbol(name, str(signature.args[0].dtype))
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, symbol), vals)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _taps_call(typingctx, Y, y_off, ldy, I, i_off, ldi, X, x_off, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, P, NV):
    """_taps_impl inside @njit code (arrays of one dtype; ensure_depthwise registered it)."""
    sig = types.void(Y, y_off, ldy, I, i_off, ldi, X, x_off, ldx, xsa, xsb, Wt, w_off, wsa, wsb, R, K, P, NV)
    return sig, _call_by_symbol("taps")


@intrinsic
def _reduce_call(typingctx, A, a_off, lda, X, x_off, ldx, xsb, sx, D, d_off, ldd, sd, P, S, NT, NV):
    """_reduce_impl inside @njit code (arrays of one dtype; ensure_depthwise registered it)."""
    sig = types.void(A, a_off, lda, X, x_off, ldx, xsb, sx, D, d_off, ldd, sd, P, S, NT, NV)
    return sig, _call_by_symbol("reduce")


_taps = _taps_numpy if DISABLE_JIT else _taps_call
_reduce = _reduce_numpy if DISABLE_JIT else _reduce_call


@njit(error_model="numpy", cache=True)
def _tile_row(w, OW):
    """The weights (KH, KW, 1, Cm) or a bias (Cm,), seen as (T, Cm), repeated along an output row of OW
    pixels: returns wr (T*OW*Cm,) with wr[(t*OW + ow)*Cm + o] = w[t, o]."""
    Cm = w.shape[-1]
    wf = np.ascontiguousarray(w).reshape(-1)
    T = wf.shape[0] // Cm
    wr = np.empty(T * OW * Cm, dtype=wf.dtype)
    for t in range(T):
        for ow in range(OW):
            _copy(wr, (t * OW + ow) * Cm, wf, t * Cm, Cm)
    return wr


# --------------------------------------------------------------------------
# Depthwise kernels
# --------------------------------------------------------------------------

@njit(error_model="numpy", cache=True)
def _fast(C, m, itemsize):
    """The register-tile path: channel multiplier 1 and whole SIMD vectors of channels."""
    return m == 1 and C % (VBYTES // itemsize) == 0


@njit(error_model="numpy", cache=True)
def _interior(OW, W, KW, sw, pl, dw):
    """(owa, owb): the output columns owa <= ow < owb whose every kernel column is inside the row."""
    owa = min(OW, max(0, _ceil_div(pl, sw)))
    owb = max(owa, min(OW, (W - 1 + pl - (KW - 1) * dw) // sw + 1))
    return owa, owb


@njit(error_model="numpy", cache=True)
def _window_table(O, I, K, s, p, d):
    """tab[o] = (k0, k1): the kernel taps k0 <= k < k1 of output position o whose input position
    o*s - p + k*d is inside [0, I). Computed once per call: the row loops do no integer division
    (a variable divisor costs tens of cycles; there are many per row otherwise)."""
    tab = np.empty((O, 2), dtype=np.int64)
    for o in range(O):
        t = o * s - p
        tab[o, 0] = max(0, _ceil_div(-t, d))
        tab[o, 1] = max(tab[o, 0], min(K, _ceil_div(I - t, d)))
    return tab


@njit(error_model="numpy", cache=True)
def _forward_row_fast(yf, yo, bf, xf, xo, xsa, wf, wo, R, C, KW, OW, sw, pl, dw, owa, owb, kwtab):
    """Register tiles: the output row yf[yo:] (OW pixels, C channels) = bias bf + the taps of R kernel
    rows (input rows xf[xo + r*xsa:], weights wf[wo + r*KW*C:]). The output columns owa <= ow < owb
    (every kernel column inside the row) in tiles of up to 6 pixels, the others one by one, each with
    its kernel columns inside the row (kwtab). Every pixel is written once."""
    NVt = C // (VBYTES // yf.itemsize)
    if owb > owa:
        _taps(yf, yo + owa * C, C, bf, 0, 0, xf, xo + (owa * sw - pl) * C, sw * C, xsa, dw * C, wf, wo, KW * C, C,
              R, KW, owb - owa, NVt)
    for e in range(OW - (owb - owa)):
        ow = e if e < owa else e + owb - owa
        kw0 = kwtab[ow, 0]
        _taps(yf, yo + ow * C, C, bf, 0, 0, xf, xo + (ow * sw - pl + kw0 * dw) * C, sw * C, xsa, dw * C, wf,
              wo + kw0 * C, KW * C, C, R, kwtab[ow, 1] - kw0, 1, NVt)


@njit(error_model="numpy", cache=True)
def _backward_input_tables(H, W, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw):
    """The input gradient's geometry, once per call (see _backward_input_row_fast).

    Kernel rows: the kh reaching input row ih are kha + j*ks (j < R), from output rows oha - j*dj:
    ihtab[ih] = (kha, R, oha), kha = -1 when none. Kernel columns, per phase r of the input
    columns (iw = q*sw + r): kwa + i*ksw (i < K), from output columns q + e0 - i*de; the columns
    qa <= q < qb take all K; phtab[r] = (cnt, kwa, K, e0, qa, qb) (kwa = -1: none); the others take
    i0 <= i < i1: edgetab[iw] = (i0, i1). Returns (ihtab, phtab, edgetab, ks, ksw, dj, de).
    """
    ks = 1
    while (ks * dh) % sh != 0:
        ks += 1
    ksw = 1
    while (ksw * dw) % sw != 0:
        ksw += 1
    dj = ks * dh // sh
    de = ksw * dw // sw
    ihtab = np.empty((H, 3), dtype=np.int64)
    for ih in range(H):
        kha = -1
        for kh in range(KH):
            t = ih + pt - kh * dh
            if t >= 0 and t % sh == 0 and t // sh < OH:
                kha = kh
                break
        R = 0
        if kha >= 0:
            kh = kha
            while kh < KH and ih + pt - kh * dh >= 0:
                R += 1
                kh += ks
        ihtab[ih, 0] = kha
        ihtab[ih, 1] = R
        ihtab[ih, 2] = (ih + pt - kha * dh) // sh if kha >= 0 else 0
    phtab = np.zeros((sw, 6), dtype=np.int64)
    edgetab = np.zeros((W, 2), dtype=np.int64)
    for r in range(sw):
        cnt = (W - r + sw - 1) // sw
        kwa = -1
        for kw in range(KW):
            if (r + pl - kw * dw) % sw == 0:
                kwa = kw
                break
        phtab[r, 0] = cnt
        phtab[r, 1] = kwa
        if kwa < 0 or cnt <= 0:
            continue
        K = (KW - 1 - kwa) // ksw + 1
        e0 = (r + pl - kwa * dw) // sw
        qa = min(cnt, max(0, (K - 1) * de - e0))
        qb = max(qa, min(cnt, OW - e0))
        phtab[r, 2] = K
        phtab[r, 3] = e0
        phtab[r, 4] = qa
        phtab[r, 5] = qb
        for q in range(cnt):
            u = q + e0
            # kernel columns i0 <= i < i1 with 0 <= ow = u - i*de < OW (none: the pixel is zero)
            i0 = max(0, _ceil_div(u - OW + 1, de))
            edgetab[q * sw + r, 0] = i0
            edgetab[q * sw + r, 1] = max(i0, min(K, u // de + 1) if u >= 0 else 0)
    return ihtab, phtab, edgetab, ks, ksw, dj, de


@njit(error_model="numpy", cache=True)
def _backward_input_row_fast(dxf, dxo, zf, dyf, n, ih, wf, W, C, KW, OH, OW, sw, ihtab, phtab, edgetab, ks, ksw,
                             dj, de):
    """Register tiles: dx row (n, ih) at dxf[dxo:] = the sum of its taps (zf: C zeros, the initial
    values); every pixel written once.

    Input column iw = q*sw + r (phase r) is reached from output column ow = (iw + pl - kw*dw) / sw
    for the kernel columns with (r + pl - kw*dw) divisible by sw: kw = kwa + i*ksw, ow = q + e0 - i*de.
    Likewise the kernel rows: kh = kha + j*ks, oh = oha - j*dj. So a run of input columns of one
    phase is a tile over consecutive output columns (ldx = C) and a grid of taps with constant
    strides (dy: -dj rows, -de columns; w: ks kernel rows, ksw columns). The geometry comes from
    _backward_input_tables."""
    NVt = C // (VBYTES // dxf.itemsize)
    kha = ihtab[ih, 0]
    if kha < 0:
        _zero(dxf, dxo, W * C)
        return
    R = ihtab[ih, 1]
    dyo = (n * OH + ihtab[ih, 2]) * OW * C
    xsa = -dj * OW * C
    wo = kha * KW * C
    wsa = ks * KW * C
    for r in range(sw):
        cnt = phtab[r, 0]
        kwa = phtab[r, 1]
        if cnt <= 0:
            continue
        if kwa < 0:
            _taps(dxf, dxo + r * C, sw * C, zf, 0, 0, dyf, 0, 0, 0, 0, wf, 0, 0, 0, 0, 0, cnt, NVt)
            continue
        K = phtab[r, 2]
        e0 = phtab[r, 3]
        qa = phtab[r, 4]
        qb = phtab[r, 5]
        if qb > qa:
            _taps(dxf, dxo + (qa * sw + r) * C, sw * C, zf, 0, 0, dyf, dyo + (qa + e0) * C, C, xsa, -de * C, wf,
                  wo + kwa * C, wsa, ksw * C, R, K, qb - qa, NVt)
        for e in range(cnt - (qb - qa)):
            q = e if e < qa else e + qb - qa
            i0 = edgetab[q * sw + r, 0]
            _taps(dxf, dxo + (q * sw + r) * C, sw * C, zf, 0, 0, dyf, dyo + (q + e0 - i0 * de) * C, C, xsa, -de * C,
                  wf, wo + (kwa + i0 * ksw) * C, wsa, ksw * C, R, edgetab[q * sw + r, 1] - i0, 1, NVt)


@njit(error_model="numpy", cache=True)
def _backward_weight_rows_fast(x, dy, KH, KW, pc, r0, r1, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """Register tiles: pc[(kh*KW + kw)*C + c] += sum of x * dy over the output rows r0 <= n*OH + oh < r1
    (and pc[KH*KW*C + ow*C + c] += their dy, for the bias). Per image and kernel row kh, the output
    rows where kh is inside the image are one reduction: the output columns whose every kernel column
    is inside the row over all those rows, then each other column over all those rows."""
    N, H, W, C = x.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    sh, sw, dh, dw = stride_h, stride_w, dil_h, dil_w
    NVt = C // (VBYTES // pc.itemsize)
    L = OW * C
    T = KH * KW
    xf = x.reshape(-1)
    dyf = dy.reshape(-1)
    for row in range(r0, r1):
        _add(pc, T * C, dyf, row * L, L)
    owa, owb = _interior(OW, W, KW, sw, pad_left, dw)
    kwtab = _window_table(OW, W, KW, sw, pad_left, dw)
    n0 = r0 // OH
    n1 = (r1 - 1) // OH
    for n in range(n0, n1 + 1):
        oh0 = max(r0 - n * OH, 0)
        oh1 = min(r1 - n * OH, OH)
        for kh in range(KH):
            # output rows whose input row ih = oh*sh - pt + kh*dh is inside the image
            u = pad_top - kh * dh
            s0 = max(oh0, _ceil_div(u, sh))
            s1 = min(oh1, _ceil_div(H + u, sh))
            if s1 <= s0:
                continue
            xo = (n * H + s0 * sh - u) * W * C
            dyo = (n * OH + s0) * L
            if owb > owa:
                _reduce(pc, kh * KW * C, C, xf, xo + (owa * sw - pad_left) * C, sw * C, dw * C, sh * W * C, dyf,
                        dyo + owa * C, C, L, owb - owa, s1 - s0, KW, NVt)
            for e in range(OW - (owb - owa)):
                ow = e if e < owa else e + owb - owa
                kw0 = kwtab[ow, 0]
                _reduce(pc, (kh * KW + kw0) * C, C, xf, xo + (ow * sw - pad_left + kw0 * dw) * C, sw * C, dw * C,
                        sh * W * C, dyf, dyo + ow * C, C, L, 1, s1 - s0, kwtab[ow, 1] - kw0, NVt)


@njit(error_model="numpy", parallel=prange_only(), cache=True)
def _depthwise_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """y (N, OH, OW, C*m) = depthwise conv(x (N, H, W, C), w (KH, KW, 1, C*m)) + b; y overwritten."""
    N, H, W, C = x.shape
    KH, KW, _, Cm = w.shape
    OH = y.shape[1]
    OW = y.shape[2]
    m = Cm // C
    sw = stride_w
    Wp = (W + sw - 1) // sw
    fast = _fast(C, m, y.itemsize)
    direct = sw == 1 and m == 1
    L = OW * Cm
    wf = np.ascontiguousarray(w).reshape(-1)
    wr = _tile_row(w, 1 if fast else OW)
    bf = np.ascontiguousarray(b)
    br = _tile_row(b, 1 if fast else OW)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    # Kernel rows inside the image per output row (khtab), kernel columns inside the row per output
    # column (kwtab); the output columns owa <= ow < owb have all their kernel columns inside.
    khtab = _window_table(OH, H, KH, stride_h, pad_top, dil_h)
    kwtab = _window_table(OW, W, KW, sw, pad_left, dil_w)
    owa, owb = _interior(OW, W, KW, sw, pad_left, dil_w)
    R = N * OH
    nchunks = min(R, _ROW_CHUNKS)
    for ch in prange(nchunks):
        buf = np.empty(0 if direct or fast else sw * Wp * Cm, dtype=y.dtype)
        r0 = (ch * R) // nchunks
        n = r0 // OH
        oh = r0 - n * OH
        for row in range(r0, ((ch + 1) * R) // nchunks):
            yo = row * L
            kh0 = khtab[oh, 0]
            kh1 = khtab[oh, 1]
            t = pad_top - oh * stride_h
            if fast:
                _forward_row_fast(yf, yo, bf, xf, (n * H + kh0 * dil_h - t) * W * C, dil_h * W * C, wf,
                                  kh0 * KW * C, kh1 - kh0, C, KW, OW, sw, pad_left, dil_w, owa, owb, kwtab)
            else:
                _forward_row_runs(yf, yo, br, xf, wr, buf, n, kh0, kh1, t, H, W, C, m, KW, OW, sw, pad_left, dil_h,
                                  dil_w)
            oh += 1
            if oh == OH:
                oh = 0
                n += 1


@njit(error_model="numpy", cache=True)
def _forward_row_runs(yf, yo, br, xf, wr, buf, n, kh0, kh1, t, H, W, C, m, KW, OW, sw, pl, dh, dw):
    """The runs path of one output row: bias, then one run per kernel tap over the output columns
    whose input column is inside the row."""
    Cm = C * m
    L = OW * Cm
    Wp = (W + sw - 1) // sw
    direct = sw == 1 and m == 1
    _copy(yf, yo, br, 0, L)
    for kh in range(kh0, kh1):
        xo = (n * H + kh * dh - t) * W * C
        if direct:
            src = xf
            base = xo
        else:
            _split_row(buf, xf, xo, W, C, m, sw, Wp)
            src = buf
            base = 0
        for kw in range(KW):
            # Output columns whose input column ow*sw + s is inside the row.
            s = kw * dw - pl
            ow0 = max(0, _ceil_div(-s, sw))
            ow1 = min(OW, _ceil_div(W - s, sw))
            if ow1 > ow0:
                r = s % sw
                _madd(yf, yo + ow0 * Cm, src, base + (r * Wp + (s - r) // sw + ow0) * Cm,
                      wr, (kh * KW + kw) * L + ow0 * Cm, (ow1 - ow0) * Cm)


@njit(error_model="numpy", cache=True)
def _backward_input_rows(dy, w, wr, zf, dx, buf, r0, r1, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dx rows r0 <= n*H + ih < r1 = their gradient; fully overwritten (buf: the runs path's scratch row)."""
    N, H, W, C = dx.shape
    KH, KW, _, Cm = w.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    m = Cm // C
    sw = stride_w
    Wp = (W + sw - 1) // sw
    L = OW * Cm
    dyf = dy.reshape(-1)
    dxf = dx.reshape(-1)
    wf = w.reshape(-1)
    fast = _fast(C, m, dx.itemsize)
    direct = sw == 1 and m == 1
    if fast:
        ihtab, phtab, edgetab, ks, ksw, dj, de = _backward_input_tables(H, W, KH, KW, OH, OW, stride_h, sw, pad_top,
                                                                        pad_left, dil_h, dil_w)
        n = r0 // H
        ih = r0 - n * H
        for row in range(r0, r1):
            _backward_input_row_fast(dxf, row * W * C, zf, dyf, n, ih, wf, W, C, KW, OH, OW, sw, ihtab, phtab,
                                     edgetab, ks, ksw, dj, de)
            ih += 1
            if ih == H:
                ih = 0
                n += 1
        return
    for row in range(r0, r1):
        n = row // H
        ih = row - n * H
        dxo = row * W * C
        if direct:
            dst = dxf
            base = dxo
            _zero(dxf, dxo, W * C)
        else:
            dst = buf
            base = 0
            _zero(buf, 0, sw * Wp * Cm)
        for kh in range(KH):
            oh = tap_output_row(ih, kh, pad_top, dil_h, stride_h, OH)
            if oh < 0:
                continue
            dyo = (n * OH + oh) * L
            for kw in range(KW):
                s = kw * dil_w - pad_left
                ow0 = max(0, _ceil_div(-s, sw))
                ow1 = min(OW, _ceil_div(W - s, sw))
                if ow1 > ow0:
                    r = s % sw
                    _madd(dst, base + (r * Wp + (s - r) // sw + ow0) * Cm, dyf, dyo + ow0 * Cm,
                          wr, (kh * KW + kw) * L + ow0 * Cm, (ow1 - ow0) * Cm)
        if not direct:
            _merge_row(dxf, dxo, buf, W, C, m, sw, Wp)


@njit(error_model="numpy", cache=True)
def _backward_weight_rows(x, dy, KH, KW, pc, buf, r0, r1, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """The runs path: add output rows r0 <= n*OH + oh < r1's terms to the partial pc: per tap, OW*Cm
    accumulators from pc[tap*OW*Cm:], then OW*Cm slots summing dy for the bias (buf: scratch row)."""
    N, H, W, C = x.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    Cm = dy.shape[3]
    m = Cm // C
    sw = stride_w
    Wp = (W + sw - 1) // sw
    direct = sw == 1 and m == 1
    L = OW * Cm
    T = KH * KW
    xf = x.reshape(-1)
    dyf = dy.reshape(-1)
    for row in range(r0, r1):
        n = row // OH
        oh = row - n * OH
        dyo = row * L
        _add(pc, T * L, dyf, dyo, L)
        t = pad_top - oh * stride_h
        kh0 = max(0, _ceil_div(t, dil_h))
        kh1 = min(KH, _ceil_div(H + t, dil_h))
        for kh in range(kh0, kh1):
            xo = (n * H + kh * dil_h - t) * W * C
            if direct:
                src = xf
                base = xo
            else:
                _split_row(buf, xf, xo, W, C, m, sw, Wp)
                src = buf
                base = 0
            for kw in range(KW):
                s = kw * dil_w - pad_left
                ow0 = max(0, _ceil_div(-s, sw))
                ow1 = min(OW, _ceil_div(W - s, sw))
                if ow1 > ow0:
                    r = s % sw
                    _madd(pc, (kh * KW + kw) * L + ow0 * Cm, src, base + (r * Wp + (s - r) // sw + ow0) * Cm,
                          dyf, dyo + ow0 * Cm, (ow1 - ow0) * Cm)


@njit(error_model="numpy", parallel=prange_only(), cache=True)
def _depthwise_backward(x, dy, w, dx, dw, db, need_dx, need_dw, stride_h, stride_w, pad_top, pad_left, dil_h,
                        dil_w):
    """dx (N, H, W, C) = dL/dx if need_dx; dw (KH, KW, 1, C*m) and db (C*m,) = dL/dw, dL/db if need_dw;
    all overwritten. x, dx: (N, H, W, C) (x is read only for dw, dx written only for dx).

    One parallel region for both gradients: its iterations are the weight gradient's NW chunks
    interleaved evenly with the input gradient's NX chunks of dx rows (thread blocks of
    iterations get shares of both).
    """
    N, H, W, C = x.shape
    KH, KW, _, Cm = w.shape
    OH = dy.shape[1]
    OW = dy.shape[2]
    m = Cm // C
    sw = stride_w
    Wp = (W + sw - 1) // sw
    fast = _fast(C, m, x.itemsize)
    L = OW * Cm
    T = KH * KW
    # Accumulators per tap: (OW, Cm) for the run path, (Cm,) for the register tiles.
    LT = Cm if fast else L
    wr = _tile_row(w, 1 if fast else OW)
    zf = np.zeros(C, dtype=x.dtype)
    RW = N * OH
    NW = min(RW, _WEIGHT_CHUNKS) if need_dw else 0
    RX = N * H
    NX = min(RX, _ROW_CHUNKS) if need_dx else 0
    M = NW + NX
    # Per weight chunk: T taps x LT accumulators, then (OW, Cm) for the bias.
    partial = np.zeros((NW, T * LT + L), dtype=x.dtype)
    for i in prange(M):
        buf = np.empty(0 if fast or (sw == 1 and m == 1) else sw * Wp * Cm, dtype=x.dtype)
        # iteration i is the weight chunk floor(i*NW/M) when that count steps at i, else a dx chunk.
        nw_before = (i * NW) // M
        nw_after = ((i + 1) * NW) // M
        if nw_after > nw_before:
            ch = nw_before
            r0 = (ch * RW) // NW
            r1 = ((ch + 1) * RW) // NW
            if fast:
                _backward_weight_rows_fast(x, dy, KH, KW, partial[ch], r0, r1, stride_h, stride_w, pad_top, pad_left,
                                           dil_h, dil_w)
            else:
                _backward_weight_rows(x, dy, KH, KW, partial[ch], buf, r0, r1, stride_h, stride_w, pad_top, pad_left,
                                      dil_h, dil_w)
        else:
            ch = i - nw_after
            _backward_input_rows(dy, w, wr, zf, dx, buf, (ch * RX) // NX, ((ch + 1) * RX) // NX, stride_h, stride_w,
                                 pad_top, pad_left, dil_h, dil_w)
    if not need_dw:
        return
    # Fixed-order reduction: chunk by chunk, then (run path, bias) output column by output column.
    # Serial: a few thousand vector adds, not worth a second parallel region (each one is a wait
    # for every thread, long on a machine busy with other work).
    dwf = dw.reshape(-1)
    OWT = 1 if fast else OW
    for t in range(T + 1):
        out = dwf[t * Cm:(t + 1) * Cm] if t < T else db
        _zero(out, 0, Cm)
        for ch in range(NW):
            if t < T:
                for ow in range(OWT):
                    _add(out, 0, partial[ch], t * LT + ow * Cm, Cm)
            else:
                for ow in range(OW):
                    _add(out, 0, partial[ch], T * LT + ow * Cm, Cm)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------

def _check_depthwise(x_shape, w_shape, y_shape):
    """ValueError unless x (N, H, W, C), w (KH, KW, 1, C*m), y (N, OH, OW, C*m) fit (the kernels do no
    bounds checks)."""
    if len(x_shape) != 4 or len(w_shape) != 4 or len(y_shape) != 4:
        raise ValueError(f"depthwise: expected 4-D x, w, y; got {x_shape}, {w_shape}, {y_shape}")
    C, Cm = x_shape[3], w_shape[3]
    if w_shape[2] != 1 or C < 1 or Cm % C or y_shape[3] != Cm or y_shape[0] != x_shape[0]:
        raise ValueError(f"depthwise: x {x_shape}, w {w_shape}, y {y_shape} do not fit "
                         f"(w must be (KH, KW, 1, C*m), y (N, OH, OW, C*m))")


def _check_geometry(stride_h, stride_w, dil_h, dil_w):
    if min(stride_h, stride_w, dil_h, dil_w) < 1:
        raise ValueError(f"depthwise: strides and dilations must be >= 1, got {(stride_h, stride_w)}, "
                         f"{(dil_h, dil_w)}")


def depthwise_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """y (N, OH, OW, C*m) = depthwise conv(x (N, H, W, C), w (KH, KW, 1, C*m)) + b (C*m,); y overwritten."""
    _check_depthwise(x.shape, w.shape, y.shape)
    _check_geometry(stride_h, stride_w, dil_h, dil_w)
    ensure_depthwise(y.dtype)
    _depthwise_forward(x, w, b, y, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)


def depthwise_backward(x, dy, w, dx, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """Both gradients in one pass (one parallel region): dx (N, H, W, C) = dL/dx, or nothing when dx is
    None; dw (KH, KW, 1, C*m) and db (C*m,) = dL/dw, dL/db; all overwritten."""
    _check_depthwise(x.shape, w.shape, dy.shape)
    if dw.shape != w.shape or db.shape != (w.shape[3],) or (dx is not None and dx.shape != x.shape):
        raise ValueError(f"depthwise: dx {None if dx is None else dx.shape}, dw {dw.shape}, db {db.shape} do not "
                         f"fit x {x.shape} and w {w.shape}")
    _check_geometry(stride_h, stride_w, dil_h, dil_w)
    ensure_depthwise(x.dtype)
    _depthwise_backward(x, dy, w, x if dx is None else dx, dw, db, dx is not None, True, stride_h, stride_w, pad_top,
                        pad_left, dil_h, dil_w)


def depthwise_backward_input(dy, w, dx, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dx (N, H, W, C) = dL/dx given dy (N, OH, OW, C*m); dx fully overwritten."""
    _check_depthwise(dx.shape, w.shape, dy.shape)
    _check_geometry(stride_h, stride_w, dil_h, dil_w)
    ensure_depthwise(dx.dtype)
    _depthwise_backward(dx, dy, w, dx, w, w[0, 0, 0], True, False, stride_h, stride_w, pad_top, pad_left, dil_h,
                        dil_w)


def depthwise_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dw (KH, KW, 1, C*m) and db (C*m,) = dL/dw, dL/db given x and dy; both overwritten."""
    _check_depthwise(x.shape, dw.shape, dy.shape)
    _check_geometry(stride_h, stride_w, dil_h, dil_w)
    ensure_depthwise(dw.dtype)
    _depthwise_backward(x, dy, dw, x, dw, db, False, True, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)


# --------------------------------------------------------------------------
# Any groups (plain Python): conv per group, depthwise, or conv
# --------------------------------------------------------------------------

def _split_groups(a, groups):
    """(..., groups*k) -> (groups, ..., k) C-contiguous (one transposing copy)."""
    k = a.shape[-1] // groups
    v = a.reshape(*a.shape[:-1], groups, k)
    return np.ascontiguousarray(np.moveaxis(v, -2, 0))


def _merge_groups(dst, parts):
    """dst (..., groups*k) = parts (groups, ..., k) put back side by side along the last axis."""
    groups, k = parts.shape[0], parts.shape[-1]
    np.copyto(dst.reshape(*dst.shape[:-1], groups, k), np.moveaxis(parts, 0, -2))


def _is_depthwise(channels, w, groups):
    return groups == channels and w.shape[2] == 1


def _check_groups(channels, w, groups):
    if groups < 1 or channels % groups or w.shape[3] % groups or w.shape[2] * groups != channels:
        raise ValueError(f"groups {groups}: input channels {channels} and weight {w.shape} do not fit "
                         f"(weight (KH, KW, C/groups, Cout), both C and Cout divisible by groups)")


def grouped_forward(x, w, b, y, groups, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """y (N, OH, OW, Cout) = grouped conv(x (N, H, W, C), w (KH, KW, C/groups, Cout)) + b; y overwritten.

    Output channel o sees the input channels of group o // (Cout/groups). groups == 1: the conv
    kernel; groups == C: the depthwise kernel; otherwise the conv kernel once per group on the
    group's channels gathered into contiguous arrays.
    """
    from fastcnn.kernels import conv

    geometry = (stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)
    _check_groups(x.shape[3], w, groups)
    if groups == 1:
        conv.conv2d_forward(x, w, b, y, *geometry)
    elif _is_depthwise(x.shape[3], w, groups):
        depthwise_forward(x, w, b, y, *geometry)
    else:
        xg, wg, bg = _split_groups(x, groups), _split_groups(w, groups), _split_groups(b, groups)
        yg = np.empty((groups, *y.shape[:3], y.shape[3] // groups), dtype=y.dtype)
        for g in range(groups):
            conv.conv2d_forward(xg[g], wg[g], bg[g], yg[g], *geometry)
        _merge_groups(y, yg)


def grouped_backward_input(dy, w, dx, groups, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dx (N, H, W, C) = dL/dx of grouped_forward given dy (N, OH, OW, Cout); dx fully overwritten."""
    from fastcnn.kernels import conv

    geometry = (stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)
    _check_groups(dx.shape[3], w, groups)
    if groups == 1:
        conv.conv2d_backward_input(dy, w, dx, *geometry)
    elif _is_depthwise(dx.shape[3], w, groups):
        depthwise_backward_input(dy, w, dx, *geometry)
    else:
        dyg, wg = _split_groups(dy, groups), _split_groups(w, groups)
        dxg = np.empty((groups, *dx.shape[:3], dx.shape[3] // groups), dtype=dx.dtype)
        for g in range(groups):
            conv.conv2d_backward_input(dyg[g], wg[g], dxg[g], *geometry)
        _merge_groups(dx, dxg)


def grouped_backward(x, dy, w, dx, dw, db, groups, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """Both gradients of grouped_forward: dx (N, H, W, C) = dL/dx (skipped when dx is None), dw and db
    = dL/dw, dL/db; all overwritten. Depthwise: one pass (depthwise_backward)."""
    geometry = (stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)
    _check_groups(x.shape[3], w, groups)
    if _is_depthwise(x.shape[3], w, groups):
        depthwise_backward(x, dy, w, dx, dw, db, *geometry)
        return
    grouped_backward_weight(x, dy, dw, db, groups, *geometry)
    if dx is not None:
        grouped_backward_input(dy, w, dx, groups, *geometry)


def grouped_backward_weight(x, dy, dw, db, groups, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w):
    """dw (KH, KW, C/groups, Cout) and db (Cout,) = dL/dw, dL/db of grouped_forward; both overwritten."""
    from fastcnn.kernels import conv

    geometry = (stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)
    _check_groups(x.shape[3], dw, groups)
    if groups == 1:
        conv.conv2d_backward_weight(x, dy, dw, db, *geometry)
    elif _is_depthwise(x.shape[3], dw, groups):
        depthwise_backward_weight(x, dy, dw, db, *geometry)
    else:
        xg, dyg = _split_groups(x, groups), _split_groups(dy, groups)
        dwg = np.empty((groups, *dw.shape[:3], dw.shape[3] // groups), dtype=dw.dtype)
        dbg = np.empty((groups, db.shape[0] // groups), dtype=db.dtype)
        for g in range(groups):
            conv.conv2d_backward_weight(xg[g], dyg[g], dwg[g], dbg[g], *geometry)
        _merge_groups(dw, dwg)
        _merge_groups(db, dbg)
