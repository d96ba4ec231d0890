"""Training-step throughput, fastcnn vs PyTorch, side by side.

Usage (from the repository root, with the venv's python):

    python scripts/bench_vs_torch.py                          # both MNIST configs, batches 32,64,128,256
    python scripts/bench_vs_torch.py --config configs/mnist.yaml --batch-sizes 64 --rounds 5
    python scripts/bench_vs_torch.py --torch-layout both      # torch channels_last and NCHW
    python scripts/bench_vs_torch.py --threads-sweep          # also fastcnn's step on 1, 2, ... threads
    python scripts/bench_vs_torch.py --json bench_vs_torch.json
    python scripts/bench_vs_torch.py --suite --threads 2 --json suite.json   # the benchmark suite
    python scripts/bench_vs_torch.py --suite --only lenet5,vgg_cifar        # some of its networks

Method. For every (network config, batch size) each framework runs in its own
fresh subprocess (this script with ``--worker fastcnn|torch``), alternating
fastcnn, torch, fastcnn, torch ... for ``--rounds`` rounds, so that neither
framework's thread pool, allocator or caches can influence the other and slow
drifts of the machine hit both alike. Each worker builds the network of the
config (``fastcnn.build_model(cfg.model, seed)``; torch gets the very same
weights through ``fastcnn.torch_reference.torch_model``), draws random inputs
and labels from a fixed seed, builds the config's optimizer (Adam, lr 1e-3 for
the MNIST configs) and runs ``--warmup`` untimed steps, then times ``--steps``
steps of forward + softmax cross-entropy + backward + optimizer step, one by
one. A round's figure is ``batch / median step time``; the table shows the
median over rounds. Inference (evaluation mode, no gradients) is timed the
same way at batch ``--infer-batch`` (256).

Suite (``--suite``). The networks of ``SUITE`` (the shipped MNIST, ResNet-20
and MobileNet configs, then every ``configs/bench/*.yaml``), each at its
config's ``data.batch_size`` unless ``--batch-sizes`` is given. Workers then
time at most ``--steps`` steps and stop once ``--max-seconds`` (default 2 s in
the suite) of timed steps have run (at least 3). The matrix-multiply peak is
measured once per run, in its own process with the same thread count: the best
float32 rate of NumPy's BLAS matmul (with ``--threads`` BLAS threads) and of
fastcnn's GEMM microkernel (run as a 1x1 convolution, a plain matrix product)
on square matrices of ``--peak-sizes``. Then, once per network, a worker runs
``fastcnn.bench.run_bench`` (what ``fastcnn bench --json`` reports) for the
per-layer forward/backward times, GFLOP/s and % of that peak.

Threads: ``--threads`` (default: all cores this process may use) is given to
both: ``numba.set_num_threads`` for fastcnn; ``torch.set_num_threads`` plus
OMP_NUM_THREADS / MKL_NUM_THREADS in the environment of torch's process.
fastcnn keeps its BLAS single-threaded as its CLI does.

Worker mode (one measurement, prints one line ``RESULT {json}``):

    python scripts/bench_vs_torch.py --worker fastcnn --config configs/mnist.yaml --batch 64 --steps 50
    python scripts/bench_vs_torch.py --worker layers --config configs/mnist.yaml --batch 64 --peak-gflops 200
    python scripts/bench_vs_torch.py --worker peak --threads 2 --peak-sizes 1024,2048
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_CONFIGS = ["configs/mnist.yaml", "configs/mnist_bn.yaml"]
# The benchmark suite: these shipped configs, then every configs/bench/*.yaml (sorted).
SUITE_SHIPPED = ["configs/mnist.yaml", "configs/mnist_bn.yaml", "configs/resnet20_cifar10.yaml",
                 "configs/mobilenet_cifar10.yaml"]
SUITE_DIR = "configs/bench"
RESULT_PREFIX = "RESULT "
NOISY_SPREAD = 1.15  # max/min over rounds above this: flagged as noisy


from fastcnn.bench import cpu_name  # noqa: E402


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------- worker side

def _time_steps(fn, warmup, steps, max_seconds=None):
    """Step times: ``steps`` of them, or fewer (at least 3) once ``max_seconds`` of them have run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if max_seconds is not None and len(times) >= 3 and sum(times) >= max_seconds:
            break
    return times


