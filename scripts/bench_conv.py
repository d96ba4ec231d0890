"""Time the conv kernels on the seed network's shapes.

Usage: python scripts/bench_conv.py [--threads 2] [--repeat 20] [--dtype float32] [--batch 64]
                                    [--only conv2] [--torch] [--cold]

Prints the median (and best) time and GFLOP/s (2*N*OH*OW*KH*KW*Cin*Cout per kernel) of
forward, backward-input and backward-weight for conv1 and conv2 of the seed
network, after one warm-up call (which also reports the first-call time:
compile, or load from Numba's cache). ``--cold`` compiles from scratch into a
temporary, empty NUMBA_CACHE_DIR (the project's cache is neither read nor
touched), so the first-call times are cold compile times.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

SHAPES = {
    # name: (N, H, W, Cin, Cout, K)
    "conv1": (64, 28, 28, 1, 32, 3),
    "conv2": (64, 13, 13, 32, 64, 3),
}


def _median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size of every shape")
    ap.add_argument("--only", default=None, help="comma-separated shape names (conv1,conv2)")
    ap.add_argument("--torch", action="store_true", help="also time torch's conv2d (NCHW) for comparison")
    ap.add_argument("--cold", action="store_true",
                    help="compile from scratch (a temporary, empty NUMBA_CACHE_DIR; the project's cache is untouched)")
    args = ap.parse_args()
    if args.cold:
        if "numba" in sys.modules:
            raise SystemExit("--cold must be set before numba is imported")
        cache = tempfile.mkdtemp(prefix="bench_conv_cold_")
        os.environ["NUMBA_CACHE_DIR"] = cache
        try:
            run(args)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    else:
        run(args)


def run(args):
    t0 = time.perf_counter()
    import numba

    import fastcnn  # noqa: F401  (before numba: keeps BLAS single-threaded, as the CLI does)
    from fastcnn.kernels import conv

    numba.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    first = True
    print(f"threads {args.threads}, dtype {dtype}, NUMBA_CPU_FEATURES "
          f"{'set' if os.environ.get('NUMBA_CPU_FEATURES') else 'unset'}"
          f"{', cold (empty cache)' if args.cold else ''}")
    for name, (N, H, W, Cin, Cout, K) in SHAPES.items():
        if args.only and name not in args.only.split(","):
            continue
        if args.batch:
            N = args.batch
        x = rng.standard_normal((N, H, W, Cin)).astype(dtype)
        w = rng.standard_normal((K, K, Cin, Cout)).astype(dtype)
        b = rng.standard_normal(Cout).astype(dtype)
        OH, OW = H - K + 1, W - K + 1
        y = np.empty((N, OH, OW, Cout), dtype)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = np.empty_like(x)
        dw = np.empty_like(w)
        db = np.empty_like(b)
        flops = 2.0 * N * OH * OW * K * K * Cin * Cout
        calls = {
            "forward": lambda: conv.conv2d_forward(x, w, b, y, 1, 1, 0, 0, 1, 1),
            "backward_input": lambda: conv.conv2d_backward_input(dy, w, dx, 1, 1, 0, 0, 1, 1),
            "backward_weight": lambda: conv.conv2d_backward_weight(x, dy, dw, db, 1, 1, 0, 0, 1, 1),
        }
        for kname, fn in calls.items():
            t1 = time.perf_counter()
            fn()
            warm = time.perf_counter() - t1
            if first:
                print(f"import + first call: {time.perf_counter() - t0:.2f} s")
                first = False
            fn()
            t, tmin = _median_time(fn, args.repeat)
            print(f"{name} {kname:16s} median {t * 1e3:7.3f} ms {flops / t / 1e9:6.1f} GFLOP/s | "
                  f"best {tmin * 1e3:7.3f} ms {flops / tmin / 1e9:6.1f} GFLOP/s  (first call {warm:.2f} s)")
        if args.torch:
            import torch

            torch.set_num_threads(args.threads)
            xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
            wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
            bt = torch.from_numpy(b).requires_grad_(True)
            dyt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous()

            def tf():
                with torch.no_grad():
                    torch.nn.functional.conv2d(xt, wt, bt)

            def tfb():
                out = torch.nn.functional.conv2d(xt, wt, bt)
                out.backward(dyt)

            tf()
            tfb()
            t, tmin = _median_time(tf, args.repeat)
            print(f"{name} torch forward           median {t * 1e3:7.3f} ms {flops / t / 1e9:6.1f} GFLOP/s | "
                  f"best {tmin * 1e3:7.3f} ms {flops / tmin / 1e9:6.1f} GFLOP/s")
            t, tmin = _median_time(tfb, args.repeat)
            print(f"{name} torch fwd+bwd (3 ops)   median {t * 1e3:7.3f} ms {3 * flops / t / 1e9:6.1f} GFLOP/s | "
                  f"best {tmin * 1e3:7.3f} ms {3 * flops / tmin / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
