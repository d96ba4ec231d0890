"""The register-blocked GEMM shared by the conv and dense kernels, and small helpers.

``gemm(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV)``
adds a strided matrix product into C, called from inside @njit kernels::

    C[c_off + i*ldc + j] += sum_{s<S, k<K} A[a_off + s*sa + i*lda + k*ldk] * B[b_off + s*sb + k*ldb + j]

for ``i < M`` and ``j < NV * VL``, where VL = ``VBYTES // itemsize`` is the number
of elements of the dtype per SIMD vector (``vector_length``). C, A and B are
C-contiguous arrays of one dtype (float32 or float64; any shape, indexed as
if flattened: the offsets count elements from their first element). Rows of
C are ``NV`` whole vectors wide, so the caller pads columns to a multiple of
VL. A is addressed through strides (``lda`` between rows, ``ldk`` between
reduction steps), so products read activations where they lie (no im2col
copy where the layout allows). The reduction runs over ``S`` segments of
``K`` steps each (e.g. kernel rows, output rows), shifted by ``sa``/``sb``,
all accumulated in registers. There are no bounds checks: the caller
guarantees every index is inside its array.

Implementation. ``_mk`` is the microkernel, written in LLVM IR through
``numba.extending.intrinsic`` because Numba's loop vectorizer will not keep a
tile of accumulators in registers across a reduction: up to ``MR`` (6) rows
times up to ``NV`` SIMD vectors of columns (4 x 16 float32 with AVX-512: 24
accumulator registers), or with AVX2's 16 registers 4 rows times 3 vectors
(``NB``; 12 accumulators, measured faster than 6 x 2), each loaded B vector
reused by the rows, each A element broadcast, FMA. ``_gemm_impl`` tiles a
whole product with it (columns outermost, in blocks of NB vectors, so a
block of B stays in cache across the row tiles) and is compiled once per dtype as a C-callable
``cfunc`` registered with LLVM under a fixed symbol name (``ensure_gemm``);
``gemm`` is an intrinsic emitting a call of that symbol. Each gemm call sums
its terms in a fixed order (segments, then k, per element), whatever thread
makes it.

Call ``ensure_gemm(dtype)`` (plain Python) before the first call of any
kernel using ``gemm`` with that dtype: the kernels' public entry points do.

``NUMBA_DISABLE_JIT=1`` (Numba's debugging mode: @njit functions run as
plain Python). The intrinsics cannot run there, so ``gemm`` is then
``gemm_numpy``, a NumPy version with the same semantics (strided views and
``@``, summed in another order) that also checks that every index is inside
its array; ``ensure_gemm`` only checks the dtype. ``gemm_numpy`` is always
available, e.g. as a reference.

Helpers used by the kernels: ``copy_vector``, ``fill``, ``prange_only`` (the
``parallel=`` option of the kernels), and the tile constants ``MR``, ``NV``,
``VBYTES``.

Caching note: Numba's cache of a kernel is invalidated when the kernel's own
source file changes, not when this module does; after editing this file,
clear the kernels' cache (``fastcnn/kernels/__pycache__/*.nbi``/``*.nbc``).
"""
import os

import numba
import numpy as np
from llvmlite import ir
from numba import cfunc, njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

__all__ = ["VBYTES", "NV", "NB", "MR", "DISABLE_JIT", "gemm", "gemm_numpy", "ensure_gemm", "vector_length",
           "copy_vector", "fill", "prange_only"]


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


# Bytes per SIMD vector: 64 with AVX-512, else 32 (AVX2).
VBYTES = _vector_bytes()
# Column vectors per microkernel tile (4 x 16 float32 with AVX-512: 24 of the
# 32 vector registers hold accumulators; with 16 registers, 2).
NV = 4 if VBYTES == 64 else 2
# Rows per microkernel tile.
MR = 6
# Column vectors per block of a product (gemm's column loop): with AVX2, 3 (tiles of 4 rows by 3
# vectors: measured on a Zen 3, 1 thread, 1.1-1.2x the 6 x 2 tiles' FLOP rate on the same
# products); with AVX-512, NV.
NB = 3 if NV == 2 else NV
# Numba's debugging mode: @njit functions run as Python, gemm is gemm_numpy.
DISABLE_JIT = bool(numba.config.DISABLE_JIT)


# --------------------------------------------------------------------------
# Microkernel
# --------------------------------------------------------------------------

