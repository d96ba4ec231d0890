"""Convolution kernels of another tree against this tree's, in one process, calls alternated.

Usage:
    git archive <commit> | tar -x -C /tmp/base
    python scripts/bench_conv_ab.py --base /tmp/base --pass weight 128x32x32x16x16x3,128x16x16x128x128x1

Each shape is ``NxHxWxCINxCOUTxK[xSTRIDE]`` (square K x K kernel, padding K // 2, stride 1 unless
given). ``--pass`` picks the kernel: ``forward``, ``input`` (input gradient) or ``weight`` (weight and
bias gradient). The base tree's fastcnn/kernels/conv.py is loaded as a second module beside this
tree's (both share this tree's gemm), both are called on the same random float32 arrays, one call
of each in turn for ``--rounds`` rounds, and the medians are printed with the ratio base/this
(above 1: this tree is faster) and whether the outputs are bit-identical. On a machine shared with
other jobs, alternating the calls in one process is what keeps the two comparable: a slow period
hits both.

``--epilogue relu`` or ``residual-relu`` (forward only) times the forward with its fused epilogue (ReLU,
or a residual branch added then ReLU), as conv + ReLU layers and residual blocks run it.

``--chunks G`` times what a training step runs instead: the pass on each of G chunks of the batch in
turn (the layers compute every batch sum per chunk, fastcnn/shard.py; G = 8 for batches of 8 or
more), with the caches flushed (a 64 MiB write) before each timed call, as the layer finds them
after the rest of the step.
"""
import argparse
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def parse_shape(text):
    """'NxHxWxCINxCOUTxK[xSTRIDE]' -> (N, H, W, Cin, Cout, K, stride)."""
    parts = [int(v) for v in text.split("x")]
    if len(parts) not in (6, 7) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: want NxHxWxCINxCOUTxK[xSTRIDE], positive integers")
    return tuple(parts) if len(parts) == 7 else (*parts, 1)


