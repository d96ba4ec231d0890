"""Bit-identical results whatever the thread count, for the conv, depthwise, dense, loss and optimizer kernels.

The README promises that training gives the same weights for any ``--threads``.
Each kernel here runs in a subprocess per thread count (NUMBA_NUM_THREADS = 1,
2, 3, 4; Numba allows more threads than cores) on the same inputs, and the
outputs are compared byte for byte. An uneven split of the work (3 threads)
is what exposed the bug this guards against: Adam's update compiled with
fastmath divided approximately (vrcpps) in the vectorized body of a thread's
range and exactly in its scalar remainder, so an element's result depended
on where the thread boundaries fell.

A kernel must also compute the same bits whether its process compiled it or
loaded it from Numba's cache (``test_fresh_compile_gives_the_cached_kernels_results``):
otherwise the first run of a config would differ from the next ones.

One subprocess per thread count computes every case (``_worker``) and saves
them to an .npz under tmp_path; the kernels are compiled with cache=True, so
the later subprocesses load them from Numba's cache. Shapes: the seed
network's (batch 64, 28x28x1, conv 32 and 64 3x3, dense 1600->128->10) and a
spread around it: 1 and 3 input channels, odd channel counts (10, 24, 48,
100), stride 2, padding, dilation, 5x5, 7x7 and 1x1 kernels, every path of
the conv kernels (im2col / in place / row items / filter rows), dense sizes that are not
multiples of the vector length or the row blocks, optimizer parameters from
1 element to several blocks. Depthwise: the MobileNet-on-CIFAR shapes (register
tiles, stride 1 and 2), channel counts that take the runs path (3 channels, a
channel multiplier), dilation and asymmetric padding, float64; grouped
convolution (the conv kernels per group).

Skipped under NUMBA_DISABLE_JIT (no threads there).
"""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