@intrinsic
def _mk(typingctx, C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, MR_, NV_):
    """C[c_off + i*ldc + j] += sum_{s<S, k<K} A[a_off + s*sa + i*lda + k*ldk] * B[b_off + s*sb + k*ldb + j]

    for i < MR_, j < NV_ * VL (VL = vector length of the dtype): S segments of
    K steps each (e.g. kernel rows, or output rows), all accumulated in
    registers. MR_ and NV_ are compile-time literals. C, A, B: arrays of one
    float dtype (any shape, contiguous; offsets count elements from their
    first element), or pointers to their first elements. No bounds checks:
    the caller guarantees every index is inside its array.
    """
    if not isinstance(MR_, types.IntegerLiteral) or not isinstance(NV_, types.IntegerLiteral):
        return None
    mr = MR_.literal_value
    nv = NV_.literal_value
    dt = C.dtype
    vl = VBYTES * 8 // dt.bitwidth
    sig = types.void(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, MR_, NV_)

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
    """_mk with runtime m (1..MR; 1..4 when nv is 3 with AVX2) and nv (1, 2, 3 or NV) dispatched to
    literal instances."""
    if nv == NV:
        if m == 6:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 6, NV)
        elif m == 5:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 5, NV)
        elif m == 4:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 4, NV)
        elif m == 3:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 3, NV)
        elif m == 2:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 2, NV)
        else:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 1, NV)
    elif nv == 3:
        # 4 rows at most with AVX2 (12 accumulators of its 16 registers; _gemm_impl never asks
        # for more there), 6 with AVX-512.
        if NV == 4 and m == 6:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 6, 3)
        elif NV == 4 and m == 5:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 5, 3)
        elif m == 4:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 4, 3)
        elif m == 3:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 3, 3)
        elif m == 2:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 2, 3)
        else:
            _mk(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, 1, 3)
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


@intrinsic
def vector_length(typingctx, C):
    """Elements of C's dtype per SIMD vector (a compile-time constant): VBYTES // itemsize."""
    vl = VBYTES * 8 // C.dtype.bitwidth

    def codegen(context, builder, signature, args):
        return context.get_constant(types.int64, vl)

    return types.int64(C), codegen


def _gemm_impl(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV_):
    """gemm's body (compiled as a C-callable cfunc, see ensure_gemm): column blocks of NB vectors
    (outermost, so a block of B stays in cache across the row tiles), each in row tiles (MR rows;
    with AVX2 4 rows in 3-vector blocks, and the last 7 or 8 rows of 2-vector blocks as 4 + 3 or
    4 + 4). C, A, B are pointers to float32 or float64.
    """
    if K <= 0 or M <= 0 or S <= 0:
        return
    VL = vector_length(C)
    j = 0
    while j < NV_:
        # Column blocks of NB vectors. AVX2: blocks of 3 (4-row tiles, 12 accumulators), the last
        # 4 vectors as 2 + 2; AVX-512: blocks of 4, the last 3 as one block. Blocks of 3 load 7
        # operands per 12 FMAs where 6 x 2 tiles load 8, and no remainder leaves a 1-vector block
        # of 6 accumulators (too few to hide the FMA latency; 24 or 100 filters did).
        nv = NV_ - j
        if NB == 3:
            nv = 2 if nv == 4 else min(nv, 3)
        else:
            nv = min(nv, NB)
        cj = c_off + j * VL
        bj = b_off + j * VL
        i = 0
        while i < M:
            m = min(MR, M - i)
            # With AVX2 (NV == 2) the last 7 or 8 rows go as 4 + 3 or 4 + 4, not 6 + 1 or 6 + 2: a
            # 1- or 2-row tile holds 2 or 4 accumulators, too few to hide the FMA latency (an 8x8
            # layer's rows are all such tails). Tiles never change a sum's order: the same bits.
            # Measured on a Zen 3, 2 threads: 1.05-1.2x on 8x8x256 and 14x14x64 -> 128 3x3 layers.
            if NV == 2 and (M - i == 7 or M - i == 8):
                m = 4
            if NV == 2 and nv == 3:
                # 4-row tiles; the last 5 or 6 rows as 3 + 2 or 3 + 3 (a 3-row tile's 9 FMAs per step
                # take about as long as a 4-row tile's 12, a 1-row tile's 3 as long as 8).
                m = 3 if M - i == 5 or M - i == 6 else min(4, M - i)
            _tile(C, cj + i * ldc, ldc, A, a_off + i * lda, lda, ldk, B, bj, ldb, K, S, sa, sb, m, nv)
            i += m
        j += nv


# Why a cfunc called by symbol name: Numba links the LLVM IR of every jitted
# callee into each caller and optimizes and compiles it again there, and a
# prange loop is a chain of four modules (gufunc, two wrappers, the kernel),
# so the microkernel instances (the bulk of the kernels' machine code) were
# compiled about a dozen times on a cold start. Compiled once per dtype as a
# cfunc and registered with LLVM under a fixed symbol name, they are compiled
# once, and the kernels only hold an external call (cacheable: no address is
# baked into their code; the symbol is resolved when they are loaded).
_GEMM_CFUNCS = {}


def _gemm_symbol(dtype):
    return "fastcnn_gemm_" + np.dtype(dtype).name


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"the fastcnn kernels support float32 and float64, got {dtype}")
    return dtype


