"""Inference speed: fastcnn's ``model.forward(x, training=False)`` against onnxruntime running the model's
ONNX export (``fastcnn.export_onnx``), same weights, same batch, same thread count.

Usage (from the repository root, with the venv's python; needs pip install '.[onnx]'):

    python scripts/bench_onnx.py                       # configs/mnist.yaml and configs/resnet20_cifar10.yaml
    python scripts/bench_onnx.py --config configs/mobilenet_cifar10.yaml --batch 64 --threads 1
    python scripts/bench_onnx.py --json bench_onnx.json

Method. Per config, each framework runs in its own fresh subprocess (this script with
``--worker fastcnn|onnxruntime``), alternating fastcnn, onnxruntime, fastcnn, ... for ``--rounds``
rounds, so that neither's thread pool spins beside the other and slow drifts of the machine hit both.
A worker builds the config's network (``fastcnn.build_model(cfg.model, seed)``: the weights are the
initialization, which does not change the work), draws a float32 NHWC batch of ``--batch`` images
from a fixed seed, runs ``--warmup`` untimed calls (fastcnn's first call loads or compiles its
kernels, onnxruntime's plans its buffers) and times ``--repeat`` calls one by one; a round's figure is
the median call. The table shows the median over rounds, images/s and the ratio onnxruntime time /
fastcnn time (above 1: fastcnn is faster).

Threads: ``--threads`` (default 2) for both: ``numba.set_num_threads`` for fastcnn (its BLAS stays at
1 thread, as always); onnxruntime's ``intra_op_num_threads`` (inter-op 1, sequential execution, all
graph optimizations: onnxruntime fuses batch norm into the convolutions, fastcnn does not).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vs_torch import _time_steps  # noqa: E402  (warm-up calls, then the time of each call)

DEFAULT_CONFIGS = ["configs/mnist.yaml", "configs/resnet20_cifar10.yaml"]
FRAMEWORKS = ("fastcnn", "onnxruntime")


def run_worker(args):
    import numpy as np

    import fastcnn
    from fastcnn.runtime import set_threads

    cfg = fastcnn.load_config(args.config)
    model = fastcnn.build_model(cfg.model, seed=cfg.seed)
    x = np.random.default_rng(0).standard_normal((args.batch, *cfg.model.input_shape)).astype(np.float32)
    if args.worker == "fastcnn":
        set_threads(args.threads, key="--threads")
        fn = lambda: model.forward(x, training=False)  # noqa: E731
    else:
        import onnxruntime as ort

        from fastcnn.onnx_export import build_onnx

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(build_onnx(model).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
        fn = lambda: sess.run(["logits"], {"input": x})  # noqa: E731
    times = _time_steps(fn, args.warmup, args.repeat)
    median = statistics.median(times)
    print("RESULT " + json.dumps({"framework": args.worker, "config": args.config, "batch": args.batch,
                                  "threads": args.threads, "call_ms": [t * 1e3 for t in times],
                                  "median_ms": median * 1e3, "images_per_sec": args.batch / median}))


def _worker(framework, config, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--config", config,
           "--batch", str(args.batch), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--repeat", str(args.repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{framework} worker failed for {config}:\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help=f"network config (repeatable; default: {' and '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--batch", type=int, default=256, help="images per call (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both frameworks (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating fastcnn/onnxruntime rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per worker (default 3)")
    ap.add_argument("--repeat", type=int, default=10, help="timed calls per worker (default 10)")
    ap.add_argument("--json", dest="json_out", default=None, help="write every raw number to this file")
    ap.add_argument("--worker", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.config = (args.config or DEFAULT_CONFIGS)[0]
        run_worker(args)
        return 0

    results = []
    rows = []
    for config in args.config or DEFAULT_CONFIGS:
        runs = {fw: [] for fw in FRAMEWORKS}
        for r in range(args.rounds):
            for fw in FRAMEWORKS:
                res = _worker(fw, config, args)
                runs[fw].append(res["median_ms"])
                results.append({**res, "round": r})
                print(f"  {config} round {r + 1}/{args.rounds} {fw}: {res['median_ms']:.2f} ms", file=sys.stderr)
        ms = {fw: statistics.median(runs[fw]) for fw in FRAMEWORKS}
        rows.append((config, ms["fastcnn"], ms["onnxruntime"]))
    print(f"inference, batch {args.batch}, {args.threads} threads each, median of {args.rounds} rounds "
          f"(each the median of {args.repeat} calls)")
    print(f"{'config':<34} {'fastcnn ms':>11} {'img/s':>8} {'onnxruntime ms':>15} {'img/s':>8} {'ort/fastcnn':>12}")
    for config, f, o in rows:
        print(f"{config:<34} {f:>11.2f} {args.batch / f * 1e3:>8.0f} {o:>15.2f} {args.batch / o * 1e3:>8.0f} "
              f"{o / f:>12.2f}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"batch": args.batch, "threads": args.threads, "rounds": args.rounds, "runs": results,
                       "table": [{"config": c, "fastcnn_ms": f, "onnxruntime_ms": o} for c, f, o in rows]}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
