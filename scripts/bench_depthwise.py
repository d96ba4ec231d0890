"""Time depthwise 3x3 convolutions (MobileNet-style, CIFAR-sized): fastcnn against PyTorch channels_last.

Usage: python scripts/bench_depthwise.py [--threads 2] [--rounds 3] [--repeat 15] [--batch 64,128]
                                         [--only 32x32x32s1,...] [--multiplier 1] [--json]

Shapes: 32x32x32, 16x16x64, 8x8x128 and 4x4x256 (H x W x C), kernel 3x3, padding 1, stride 1 and 2,
no bias (a batch norm follows in a MobileNet block), batch 64 and 128. Per shape: ``forward`` (training
mode: PyTorch with autograd recording) and ``backward`` (input and weight gradients: fastcnn's
``Conv2D.backward``, PyTorch's ``y.backward(g)``; the forward before each backward is not timed).

Each framework runs in its own process (``--worker fastcnn|torch``, which prints one ``RESULT {json}``
line), the two alternated ``--rounds`` times so that a change in the machine's load hits both; a worker
times each case ``--repeat`` times after two warm-up calls and reports the median. The table gives, per
case, the median over the rounds of those medians and the ratio PyTorch time / fastcnn time (above 1:
fastcnn is faster). PyTorch gets NCHW tensors stored channels_last, made contiguous in that format
(``.contiguous(memory_format=torch.channels_last)``), which is the layout its NHWC kernels want and the
one fastcnn's NHWC arrays have.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (H, W, C, stride)
SHAPES = {f"{h}x{h}x{c}s{s}": (h, h, c, s) for h, c in ((32, 32), (16, 64), (8, 128), (4, 256)) for s in (1, 2)}
PASSES = ("forward", "backward")


def _median_ms(fn, repeat, setup=None):
    """Median wall time of fn() in ms over ``repeat`` calls (after two warm-up calls); ``setup()``, if
    given, runs untimed before each call."""
    times = []
    for i in range(repeat + 2):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _cases(args):
    names = args.only.split(",") if args.only else list(SHAPES)
    for name in names:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    for batch in (int(b) for b in args.batch.split(",")):
        for name in names:
            yield batch, name, SHAPES[name]


def worker_fastcnn(args):
    from fastcnn.layers import Conv2D
    from fastcnn.runtime import set_threads

    set_threads(args.threads, "--threads")
    rng = np.random.default_rng(0)
    out = {}
    for batch, name, (h, w, c, s) in _cases(args):
        layer = Conv2D(c * args.multiplier, 3, stride=s, padding=1, groups=c, bias=False)
        layer.build((h, w, c), rng, np.float32)
        x = rng.standard_normal((batch, h, w, c)).astype(np.float32)
        y = layer.forward(x, training=True)
        g = rng.standard_normal(y.shape).astype(np.float32)
        out[f"{batch}/{name}/forward"] = _median_ms(lambda: layer.forward(x, training=True), args.repeat)
        out[f"{batch}/{name}/backward"] = _median_ms(lambda: layer.backward(g), args.repeat,
                                                     setup=lambda: layer.forward(x, training=True))
    return out


def worker_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last
    out = {}
    for batch, name, (h, w, c, s) in _cases(args):
        mod = torch.nn.Conv2d(c, c * args.multiplier, 3, stride=s, padding=1, groups=c, bias=False)
        mod = mod.to(memory_format=cl)
        x = torch.randn(batch, c, h, w).contiguous(memory_format=cl).requires_grad_(True)
        y = mod(x)
        g = torch.randn(y.shape).contiguous(memory_format=cl)

        state = {}

        def forward():
            state["y"] = mod(x)

        def setup():
            x.grad = None
            mod.weight.grad = None
            forward()

        out[f"{batch}/{name}/forward"] = _median_ms(forward, args.repeat)
        out[f"{batch}/{name}/backward"] = _median_ms(lambda: state["y"].backward(g), args.repeat, setup=setup)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--batch", default="64,128", help="comma-separated batch sizes")
    ap.add_argument("--only", default=None, help=f"comma-separated shapes ({', '.join(SHAPES)})")
    ap.add_argument("--multiplier", type=int, default=1, help="channel multiplier (filters = multiplier * C)")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    ap.add_argument("--worker", choices=("fastcnn", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = (worker_fastcnn if args.worker == "fastcnn" else worker_torch)(args)
        print("RESULT " + json.dumps(result))
        return
    passthrough = ["--threads", str(args.threads), "--repeat", str(args.repeat), "--batch", args.batch,
                   "--multiplier", str(args.multiplier)] + (["--only", args.only] if args.only else [])
    runs = {"fastcnn": [], "torch": []}
    for r in range(args.rounds):
        for fw in (("fastcnn", "torch") if r % 2 == 0 else ("torch", "fastcnn")):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", fw, *passthrough],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{fw} worker failed:\n{proc.stderr[-4000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            runs[fw].append(json.loads(line[len("RESULT "):]))
            print(f"round {r + 1}/{args.rounds}: {fw} done", file=sys.stderr)
    rows = []
    for key in runs["fastcnn"][0]:
        f = float(np.median([run[key] for run in runs["fastcnn"]]))
        t = float(np.median([run[key] for run in runs["torch"]]))
        batch, name, what = key.split("/")
        rows.append({"batch": int(batch), "shape": name, "pass": what, "fastcnn_ms": f, "torch_ms": t,
                     "ratio": t / f})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    import torch

    print(f"depthwise 3x3, padding 1, no bias, channel multiplier {args.multiplier}, float32, {args.threads} "
          f"threads; medians over {args.rounds} rounds of {args.repeat} calls; torch {torch.__version__} "
          f"channels_last")
    print(f"{'batch':>5} {'shape':<12} {'pass':<9} {'fastcnn ms':>11} {'torch ms':>9} {'torch/fastcnn':>14}")
    for r in rows:
        print(f"{r['batch']:>5} {r['shape']:<12} {r['pass']:<9} {r['fastcnn_ms']:>11.3f} {r['torch_ms']:>9.3f} "
              f"{r['ratio']:>13.2f}x")
    for what in PASSES:
        ratios = [r["ratio"] for r in rows if r["pass"] == what]
        total_f = sum(r["fastcnn_ms"] for r in rows if r["pass"] == what)
        total_t = sum(r["torch_ms"] for r in rows if r["pass"] == what)
        print(f"{what}: geometric mean of the ratios {float(np.exp(np.mean(np.log(ratios)))):.2f}x, "
              f"total time {total_f:.1f} ms (fastcnn) vs {total_t:.1f} ms (torch)")


if __name__ == "__main__":
    main()