def _fastcnn_worker(cfg, args, x, labels):
    from fastcnn.bench import training_step
    from fastcnn.model import build_model
    from fastcnn.optim import build_optimizer
    from fastcnn.runtime import set_threads, warm_up

    threads = set_threads(args.threads)
    warm_up(cfg.model, log=lambda msg: print(msg, file=sys.stderr))  # compile/load kernels: never timed
    model = build_model(cfg.model, seed=cfg.seed)
    if args.mode == "train":
        fn = training_step(model, build_optimizer(cfg.train.optimizer, model.parameters()), x, labels)
    else:
        def fn():
            model.forward(x, training=False)

    import numba

    return fn, {"threads": threads, "numba": numba.__version__}


def _torch_worker(cfg, args, x, labels):
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed (pip install torch==2.13.0)", file=sys.stderr)
        sys.exit(3)
    from fastcnn.model import build_model
    from fastcnn.optim import torch_optimizer
    from fastcnn.torch_reference import to_torch_input, torch_model

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    channels_last = args.layout == "channels_last"
    model = build_model(cfg.model, seed=cfg.seed)  # the same weights as fastcnn's worker
    net = torch_model(model, torch, channels_last=channels_last)
    tx = to_torch_input(x, torch, channels_last=channels_last)
    tx = tx.contiguous(memory_format=torch.channels_last) if channels_last else tx.contiguous()
    ty = torch.from_numpy(labels)
    if args.mode == "train":
        net.train()
        opt = torch_optimizer(torch, net.parameters(), cfg.train.optimizer)
        cross_entropy = torch.nn.functional.cross_entropy

        def fn():
            opt.zero_grad(set_to_none=True)
            loss = cross_entropy(net(tx), ty)
            loss.backward()
            opt.step()
    else:
        net.eval()

        def fn():
            with torch.no_grad():
                net(tx)

    return fn, {"threads": torch.get_num_threads(), "torch": torch.__version__,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _layers_worker(args):
    """Per-layer figures of ``fastcnn bench`` (no torch), against the peak measured by the driver."""
    from fastcnn.bench import run_bench

    peak = (args.peak_gflops, args.peak_source) if args.peak_gflops else None
    report = run_bench(args.config, batch_size=args.batch, threads=args.threads, repeats=args.layer_repeats,
                       log=lambda msg: print(msg, file=sys.stderr), peak=peak)
    from fastcnn.config import load_config
    from fastcnn.model import build_model

    blocks = build_model(load_config(args.config).model, seed=0).blocks  # the rows, in order: their labels
    for row, block in zip(report["layers"], blocks):
        row["label"] = " + ".join(part.describe() for part in getattr(block, "layers", (block,)))
    print(RESULT_PREFIX + json.dumps({"framework": "fastcnn", "mode": "layers", "config": args.config,
                                      "batch": args.batch, "pid": os.getpid(), **report}), flush=True)


def measure_peak(threads, sizes, repeats=3):
    """Float32 matrix-product rates on square (s, s) @ (s, s), s in ``sizes``: {source: GFLOP/s}.

    NumPy's matmul (its BLAS threads come from the environment: the driver sets them to
    ``threads``) and fastcnn's GEMM microkernel, driven as a 1x1 convolution of
    (1, s/64, 64, s) by (1, 1, s, s), which is that matrix product, on ``threads`` Numba threads.
    """
    import numpy as np

    from fastcnn.bench import _median_ms
    from fastcnn.kernels.conv import conv2d_forward
    from fastcnn.runtime import set_threads

    set_threads(threads)
    rng = np.random.default_rng(0)
    rates = {}
    for s in sizes:
        a = rng.normal(size=(s, s)).astype(np.float32)
        b = rng.normal(size=(s, s)).astype(np.float32)
        gflop = 2 * s ** 3 / 1e9
        rates[f"numpy matmul {s}x{s}x{s}"] = gflop / _median_ms(lambda: a @ b, repeats) * 1e3
        rows = max(1, s // 64)
        x = np.ascontiguousarray(a[:rows * 64]).reshape(1, rows, 64, s)
        w = b.reshape(1, 1, s, s)
        y = np.empty((1, rows, 64, s), np.float32)
        bias = np.zeros(s, np.float32)
        ms = _median_ms(lambda: conv2d_forward(x, w, bias, y, 1, 1, 0, 0, 1, 1), repeats)
        rates[f"fastcnn GEMM kernel {rows * 64}x{s}x{s}"] = 2 * rows * 64 * s * s / 1e9 / ms * 1e3
    return rates


def _peak_worker(args):
    sizes = [int(v) for v in args.peak_sizes.split(",") if v.strip()]
    rates = measure_peak(args.threads, sizes)
    source = max(rates, key=rates.get)
    print(RESULT_PREFIX + json.dumps({"framework": "peak", "threads": args.threads, "rates": rates,
                                      "peak_gflops": rates[source], "peak_source": source,
                                      "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}), flush=True)


def run_worker(args):
    import numpy as np

    from fastcnn.config import load_config

    if args.worker == "layers":
        return _layers_worker(args)
    if args.worker == "peak":
        return _peak_worker(args)
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    rng = np.random.default_rng(args.data_seed)
    x = rng.normal(size=(args.batch, *cfg.model.input_shape)).astype(np.float32)
    labels = rng.integers(0, cfg.model.num_classes, size=args.batch).astype(np.int64)
    build = _fastcnn_worker if args.worker == "fastcnn" else _torch_worker
    fn, info = build(cfg, args, x, labels)
    setup_s = time.perf_counter() - t0
    times = _time_steps(fn, args.warmup, args.steps, args.max_seconds)
    med = statistics.median(times)
    result = {
        "framework": args.worker, "mode": args.mode, "config": args.config, "batch": args.batch,
        "layout": args.layout if args.worker == "torch" else "nhwc", "steps": args.steps, "warmup": args.warmup,
        "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "mean_ms": statistics.fmean(times) * 1e3,
        "images_per_sec": args.batch / med, "step_ms": [t * 1e3 for t in times], "setup_s": setup_s,
        "pid": os.getpid(), **info,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- driver side

def worker_env(framework, threads):
    env = dict(os.environ)
    if framework in ("torch", "peak"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    else:
        cores = available_cores()
        if threads > cores:  # numba.set_num_threads cannot exceed NUMBA_NUM_THREADS (default: the cores)
            env["NUMBA_NUM_THREADS"] = str(threads)
    return env


def parse_result(stdout):
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def spawn(framework, config, batch, mode, threads, args, layout="channels_last", extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--config", config,
           "--batch", str(batch), "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(threads), "--layout", layout, "--data-seed", str(args.data_seed), *extra]
    if args.max_seconds is not None:
        cmd += ["--max-seconds", str(args.max_seconds)]
    load_before = loadavg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(framework, threads), cwd=REPO)
    wall = time.perf_counter() - t
    result = parse_result(proc.stdout) if proc.returncode == 0 else None
    if result is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    result.update({"process_wall_s": wall, "loadavg_before": load_before, "loadavg_after": loadavg()})
    return result


def _label(config):
    return os.path.splitext(os.path.basename(config))[0]


def _median(values):
    return statistics.median(values) if values else None


def _fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def config_batch(config):
    from fastcnn.config import load_config

    return load_config(os.path.join(REPO, config)).data.batch_size


def measure(args, configs, batches, layouts, have_torch, log):
    """All comparison cells: {(config, mode, batch): {"fastcnn": [results], "torch/<layout>": [results]}}.

    ``batches``: training batch sizes, or None for each config's own ``data.batch_size``.
    """
    cells = []
    for config in configs:
        jobs = [("train", b) for b in (batches or [config_batch(config)])]
        if args.infer_batch:
            jobs.append(("infer", args.infer_batch))
        for mode, batch in jobs:
            cell = {"config": config, "network": _label(config), "mode": mode, "batch": batch, "runs": {}}
            for r in range(args.rounds):
                order = [("fastcnn", None)] + ([("torch", lay) for lay in layouts] if have_torch else [])
                for framework, layout in order:
                    res = spawn(framework, config, batch, mode, args.threads, args, layout or "channels_last")
                    key = framework if framework == "fastcnn" else f"torch/{layout}"
                    cell["runs"].setdefault(key, []).append(res)
                    log(f"[{_label(config)} {mode} b{batch} round {r + 1}/{args.rounds}] {key:<20} "
                        f"{res['images_per_sec']:>8.0f} img/s  (median {res['median_ms']:.2f} ms, "
                        f"load {_fmt(res['loadavg_before'], '.2f')})")
            for key, runs in cell["runs"].items():
                ips = [run["images_per_sec"] for run in runs]
                cell[key] = {"images_per_sec": _median(ips), "rounds": ips,
                             "spread": max(ips) / min(ips) if min(ips) > 0 else None}
            cells.append(cell)
    return cells


def sweep(args, configs, log):
    cores = available_cores()
    counts = sorted({1, 2, cores} & set(range(1, cores + 1))) if cores > 1 else [1]
    if args.sweep_threads:
        counts = [int(t) for t in args.sweep_threads.split(",")]
    rows = []
    for config in configs:
        runs = {t: [] for t in counts}
        for r in range(args.rounds):
            for t in counts:
                res = spawn("fastcnn", config, args.sweep_batch, "train", t, args)
                runs[t].append(res)
                log(f"[sweep {_label(config)} b{args.sweep_batch} round {r + 1}/{args.rounds}] {t} thread(s) "
                    f"{res['images_per_sec']:>8.0f} img/s")
        base = _median([x["images_per_sec"] for x in runs[counts[0]]])
        for t in counts:
            ips = _median([x["images_per_sec"] for x in runs[t]])
            rows.append({"config": config, "network": _label(config), "batch": args.sweep_batch, "threads": t,
                         "images_per_sec": ips, "speedup": ips / base if base else None,
                         "rounds": [x["images_per_sec"] for x in runs[t]], "runs": runs[t]})
    return rows


def markdown_table(cells, layouts, have_torch):
    torch_keys = [f"torch/{lay}" for lay in layouts] if have_torch else []
    many = len(torch_keys) > 1
    head = ["network", "batch", "fastcnn img/s"]
    for key in torch_keys:
        lay = key.split("/", 1)[1]
        head += [f"torch ({lay}) img/s" if many else "torch img/s",
                 f"fastcnn/torch ({lay})" if many else "fastcnn/torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    noisy = []
    for c in cells:
        batch = f"{c['batch']} (inference)" if c["mode"] == "infer" else str(c["batch"])
        ours = c["fastcnn"]["images_per_sec"]
        row = [c["network"], batch, _fmt(ours)]
        for key in torch_keys:
            theirs = c[key]["images_per_sec"] if key in c else None
            row += [_fmt(theirs), _fmt(ours / theirs if ours and theirs else None, ".2f") + ("x" if theirs else "")]
        lines.append("| " + " | ".join(row) + " |")
        for key in ["fastcnn", *torch_keys]:
            if key in c and c[key]["spread"] and c[key]["spread"] > NOISY_SPREAD:
                noisy.append(f"{c['network']} {batch} {key}: rounds {', '.join(f'{v:.0f}' for v in c[key]['rounds'])}")
    return "\n".join(lines), noisy


def suite_table(cells, torch_key):
    """One row per network: training and inference images/s, fastcnn, torch and their ratio."""
    nets = {}
    for c in cells:
        nets.setdefault(c["network"], {})[c["mode"]] = c
    head = ["network", "train batch", "fastcnn img/s", "torch img/s", "fastcnn/torch",
            "infer batch", "fastcnn img/s", "torch img/s", "fastcnn/torch"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, modes in nets.items():
        row = [name]
        for mode in ("train", "infer"):
            c = modes.get(mode)
            if c is None:
                row += ["-"] * 4
                continue
            ours = c["fastcnn"]["images_per_sec"]
            theirs = c[torch_key]["images_per_sec"] if torch_key and torch_key in c else None
            ratio = _fmt(ours / theirs, ".2f") + "x" if ours and theirs else "-"
            row += [str(c["batch"]), _fmt(ours), _fmt(theirs), ratio]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def layer_table(report):
    """Per-layer figures of one network (a run_bench report): ms, GFLOP/s and % of the matmul peak."""
    lines = ["| # | layer | output | fwd ms | fwd GFLOP/s | fwd % peak | bwd ms | bwd GFLOP/s | bwd % peak |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["layers"]:
        shape = "x".join(str(v) for v in r["output_shape"])
        lines.append(f"| {r['index']} | {r.get('label', r['kind'])} | {shape} | {r['forward_ms']:.3f} | "
                     f"{_fmt(r['forward_gflops'], '.1f')} | {_fmt(r['forward_peak_pct'], '.0f')} | "
                     f"{r['backward_ms']:.3f} | {_fmt(r['backward_gflops'], '.1f')} | "
                     f"{_fmt(r['backward_peak_pct'], '.0f')} |")
    return "\n".join(lines)


def suite_configs(only=None):
    """The suite's configs (relative to the repository), optionally only the named networks."""
    import glob

    found = SUITE_SHIPPED + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, SUITE_DIR, "*.yaml")))
    if not only:
        return found
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {_label(c) for c in found})
    if unknown:
        raise SystemExit(f"--only: no suite network named {', '.join(unknown)} "
                         f"(the suite: {', '.join(_label(c) for c in found)})")
    return [c for c in found if _label(c) in names]


def run_suite_extras(args, cells, log):
    """The matmul peak (one worker) and each network's per-layer figures (one worker per network)."""
    peak = spawn("peak", "-", 0, "train", args.threads, args, extra=["--peak-sizes", args.peak_sizes])
    log(f"[peak] {peak['peak_gflops']:.0f} GFLOP/s ({peak['peak_source']})")
    layers = {}
    if args.no_layers:
        return peak, layers
    for c in cells:
        if c["mode"] != "train" or c["network"] in layers:
            continue
        res = spawn("layers", c["config"], c["batch"], "train", args.threads, args,
                    extra=["--peak-gflops", str(peak["peak_gflops"]), "--peak-source", peak["peak_source"],
                           "--layer-repeats", str(args.layer_repeats)])
        layers[c["network"]] = res
        log(f"[layers {c['network']} b{c['batch']}] done (load {_fmt(res['loadavg_before'], '.2f')})")
    return peak, layers


def sweep_table(rows):
    lines = ["| network | batch | threads | fastcnn img/s | speedup vs 1 thread |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['batch']} | {r['threads']} | {_fmt(r['images_per_sec'])} | "
                     f"{_fmt(r['speedup'], '.2f')}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help="network config (repeatable; default: configs/mnist.yaml and configs/mnist_bn.yaml)")
    ap.add_argument("--suite", action="store_true",
                    help=f"the benchmark suite: {', '.join(SUITE_SHIPPED)} and {SUITE_DIR}/*.yaml, each at its "
                         "config's batch size, with per-layer figures and the matmul peak")
    ap.add_argument("--only", default=None, help="with --suite: only these networks (comma-separated names)")
    ap.add_argument("--batch-sizes", default=None,
                    help="comma-separated training batch sizes (default 32,64,128,256; --suite: the config's)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating fastcnn/torch rounds per cell")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per worker (at most, with --max-seconds)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per worker before timing (5; --suite: 2)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop timing a worker after this many seconds of steps, at least 3 (--suite: 2)")
    ap.add_argument("--peak-sizes", default="1024,2048", help="--suite: square matmul sizes for the peak")
    ap.add_argument("--layer-repeats", type=int, default=5, help="--suite: timed runs per layer (median)")
    ap.add_argument("--no-layers", action="store_true", help="--suite: skip the per-layer figures")
    ap.add_argument("--threads", type=int, default=None, help="threads for both frameworks (default: all cores)")
    ap.add_argument("--torch-layout", choices=["channels_last", "nchw", "both"], default="channels_last",
                    help="memory format of torch's tensors (default channels_last, like fastcnn's NHWC)")
    ap.add_argument("--infer-batch", type=int, default=256, help="inference batch size (0: skip inference)")
    ap.add_argument("--no-torch", action="store_true", help="time fastcnn only")
    ap.add_argument("--threads-sweep", action="store_true",
                    help="also time fastcnn's training step on 1, 2, ... threads")
    ap.add_argument("--sweep-threads", default=None, help="thread counts for --threads-sweep (default: 1,2,all cores)")
    ap.add_argument("--sweep-batch", type=int, default=64, help="batch size for --threads-sweep")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the random inputs and labels")
    ap.add_argument("--json", dest="json_out", default=None, help="write every raw number to this file")
    ap.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    # worker mode
    ap.add_argument("--worker", choices=["fastcnn", "torch", "layers", "peak"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peak-gflops", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peak-source", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["train", "infer"], default="train", help=argparse.SUPPRESS)
    ap.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.warmup is None:
        args.warmup = 2 if args.suite else 5
    if args.worker:
        args.config = (args.config or DEFAULT_CONFIGS)[0]
        run_worker(args)
        return 0
    if args.only and not args.suite:
        ap.error("--only needs --suite")
    if args.suite and args.config:
        ap.error("--suite runs the suite's configs: drop --config (or use --only)")
    if args.suite and args.max_seconds is None:
        args.max_seconds = 2.0

    configs = suite_configs(args.only) if args.suite else (args.config or DEFAULT_CONFIGS)
    for c in configs:
        if not os.path.exists(os.path.join(REPO, c)) and not os.path.exists(c):
            ap.error(f"config not found: {c}")
    configs = [c if os.path.isabs(c) else os.path.relpath(os.path.abspath(c), REPO) for c in configs]
    batch_sizes = args.batch_sizes or (None if args.suite else "32,64,128,256")
    batches = [int(b) for b in batch_sizes.split(",") if b.strip()] if batch_sizes else None
    args.threads = args.threads or available_cores()
    layouts = ["channels_last", "nchw"] if args.torch_layout == "both" else [args.torch_layout]
    import importlib.util

    have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not have_torch and not args.no_torch:
        log("PyTorch is not installed: timing fastcnn only (pip install torch==2.13.0)")

    started = time.time()
    cells = measure(args, configs, batches, layouts, have_torch, log)
    peak, layers = run_suite_extras(args, cells, log) if args.suite else (None, {})
    sweep_rows = sweep(args, configs, log) if args.threads_sweep else []

    torch_version = None
    for c in cells:
        for runs in c["runs"].values():
            torch_version = torch_version or runs[0].get("torch")
    first = cells[0]["runs"]["fastcnn"][0] if cells else {}
    loads = [run["loadavg_before"] for c in cells for runs in c["runs"].values() for run in runs
             if run["loadavg_before"] is not None]
    print(f"\nfastcnn vs PyTorch, training step and inference: {args.threads} thread(s), {cpu_name()} "
          f"({available_cores()} cores); "
          f"{args.steps} timed steps" + (f" at most (stopping after {args.max_seconds:g} s of them, at least 3)"
                                          if args.max_seconds else "")
          + f" after {args.warmup} warm-up, median over {args.rounds} round(s); "
          f"numba {first.get('numba')}, torch {torch_version}; "
          f"1-min load average {min(loads, default=0):.2f}-{max(loads, default=0):.2f}\n")
    table, noisy = markdown_table(cells, layouts, have_torch)
    print(suite_table(cells, f"torch/{layouts[0]}" if have_torch else None) if args.suite else table)
    if noisy:
        print(f"\nNoisy cells (max/min over rounds > {NOISY_SPREAD}): rerun on an idle machine or with more rounds:")
        for n in noisy:
            print(f"  {n}")
    if peak:
        rates = "; ".join(f"{k} {v:.0f}" for k, v in peak["rates"].items())
        print(f"\nMatrix-multiply peak ({args.threads} thread(s)): {peak['peak_gflops']:.0f} GFLOP/s, "
              f"{peak['peak_source']} (all, GFLOP/s: {rates})")
    for name, report in layers.items():
        print(f"\n{name}, batch {report['batch']}: per layer (fastcnn; % of the {report['matmul_peak_gflops']:.0f} "
              f"GFLOP/s peak; backward GFLOP/s counts 2x the forward FLOPs, 1x for row 0: weight gradient only)\n")
        print(layer_table(report))
    if sweep_rows:
        print(f"\nfastcnn training step, thread scaling (median over {args.rounds} round(s)):\n")
        print(sweep_table(sweep_rows))
    if args.json_out:
        report = {
            "started": started, "cpu": cpu_name(), "cores": available_cores(), "threads": args.threads,
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "data_seed": args.data_seed,
            "python": platform.python_version(), "numba": first.get("numba"), "torch": torch_version,
            "cells": cells, "threads_sweep": sweep_rows, "suite": args.suite, "peak": peak, "layers": layers,
            "max_seconds": args.max_seconds, "loadavg_range": [min(loads, default=None), max(loads, default=None)],
        }
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"\nraw numbers: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
