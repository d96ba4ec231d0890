"""The convolution kernels of another tree against this tree's, each tree in processes of its own.

Usage:
    git archive <commit> | tar -x -C /tmp/base
    python scripts/ab_kernels.py /tmp/base [--rounds 4] [--threads 2] [--passes fwd,inp,wgt] [--cases a,b]

Where scripts/bench_conv_ab.py loads the base tree's conv.py beside this tree's in one process (both
then share this tree's GEMM), this script runs each tree in a process of its own (PYTHONPATH=TREE),
so a change to fastcnn/kernels/gemm.py is measured too. The processes alternate, base first in even
rounds and this tree first in odd ones; each process times every selected case and pass (the median
of --reps calls; the weight gradient as a training step runs it, on each of the 8 chunks of the
batch in turn) and hashes the outputs of one call. The table gives the median over the rounds per
tree, GFLOP/s, the ratio base/this (above 1: this tree is faster), and whether both trees' outputs
were bit-identical.

The cases (CASES) are the layers of the benchmark suite's networks (scripts/bench_vs_torch.py
--suite) and a few more: ResNet-20's 3x3 layers, VGG and all-conv CIFAR 3x3 layers with stride 1 and
2, odd filter counts and kernels (5x5, 3x5), first layers on 1 or 3 channels, 1x1 layers, narrow
layers (8 to 37 channels).
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

# name: (N, H, W, Cin, KH, KW, Cout, stride, (pad_top, pad_left)); bottom/right padding as top/left.
CASES = {
    "resnet_32x32x16": (128, 32, 32, 16, 3, 3, 16, 1, (1, 1)),
    "resnet_16x16x32": (128, 16, 16, 32, 3, 3, 32, 1, (1, 1)),
    "resnet_8x8x64": (128, 8, 8, 64, 3, 3, 64, 1, (1, 1)),
    "resnet_32x32x16_to_32_s2": (128, 32, 32, 16, 3, 3, 32, 2, (1, 1)),
    "vgg_32x32x64": (128, 32, 32, 64, 3, 3, 64, 1, (1, 1)),
    "allconv_16x16x64_to_128": (128, 16, 16, 64, 3, 3, 128, 1, (1, 1)),
    "vgg_16x16x128": (128, 16, 16, 128, 3, 3, 128, 1, (1, 1)),
    "allconv_8x8x128": (128, 8, 8, 128, 3, 3, 128, 1, (1, 1)),
    "vgg_8x8x256": (128, 8, 8, 256, 3, 3, 256, 1, (1, 1)),
    "allconv_32x32x64_s2": (128, 32, 32, 64, 3, 3, 64, 2, (1, 1)),
    "allconv_16x16x128_s2": (128, 16, 16, 128, 3, 3, 128, 2, (1, 1)),
    "odd_28x28x10_to_24_5x5": (128, 28, 28, 10, 5, 5, 24, 1, (2, 2)),
    "odd_14x14x24_to_48": (128, 14, 14, 24, 3, 3, 48, 1, (1, 1)),
    "odd_7x7x48_to_100_3x5": (128, 7, 7, 48, 3, 5, 100, 1, (1, 2)),
    "first_32x32x3_to_16": (128, 32, 32, 3, 3, 3, 16, 1, (1, 1)),
    "first_32x32x3_to_64": (128, 32, 32, 3, 3, 3, 64, 1, (1, 1)),
    "pointwise_16x16x128": (128, 16, 16, 128, 1, 1, 128, 1, (0, 0)),
    "pointwise_8x8x256": (128, 8, 8, 256, 1, 1, 256, 1, (0, 0)),
    "pointwise_32x32x64": (128, 32, 32, 64, 1, 1, 64, 1, (0, 0)),
    "lenet_14x14x6_to_16_5x5": (256, 14, 14, 6, 5, 5, 16, 1, (0, 0)),
    "mnist_28x28x1_to_32": (64, 28, 28, 1, 3, 3, 32, 1, (0, 0)),
    "mnist_13x13x32_to_64": (64, 13, 13, 32, 3, 3, 64, 1, (0, 0)),
    "narrow_28x28x8": (128, 28, 28, 8, 3, 3, 8, 1, (1, 1)),
    "narrow_14x14x12": (128, 14, 14, 12, 3, 3, 12, 1, (1, 1)),
    "narrow_15x15x13_to_37": (48, 15, 15, 13, 3, 3, 37, 1, (1, 1)),
}
PASSES = ("fwd", "inp", "wgt")
CHUNKS = 8  # the weight gradient runs per chunk of the batch (fastcnn/shard.py GRAD_CHUNKS), at most one per image


def worker(cases, passes, reps, batch=None):
    """Time the cases in this process (fastcnn from PYTHONPATH), at their batch or ``batch``; print one
    JSON line {case:pass: [median ms, flops, sha256 of the outputs]}."""
    import numpy as np

    from fastcnn.kernels import conv

    rng = np.random.default_rng(0)
    out = {}
    for name in cases:
        N, H, W, C, KH, KW, Co, s, (pt, pl) = CASES[name]
        N = batch or N
        OH = (H + 2 * pt - KH) // s + 1
        OW = (W + 2 * pl - KW) // s + 1
        x = rng.standard_normal((N, H, W, C), dtype=np.float32)
        dy = rng.standard_normal((N, OH, OW, Co), dtype=np.float32)
        w = rng.standard_normal((KH, KW, C, Co), dtype=np.float32)
        b = rng.standard_normal(Co, dtype=np.float32)
        dx, y = np.empty_like(x), np.empty_like(dy)
        G = min(CHUNKS, N)
        dws = np.empty((G,) + w.shape, np.float32)
        dbs = np.empty((G, Co), np.float32)

        def weight():
            for c in range(G):
                sl = slice(c * N // G, (c + 1) * N // G)
                conv.conv2d_backward_weight(x[sl], dy[sl], dws[c], dbs[c], s, s, pt, pl, 1, 1)

        calls = {"fwd": (lambda: conv.conv2d_forward(x, w, b, y, s, s, pt, pl, 1, 1), (y,)),
                 "inp": (lambda: conv.conv2d_backward_input(dy, w, dx, s, s, pt, pl, 1, 1), (dx,)),
                 "wgt": (weight, (dws, dbs))}
        for p in passes:
            fn, outputs = calls[p]
            fn()
            digest = hashlib.sha256(b"".join(a.tobytes() for a in outputs)).hexdigest()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[f"{name}:{p}"] = [float(np.median(times) * 1e3), 2 * N * OH * OW * KH * KW * C * Co, digest]
    print(json.dumps(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", nargs="?", help="the other tree (a directory holding fastcnn/)")
    ap.add_argument("--rounds", type=int, default=4, help="processes per tree, alternated (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="NUMBA_NUM_THREADS of the runs (default 2)")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per case and pass in a process (default 7)")
    ap.add_argument("--passes", default=",".join(PASSES), help="fwd, inp (input gradient), wgt (weight gradient)")
    ap.add_argument("--cases", default="", help="comma-separated names from CASES (default: all)")
    ap.add_argument("--batch", type=int, default=0, help="batch size of every case (default: the case's)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c] or list(CASES)
    passes = [p for p in args.passes.split(",") if p]
    bad = [c for c in cases if c not in CASES] + [p for p in passes if p not in PASSES]
    if bad:
        ap.error(f"unknown case or pass: {', '.join(bad)} (cases: {', '.join(CASES)}; passes: {', '.join(PASSES)})")
    if args.rounds < 1 or args.reps < 1 or args.threads < 1 or args.batch < 0:
        ap.error("--rounds, --reps and --threads must be at least 1, --batch at least 0")
    if args.worker:
        worker(cases, passes, args.reps, args.batch)
        return 0
    if args.base is None:
        ap.error("the base tree is missing")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.abspath(args.base)
    if not os.path.isfile(os.path.join(base, "fastcnn", "kernels", "conv.py")):
        print(f"scripts/ab_kernels.py: {base}: no fastcnn/kernels/conv.py there", file=sys.stderr)
        return 2
    results = {base: {}, here: {}}
    for r in range(args.rounds):
        for tree in ((base, here) if r % 2 == 0 else (here, base)):
            env = dict(os.environ, PYTHONPATH=tree, NUMBA_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--cases", ",".join(cases),
                   "--passes", ",".join(passes), "--reps", str(args.reps), "--batch", str(args.batch)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
            if proc.returncode != 0:
                print(f"scripts/ab_kernels.py: the run in {tree} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            for key, val in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                results[tree].setdefault(key, []).append(val)
    print(f"base {base} against this tree {here}: {args.threads} thread(s), {args.rounds} round(s), "
          "medians in ms")
    print(f"{'case:pass':44s} {'base ms':>9s} {'this ms':>9s} {'GF/s base':>9s} {'GF/s this':>9s} "
          f"{'base/this':>9s}  bits")
    for key, runs in results[base].items():
        b = statistics.median(v[0] for v in runs)
        t = statistics.median(v[0] for v in results[here][key])
        flops = runs[0][1]
        same = {v[2] for v in runs} == {v[2] for v in results[here][key]}
        print(f"{key:44s} {b:9.2f} {t:9.2f} {flops / b / 1e6:9.1f} {flops / t / 1e6:9.1f} {b / t:9.2f}  "
              f"{'same' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