def ensure_gemm(dtype):
    """Compile (or load from Numba's cache) the dtype's gemm cfunc and register its symbol.

    Plain Python; call it before the first call of a kernel that uses ``gemm``
    with this dtype (a dict lookup after the first time). TypeError for a
    dtype other than float32/float64. Under NUMBA_DISABLE_JIT only the dtype
    is checked (``gemm`` is ``gemm_numpy`` there).
    """
    dtype = np.dtype(dtype)
    if dtype in _GEMM_CFUNCS:
        return
    dtype = _check_dtype(dtype)
    if DISABLE_JIT:
        _GEMM_CFUNCS[dtype] = None
        return
    import llvmlite.binding as llvm

    ptr = types.CPointer(numba.from_dtype(dtype))
    i64 = types.int64
    sig = types.void(ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i64)
    cf = cfunc(sig, cache=True, error_model="numpy")(_gemm_impl)
    llvm.add_symbol(_gemm_symbol(dtype), cf.address)
    _GEMM_CFUNCS[dtype] = cf


@intrinsic
def _gemm_call(typingctx, C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV_):
    """gemm inside @njit code: a call of the dtype's _gemm_impl cfunc (registered
    by ensure_gemm) through its symbol. C, A, B: contiguous arrays of one float dtype.
    """
    sig = types.void(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV_)
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
# NumPy version (NUMBA_DISABLE_JIT; a reference)
# --------------------------------------------------------------------------

def _flat(a, name):
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError(f"gemm: {name} must be a C-contiguous array")
    return a.reshape(-1)  # a view: writes to C land in the caller's array


def _view(flat, off, shape, steps, name):
    """The strided view flat[off + sum_d i_d*steps[d]] of the given shape; IndexError when out of bounds."""
    last = off + sum((n - 1) * s for n, s in zip(shape, steps))
    first = off + sum((n - 1) * s for n, s in zip(shape, steps) if s < 0)
    if first < 0 or last >= flat.shape[0] or off < 0 or off >= flat.shape[0]:
        raise IndexError(f"gemm: {name} indices [{min(first, off)}, {max(last, off)}] outside its "
                         f"{flat.shape[0]} elements")
    es = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat[off:], shape=shape, strides=tuple(s * es for s in steps),
                                           writeable=name == "C")


def gemm_numpy(C, c_off, ldc, A, a_off, lda, ldk, B, b_off, ldb, K, S, sa, sb, M, NV_):
    """``gemm`` in NumPy: same arguments and result (up to the order of the sums).

    C[c_off + i*ldc + j] += sum_{s<S, k<K} A[a_off + s*sa + i*lda + k*ldk] * B[b_off + s*sb + k*ldb + j]
    for i < M, j < NV_*VL (VL = VBYTES // itemsize). C, A, B: C-contiguous arrays of
    one float dtype, indexed as if flattened. Each segment's product is computed
    in the dtype (``@``) and added to C. Nothing happens when K, S, M or NV_ is
    <= 0; otherwise an index outside its array raises IndexError.
    """
    if K <= 0 or S <= 0 or M <= 0 or NV_ <= 0:
        return
    Cf, Af, Bf = _flat(C, "C"), _flat(A, "A"), _flat(B, "B")
    if not (Cf.dtype == Af.dtype == Bf.dtype) or Cf.dtype not in (np.float32, np.float64):
        raise TypeError(f"gemm: C, A, B must share one dtype, float32 or float64; got {Cf.dtype}, {Af.dtype}, "
                        f"{Bf.dtype}")
    N = NV_ * (VBYTES // Cf.itemsize)
    c = _view(Cf, c_off, (M, N), (ldc, 1), "C")
    a = _view(Af, a_off, (S, M, K), (sa, lda, ldk), "A")
    b = _view(Bf, b_off, (S, K, N), (sb, ldb, 1), "B")
    acc = a[0] @ b[0]
    for s in range(1, S):
        acc += a[s] @ b[s]
    c += acc


gemm = gemm_numpy if DISABLE_JIT else _gemm_call


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

@njit(error_model="numpy", cache=True, fastmath=True)
def copy_vector(dst, src):
    """dst[:] = src[:] for 1-D views indexed from 0 (so the loop vectorizes); len(dst) elements."""
    for t in range(dst.shape[0]):
        dst[t] = src[t]


@njit(error_model="numpy", cache=True, fastmath=True)
def fill(dst, value):
    """dst[:] = value for a 1-D view."""
    for t in range(dst.shape[0]):
        dst[t] = value


def prange_only():
    """``parallel=`` option: only the explicit prange loops run in parallel.

    With plain ``parallel=True`` every np.zeros/np.empty in the kernels also
    becomes a parfor, and each parfor is compiled as a separate gufunc (plus
    its wrapper), most of the kernels' compile time outside the microkernel.
    A fresh dict per use: Numba pops the keys it reads.
    """
    return {"prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
            "setitem": False, "numpy": False, "stencil": False, "fusion": False}