def load_base_conv(base):
    """The base tree's conv.py as a module of its own. Loaded from a private temporary copy: Numba
    caches its kernels beside the file they come from, and a cache written by a module loaded this
    way would break the base tree's own later runs."""
    path = os.path.join(base, "fastcnn", "kernels", "conv.py")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --base {base}: no fastcnn/kernels/conv.py there")
    private = tempfile.mkdtemp(prefix="bench_conv_ab_")
    atexit.register(shutil.rmtree, private, True)
    copy = os.path.join(private, "fastcnn_base_conv.py")
    shutil.copyfile(path, copy)
    spec = importlib.util.spec_from_file_location("fastcnn_base_conv", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastcnn_base_conv"] = module
    spec.loader.exec_module(module)
    return module


def kernel_call(module, which, x, w, b, dy, outputs, geometry, chunks=1, epilogue="none", residual=None):
    """A no-argument call of ``module``'s kernel for ``which``, writing into ``outputs``; with
    ``chunks`` > 1, one call per chunk of the batch in turn (outputs of the last chunk). ``epilogue``
    (forward): "none", "relu" or "residual-relu" (``residual``, y's shape, added before the ReLU)."""
    y, dx, dw, db = outputs

    def fused(s):
        return {"none": {}, "relu": {"relu": True}, "residual-relu": {"relu": True, "residual": residual[s]}}[epilogue]

    one = {"forward": lambda s: module.conv2d_forward(x[s], w, b, y[s], *geometry, **fused(s)),
           "input": lambda s: module.conv2d_backward_input(dy[s], w, dx[s], *geometry),
           "weight": lambda s: module.conv2d_backward_weight(x[s], dy[s], dw, db, *geometry)}[which]
    n = x.shape[0]
    parts = [slice(c * n // chunks, (c + 1) * n // chunks) for c in range(chunks)]

    def call():
        for s in parts:
            one(s)

    return call


def compare(base_conv, this_conv, shape, which, rounds, seed=0, chunks=1, epilogue="none"):
    """{'base_ms', 'this_ms', 'gflops_base', 'gflops_this', 'identical'} for one shape; ``chunks`` > 1:
    the pass per chunk of the batch, caches flushed before each timed call."""
    N, H, W, Cin, Cout, K, stride = shape
    pad = K // 2
    OH = (H + 2 * pad - K) // stride + 1
    OW = (W + 2 * pad - K) // stride + 1
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H, W, Cin), dtype=np.float32)
    w = rng.standard_normal((K, K, Cin, Cout), dtype=np.float32) / np.float32(np.sqrt(K * K * Cin))
    b = rng.standard_normal(Cout, dtype=np.float32)
    dy = rng.standard_normal((N, OH, OW, Cout), dtype=np.float32)
    residual = rng.standard_normal((N, OH, OW, Cout), dtype=np.float32)
    geometry = (stride, stride, pad, pad, 1, 1)
    outs = {}
    calls = {}
    for name, module in (("base", base_conv), ("this", this_conv)):
        outs[name] = (np.zeros((N, OH, OW, Cout), np.float32), np.zeros_like(x), np.zeros_like(w),
                      np.zeros(Cout, np.float32))
        calls[name] = kernel_call(module, which, x, w, b, dy, outs[name], geometry, chunks, epilogue, residual)
    for _ in range(2):  # compile or load, then warm the caches
        calls["base"]()
        calls["this"]()
    flush = np.zeros(64 << 20 if chunks > 1 else 0, np.uint8)
    times = {"base": [], "this": []}
    for _ in range(rounds):
        for name in ("base", "this"):
            flush[::64] += 1  # one write per cache line: evicts x, dy and the outputs
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    picked = {"forward": (0,), "input": (1,), "weight": (2, 3)}[which]
    identical = all(np.array_equal(outs["base"][i], outs["this"][i]) for i in picked)
    flops = 2.0 * N * OH * OW * K * K * Cin * Cout
    base_ms = float(np.median(times["base"])) * 1e3
    this_ms = float(np.median(times["this"])) * 1e3
    return {"base_ms": base_ms, "this_ms": this_ms, "gflops_base": flops / base_ms / 1e6,
            "gflops_this": flops / this_ms / 1e6, "identical": identical}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", help="comma-separated NxHxWxCINxCOUTxK[xSTRIDE]")
    ap.add_argument("--base", required=True, help="root of the other tree (e.g. a git archive of a commit)")
    ap.add_argument("--pass", dest="which", choices=("forward", "input", "weight"), default="weight")
    ap.add_argument("--rounds", type=int, default=21, help="alternated calls of each (median)")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    ap.add_argument("--chunks", type=int, default=1,
                    help="call the pass on this many chunks of the batch in turn, caches flushed (a step's way)")
    ap.add_argument("--epilogue", choices=("none", "relu", "residual-relu"), default="none",
                    help="forward only: with the fused ReLU, or residual add then ReLU")
    args = ap.parse_args(argv)
    if args.epilogue != "none" and args.which != "forward":
        ap.error(f"--epilogue {args.epilogue}: only with --pass forward")
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    from fastcnn.kernels import conv as this_conv

    base_conv = load_base_conv(args.base)
    if not 1 <= args.chunks <= min(shape[0] for shape in shapes):
        ap.error(f"--chunks {args.chunks}: want 1 to the smallest batch of the shapes")
    chunked = f", {args.chunks} chunks per call, caches flushed" if args.chunks > 1 else ""
    fused = f" with the {args.epilogue} epilogue" if args.epilogue != "none" else ""
    print(f"{args.which} pass{fused}, {numba.get_num_threads()} thread(s), median of {args.rounds} alternated calls"
          f"{chunked}")
    print(f"{'shape':>24} {'base ms':>9} {'GFLOP/s':>8} {'this ms':>9} {'GFLOP/s':>8} {'base/this':>9}  same bits")
    for shape in shapes:
        r = compare(base_conv, this_conv, shape, args.which, args.rounds, chunks=args.chunks, epilogue=args.epilogue)
        label = "x".join(map(str, shape))
        print(f"{label:>24} {r['base_ms']:9.3f} {r['gflops_base']:8.1f} {r['this_ms']:9.3f} {r['gflops_this']:8.1f} "
              f"{r['base_ms'] / r['this_ms']:8.2f}x  {'yes' if r['identical'] else 'no'}", flush=True)


if __name__ == "__main__":
    main()