THREADS = (1, 2, 3, 4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(bool(numba.config.DISABLE_JIT), reason="NUMBA_DISABLE_JIT: no threads")

# (name, N, H, W, Cin, Cout, KH, KW, sh, sw, pad (top, bottom, left, right), dh, dw, dtype)
CONV_CASES = [
    ("seed_conv1", 64, 28, 28, 1, 32, 3, 3, 1, 1, (0, 0, 0, 0), 1, 1, "float32"),
    ("seed_conv2", 64, 13, 13, 32, 64, 3, 3, 1, 1, (0, 0, 0, 0), 1, 1, "float32"),
    ("cin3_direct_partials", 8, 12, 12, 3, 16, 3, 3, 1, 1, (0, 0, 0, 0), 1, 1, "float32"),
    ("cin3_same", 16, 16, 16, 3, 10, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float32"),
    ("cin10_cout24_stride2_pad", 8, 15, 15, 10, 24, 3, 3, 2, 2, (1, 1, 1, 1), 1, 1, "float32"),
    ("cin24_cout48_dilation2", 6, 14, 14, 24, 48, 3, 3, 1, 1, (2, 2, 2, 2), 2, 2, "float32"),
    ("cin48_cout100_5x5", 4, 12, 12, 48, 100, 5, 5, 1, 1, (2, 2, 2, 2), 1, 1, "float32"),
    ("cin1_cout10_5x5", 8, 20, 20, 1, 10, 5, 5, 1, 1, (0, 0, 0, 0), 1, 1, "float32"),
    ("lenet_cin1_cout6_5x5_pad2", 16, 28, 28, 1, 6, 5, 5, 1, 1, (2, 2, 2, 2), 1, 1, "float32"),
    ("cin3_cout24_7x7_stride2", 4, 32, 32, 3, 24, 7, 7, 2, 2, (3, 3, 3, 3), 1, 1, "float32"),
    ("cin100_cout48_1x1", 8, 10, 10, 100, 48, 1, 1, 1, 1, (0, 0, 0, 0), 1, 1, "float32"),
    ("cin24_cout24_1x1_stride2", 8, 11, 11, 24, 24, 1, 1, 2, 2, (0, 0, 0, 0), 1, 1, "float32"),
    ("cin10_cout10_rect_asym", 5, 17, 13, 10, 10, 3, 2, 2, 1, (2, 1, 0, 1), 1, 2, "float32"),
    ("cifar_cin3_cout32_same", 16, 32, 32, 3, 32, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float32"),
    # Weight gradient's filter-row items and row items (1x1), whose number follows the thread count:
    ("resnet_cin16_cout16_same", 8, 32, 32, 16, 16, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float32"),
    ("cin128_cout128_1x1", 4, 8, 8, 128, 128, 1, 1, 1, 1, (0, 0, 0, 0), 1, 1, "float32"),
    # ... filter-row items with 64+ input channels, dilated columns (one product per tap), Cout not a
    # multiple of the vector length:
    ("vgg_cin64_cout128_same", 4, 12, 12, 64, 128, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float32"),
    ("cin72_cout120_dil_stride2", 3, 11, 12, 72, 120, 3, 3, 2, 1, (1, 1, 2, 0), 1, 2, "float32"),
    ("f64_cin10_cout24_stride2_pad", 8, 15, 15, 10, 24, 3, 3, 2, 2, (1, 1, 1, 1), 1, 1, "float64"),
    ("f64_seed_conv2", 16, 13, 13, 32, 64, 3, 3, 1, 1, (0, 0, 0, 0), 1, 1, "float64"),
]
# (name, N, H, W, C, channel multiplier, KH, KW, sh, sw, pad (top, bottom, left, right), dh, dw, dtype)
DEPTHWISE_CASES = [
    ("mobilenet_32x32x32", 64, 32, 32, 32, 1, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float32"),
    ("mobilenet_32x32x64_stride2_same", 16, 32, 32, 64, 1, 3, 3, 2, 2, (0, 1, 0, 1), 1, 1, "float32"),
    ("mobilenet_4x4x256", 64, 4, 4, 256, 1, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float32"),
    ("tiles_dilation_asym", 8, 13, 12, 16, 1, 3, 2, 1, 2, (2, 1, 0, 1), 2, 1, "float32"),
    ("runs_c3", 16, 12, 12, 3, 1, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float32"),
    ("runs_m2_stride2", 16, 11, 11, 8, 2, 3, 3, 2, 2, (1, 1, 1, 1), 1, 1, "float32"),
    ("f64_tiles", 16, 10, 10, 16, 1, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, "float64"),
    ("f64_runs_m3", 8, 9, 9, 5, 3, 3, 3, 2, 1, (1, 1, 1, 1), 1, 1, "float64"),
]
# (name, N, H, W, Cin, Cout, groups, K, stride, pad, dtype): general groups
GROUPED_CASES = [
    ("g2", 16, 12, 12, 16, 32, 2, 3, 1, 1, "float32"),
    ("g4_stride2", 8, 11, 11, 12, 8, 4, 3, 2, 1, "float32"),
]
# (name, N, I, O, dtype)
DENSE_CASES = [
    ("seed_dense1", 64, 1600, 128, "float32"),
    ("seed_dense2", 64, 128, 10, "float32"),
    ("odd_37_100_10", 37, 100, 10, "float32"),
    ("odd_70_50_24", 70, 50, 24, "float32"),
    ("odd_13_129_48", 13, 129, 48, "float32"),
    ("odd_1_7_3", 1, 7, 3, "float32"),
    ("odd_65_33_99", 65, 33, 99, "float32"),
    ("f64_33_65_16", 33, 65, 16, "float64"),
]
# (name, N, K, dtype, label smoothing)
LOSS_CASES = [("seed", 64, 10, "float32", 0.0), ("odd", 37, 100, "float32", 0.0),
              ("smoothing", 37, 100, "float32", 0.1), ("f64", 13, 7, "float64", 0.0),
              ("f64_smoothing", 13, 7, "float64", 0.2)]
OPTIM_SIZES = (1, 10, 32, 64, 100, 288, 1000, 4097, 100003)

KERNELS = ("conv_forward", "conv_backward_input", "conv_backward_weight", "depthwise_forward",
           "depthwise_backward_input", "depthwise_backward_weight", "depthwise_backward", "grouped", "dense", "loss",
           "sgd", "adam", "sum_of_squares", "scale_inplace")


def _out_size(size, k, stride, before, after, dil):
    return (size + before + after - dil * (k - 1) - 1) // stride + 1


def _record_conv_like(out, kind, name, kernels, x, w, b, dy, args):
    """The forward, input gradient and weight gradient of one convolution kernel set (conv or
    depthwise), stored under ``<kind>_forward/<name>``, ``<kind>_backward_input/<name>`` and
    ``<kind>_backward_weight/<name>/{dw,db}``."""
    forward, backward_input, backward_weight = kernels
    y = np.empty(dy.shape, x.dtype)
    forward(x, w, b, y, *args)
    dx = np.empty_like(x)
    backward_input(dy, w, dx, *args)
    gw, gb = np.empty_like(w), np.empty_like(b)
    backward_weight(x, dy, gw, gb, *args)
    out[f"{kind}_forward/{name}"] = y
    out[f"{kind}_backward_input/{name}"] = dx
    out[f"{kind}_backward_weight/{name}/dw"] = gw
    out[f"{kind}_backward_weight/{name}/db"] = gb


def _worker(path, groups=("conv", "depthwise", "dense", "loss", "optim"), dtypes=("float32", "float64")):
    """Compute every case of ``groups`` and ``dtypes`` with this process's thread count; save to the .npz ``path``."""
    import numba

    from fastcnn.kernels import conv, dense, depthwise, loss, optim

    out = {"threads": np.array(numba.get_num_threads())}
    for name, N, H, W, Cin, Cout, KH, KW, sh, sw, pad, dh, dw, dt in CONV_CASES if "conv" in groups else ():
        if dt not in dtypes:
            continue
        rng = np.random.default_rng(0)
        x = rng.standard_normal((N, H, W, Cin)).astype(dt)
        w = (rng.standard_normal((KH, KW, Cin, Cout)) / np.sqrt(KH * KW * Cin)).astype(dt)
        b = rng.standard_normal(Cout).astype(dt)
        OH = _out_size(H, KH, sh, pad[0], pad[1], dh)
        OW = _out_size(W, KW, sw, pad[2], pad[3], dw)
        dy = rng.standard_normal((N, OH, OW, Cout)).astype(dt)
        args = (sh, sw, pad[0], pad[2], dh, dw)
        _record_conv_like(out, "conv", name, (conv.conv2d_forward, conv.conv2d_backward_input,
                                              conv.conv2d_backward_weight), x, w, b, dy, args)
    for name, N, H, W, C, m, KH, KW, sh, sw, pad, dh, dw, dt in DEPTHWISE_CASES if "depthwise" in groups else ():
        if dt not in dtypes:
            continue
        rng = np.random.default_rng(4)
        x = rng.standard_normal((N, H, W, C)).astype(dt)
        w = (rng.standard_normal((KH, KW, 1, C * m)) / np.sqrt(KH * KW)).astype(dt)
        b = rng.standard_normal(C * m).astype(dt)
        OH = _out_size(H, KH, sh, pad[0], pad[1], dh)
        OW = _out_size(W, KW, sw, pad[2], pad[3], dw)
        dy = rng.standard_normal((N, OH, OW, C * m)).astype(dt)
        args = (sh, sw, pad[0], pad[2], dh, dw)
        _record_conv_like(out, "depthwise", name, (depthwise.depthwise_forward, depthwise.depthwise_backward_input,
                                                   depthwise.depthwise_backward_weight), x, w, b, dy, args)
        dx2, gw2, gb2 = np.empty_like(x), np.empty_like(w), np.empty_like(b)
        depthwise.depthwise_backward(x, dy, w, dx2, gw2, gb2, *args)   # both in one parallel region
        for key, val in dict(dx=dx2, dw=gw2, db=gb2).items():
            out[f"depthwise_backward/{name}/{key}"] = val
    for name, N, H, W, Cin, Cout, G, K, s, p, dt in GROUPED_CASES if "depthwise" in groups else ():
        if dt not in dtypes:
            continue
        rng = np.random.default_rng(5)
        x = rng.standard_normal((N, H, W, Cin)).astype(dt)
        w = (rng.standard_normal((K, K, Cin // G, Cout)) / np.sqrt(K * K * Cin // G)).astype(dt)
        b = rng.standard_normal(Cout).astype(dt)
        OH = _out_size(H, K, s, p, p, 1)
        OW = _out_size(W, K, s, p, p, 1)
        dy = rng.standard_normal((N, OH, OW, Cout)).astype(dt)
        args = (s, s, p, p, 1, 1)
        y = np.empty((N, OH, OW, Cout), dt)
        depthwise.grouped_forward(x, w, b, y, G, *args)
        dx = np.empty_like(x)
        depthwise.grouped_backward_input(dy, w, dx, G, *args)
        gw = np.empty_like(w)
        gb = np.empty_like(b)
        depthwise.grouped_backward_weight(x, dy, gw, gb, G, *args)
        for key, val in dict(y=y, dx=dx, dw=gw, db=gb).items():
            out[f"grouped/{name}/{key}"] = val
    for name, N, I, O, dt in DENSE_CASES if "dense" in groups else ():
        if dt not in dtypes:
            continue
        rng = np.random.default_rng(1)
        x = rng.standard_normal((N, I)).astype(dt)
        w = (rng.standard_normal((I, O)) / np.sqrt(I)).astype(dt)
        b = rng.standard_normal(O).astype(dt)
        dy = rng.standard_normal((N, O)).astype(dt)
        y = np.empty((N, O), dt)
        dense.dense_forward(x, w, b, y)
        dx = np.empty_like(x)
        dense.dense_backward_input(dy, w, dx)
        gw = np.empty_like(w)
        gb = np.empty_like(b)
        dense.dense_backward_weight(x, dy, gw, gb)
        for key, val in dict(y=y, dx=dx, dw=gw, db=gb).items():
            out[f"dense/{name}/{key}"] = val
    for name, N, K, dt, eps in LOSS_CASES if "loss" in groups else ():
        if dt not in dtypes:
            continue
        rng = np.random.default_rng(2)
        logits = (3 * rng.standard_normal((N, K))).astype(dt)
        labels = rng.integers(0, K, N).astype(np.int64)
        dlogits = np.empty_like(logits)
        value = loss.softmax_cross_entropy_kernel(logits, labels, dlogits, np.dtype(dt).type(eps))
        out[f"loss/{name}/value"] = np.array(value)
        out[f"loss/{name}/dlogits"] = dlogits
    for n in OPTIM_SIZES if "optim" in groups else ():
        for dt in [d for d in (("float32", "float64") if n in (100, 4097) else ("float32",)) if d in dtypes]:
            t = np.dtype(dt).type
            rng = np.random.default_rng(3)
            p0 = rng.standard_normal(n).astype(dt)
            g = (0.1 * rng.standard_normal(n)).astype(dt)
            m0 = (0.01 * rng.standard_normal(n)).astype(dt)
            v0 = (1e-3 * rng.random(n)).astype(dt)
            for variant, (mom, damp, wd, nest, first) in {
                    "plain": (0.0, 0.0, 0.0, False, False), "momentum_first": (0.9, 0.0, 0.0, False, True),
                    "momentum": (0.9, 0.1, 0.0, False, False), "nesterov_wd": (0.9, 0.0, 5e-4, True, False)}.items():
                p, buf = p0.copy(), m0.copy()
                optim.sgd_update(p, g, buf, t(0.05), t(mom), t(damp), t(wd), nest, first)
                out[f"sgd/{dt}/{n}/{variant}/p"] = p
                out[f"sgd/{dt}/{n}/{variant}/buf"] = buf
            # p = 0: the update is stored unrounded by the subtraction, so a last-bit
            # difference of the quotient shows (the approximate division differed in
            # ~1% of the elements; with |p| ~ 1 the update's last bits are rounded away).
            for variant, (wd, decoupled, step, zero_p) in {
                    "adam_step1": (0.0, False, 1, False), "adam_step7": (0.0, False, 7, False),
                    "adam_wd": (1e-2, False, 3, False), "adamw": (1e-2, True, 3, False),
                    "adam_p0_step1": (0.0, False, 1, True), "adam_p0_step7": (0.0, False, 7, True),
                    "adam_p0_step50": (0.0, False, 50, True), "adamw_p0": (1e-2, True, 50, True)}.items():
                p, m, v = (np.zeros_like(p0) if zero_p else p0.copy()), m0.copy(), v0.copy()
                bc1 = 1.0 - 0.9 ** step
                bc2_sqrt = (1.0 - 0.999 ** step) ** 0.5
                optim.adam_update(p, g, m, v, t(1e-3), t(0.9), t(0.999), t(1e-8), t(wd), decoupled, t(bc1),
                                  t(bc2_sqrt))
                for key, val in dict(p=p, m=m, v=v).items():
                    out[f"adam/{dt}/{n}/{variant}/{key}"] = val
            out[f"sum_of_squares/{dt}/{n}"] = np.array(optim.sum_of_squares(g))
            gs = g.copy()
            optim.scale_inplace(gs, t(0.3))
            out[f"scale_inplace/{dt}/{n}"] = gs
    np.savez(path, **out)


def _run_worker(path, threads, groups=None, dtypes=None, **env_extra):
    """_worker in a subprocess with NUMBA_NUM_THREADS=threads; {key: array}."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([ROOT, TESTS]), **env_extra)
    args = repr(str(path))
    if groups is not None:
        args += f", groups={tuple(groups)!r}"
    if dtypes is not None:
        args += f", dtypes={tuple(dtypes)!r}"
    proc = subprocess.run([sys.executable, "-c", f"import test_determinism as T; T._worker({args})"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(path) as data:
        res = {k: data[k] for k in data.files}
    assert int(res["threads"]) == threads
    return res


def _differences(ref, got):
    out = []
    for key in sorted(ref):
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
        if got[key].tobytes() != ref[key].tobytes():
            out.append(f"{key} ({int(np.sum(got[key] != ref[key]))} of {ref[key].size} elements)")
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{threads: {key: array}} from one subprocess per thread count."""
    d = tmp_path_factory.mktemp("determinism")
    return {t: _run_worker(d / f"threads{t}.npz", t) for t in THREADS}


def test_every_case_computed(results):
    keys = results[1].keys()
    for kernel in KERNELS:
        assert any(k.startswith(kernel + "/") for k in keys), kernel
    assert len(keys) > 200
    for t in THREADS[1:]:
        assert results[t].keys() == keys


@pytest.mark.parametrize("kernel", KERNELS)
def test_bit_identical_for_1_to_4_threads(results, kernel):
    ref = {k: v for k, v in results[1].items() if k.startswith(kernel + "/")}
    assert ref
    for key, val in ref.items():
        assert np.isfinite(val).all(), key
    differing = [f"{t} threads: {d}" for t in THREADS[1:] for d in _differences(ref, results[t])]
    assert not differing, "results depend on the thread count:\n" + "\n".join(differing)


def test_fresh_compile_gives_the_cached_kernels_results(tmp_path):
    """A kernel just compiled and the same kernel loaded from Numba's cache compute the same bits.

    They are not the same machine code: the compiling process runs a parfor's
    gufunc as optimized on its own, a process loading the cache runs it as
    optimized again after linking into the kernel. Under fastmath, LLVM may
    then contract a multiply and an add into an FMA in one and not the other
    (AdamW's ``p * shrink - update`` did, with fastmath={"contract"}): the first
    run of a config would not reproduce the next ones. Here a private, empty
    cache directory: the first subprocess compiles (and writes the cache), the
    second loads. The kernels compiled with fastmath or vectorized element-wise
    loops: dense, loss, optimizer updates, float32 (the conv kernels do their
    arithmetic in the microkernel's explicit FMAs; they and float64 were
    checked the same way once: a cold compile of everything takes minutes).
    """
    groups = ("dense", "loss", "optim")
    cache = tmp_path / "numba_cache"
    cache.mkdir()
    fresh = _run_worker(tmp_path / "fresh.npz", 2, groups, ("float32",), NUMBA_CACHE_DIR=str(cache))
    assert any(cache.rglob("*.nbi")), "the first subprocess wrote no cache"
    cached = _run_worker(tmp_path / "cached.npz", 2, groups, ("float32",), NUMBA_CACHE_DIR=str(cache))
    assert fresh.keys() == cached.keys() and len(fresh) > 100
    differing = _differences(fresh, cached)
    assert not differing, "fresh compile and cache load differ:\n" + "\n".join(differing)
