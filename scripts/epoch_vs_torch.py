"""One MNIST epoch end to end: ``fastcnn train`` vs ``scripts/train_torch_mnist.py``.

Usage (from the repository root, with the venv's python; needs the MNIST files):

    export FASTCNN_DATA=../shared/data
    python scripts/epoch_vs_torch.py                          # 3 alternating rounds, all cores
    python scripts/epoch_vs_torch.py --rounds 5 --threads 2 --json epoch_vs_torch.json
    python scripts/epoch_vs_torch.py --num-train 4096 --num-test 1000 --rounds 1   # a quick check

Each round runs, one after the other, as separate processes:

    fastcnn train CONFIG --set train.epochs=1 --set output.dir=<tmp> --no-progress [--threads N]
    python scripts/train_torch_mnist.py --config CONFIG --epochs 1 [--threads N] --metrics-jsonl <tmp>

and records for each:

- epoch seconds: the training loop of the epoch (batching included,
  evaluation and checkpoints excluded): ``epoch_seconds`` of fastcnn's
  metrics.jsonl and of the torch script's (same definition);
- images/s over that epoch, and test accuracy after it;
- process wall time: start to exit (interpreter start, imports, data loading,
  kernel cache load or compilation, the epoch, evaluation, fastcnn's
  checkpoints);
- "first step at": seconds from the process's start (its own clock) to its
  first training step, as each prints it;
- peak RSS: the child's own ``ru_maxrss``, read with ``os.wait4`` on that one
  child (``getrusage(RUSAGE_CHILDREN)`` would be the maximum over all children).

The medians over rounds are compared in a markdown table.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
TORCH_SCRIPT = os.path.join(REPO, "scripts", "train_torch_mnist.py")
FASTCNN_CLI = "import sys; from fastcnn.cli import main; sys.argv[0] = 'fastcnn'; main(sys.argv[1:])"


from fastcnn.bench import cpu_name  # noqa: E402


def run_measured(cmd, env, log_path):
    """Run ``cmd``; returns (exit code, wall seconds, peak RSS in MiB) of that one process."""
    with open(log_path, "w", encoding="utf-8") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    scale = 1 / 2 ** 20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    return proc.returncode, wall, usage.ru_maxrss * scale


def _dataset(config):
    import yaml

    with open(config, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    return (raw.get("data") or {}).get("dataset")


def _first_step(text):
    m = re.search(r"First training step at ([0-9.]+) s", text)
    return float(m.group(1)) if m else None


def _read_metrics_jsonl(path):
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1]


def _fail(name, code, log_path):
    with open(log_path, encoding="utf-8", errors="replace") as f:
        tail = "".join(f.readlines()[-25:])
    raise SystemExit(f"{name} exited with {code}; its output ({log_path}):\n{tail}")


def run_fastcnn(args, env, work):
    out_dir = os.path.join(work, "fastcnn_run")
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-c", FASTCNN_CLI, "train", args.config, "--set", "train.epochs=1",
           "--set", f"output.dir={out_dir}", "--no-progress"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.data_root:
        cmd += ["--set", f"data.root={args.data_root}"]
    if args.num_train:
        cmd += ["--set", f"data.num_train={args.num_train}"]
    if args.num_test:
        cmd += ["--set", f"data.num_test={args.num_test}"]
    log_path = os.path.join(work, "fastcnn.log")
    code, wall, rss = run_measured(cmd, env, log_path)
    if code != 0:
        _fail("fastcnn train", code, log_path)
    rec = _read_metrics_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    compiled = re.search(r"Compiled (\d+) kernel", text)
    return {"framework": "fastcnn", "epoch_seconds": rec["epoch_seconds"], "images_per_sec": rec["images_per_sec"],
            "val_accuracy": rec["val_accuracy"], "train_loss": rec["train_loss"], "process_wall_s": wall,
            "peak_rss_mib": rss, "first_step_s": _first_step(text),
            "kernels_compiled": int(compiled.group(1)) if compiled else 0, "command": cmd}


def run_torch(args, env, work):
    metrics = os.path.join(work, "torch_metrics.jsonl")
    cmd = [sys.executable, TORCH_SCRIPT, "--config", args.config, "--epochs", "1", "--metrics-jsonl", metrics]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.num_train:
        cmd += ["--num-train", str(args.num_train)]
    if args.num_test:
        cmd += ["--num-test", str(args.num_test)]
    log_path = os.path.join(work, "torch.log")
    code, wall, rss = run_measured(cmd, env, log_path)
    if code != 0:
        _fail("train_torch_mnist.py", code, log_path)
    rec = _read_metrics_jsonl(metrics)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return {"framework": "torch", "epoch_seconds": rec["epoch_seconds"], "images_per_sec": rec["images_per_sec"],
            "val_accuracy": rec["val_accuracy"], "train_loss": rec["train_loss"], "process_wall_s": wall,
            "peak_rss_mib": rss, "first_step_s": _first_step(text), "command": cmd}


def _med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mnist.yaml")
    ap.add_argument("--rounds", type=int, default=3, help="alternating fastcnn/torch rounds")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both (default: each one's default, all cores)")
    ap.add_argument("--data-root", default=None, help="folder holding mnist/ (default: $FASTCNN_DATA)")
    ap.add_argument("--num-train", type=int, default=None, help="first N training images only (quick checks)")
    ap.add_argument("--num-test", type=int, default=None, help="first N test images only (quick checks)")
    ap.add_argument("--json", dest="json_out", default=None, help="write every raw number to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, metrics)")
    args = ap.parse_args(argv)

    if not os.path.exists(args.config):
        ap.error(f"config not found: {args.config}")
    args.config = os.path.abspath(args.config)
    args.data_root = args.data_root or os.environ.get("FASTCNN_DATA") or None
    env = dict(os.environ)
    if args.data_root:
        args.data_root = os.path.abspath(os.path.expanduser(args.data_root))
        env["FASTCNN_DATA"] = args.data_root
    elif _dataset(args.config) != "synthetic":
        ap.error("needs the MNIST files: set FASTCNN_DATA (e.g. export FASTCNN_DATA=../shared/data) "
                 "or pass --data-root")

    work = tempfile.mkdtemp(prefix="epoch_vs_torch_")
    runs = {"fastcnn": [], "torch": []}
    try:
        for r in range(args.rounds):
            for name, fn in (("fastcnn", run_fastcnn), ("torch", run_torch)):
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                res = fn(args, env, work)
                res.update({"round": r + 1, "loadavg_before": load})
                runs[name].append(res)
                print(f"[round {r + 1}/{args.rounds}] {name:<8} epoch {res['epoch_seconds']:.2f} s "
                      f"({res['images_per_sec']:.0f} img/s), process {res['process_wall_s']:.2f} s, "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB, test acc {res['val_accuracy']:.4f}"
                      + (f", compiled {res['kernels_compiled']} kernel(s)" if res.get("kernels_compiled") else ""),
                      file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"logs and metrics kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    rows = [("epoch (training loop) s", "epoch_seconds", ".2f", True),
            ("images/s over the epoch", "images_per_sec", ".0f", False),
            ("process wall time s", "process_wall_s", ".2f", True),
            ("first step at s", "first_step_s", ".2f", True),
            ("peak RSS MiB", "peak_rss_mib", ".0f", True),
            ("test accuracy after 1 epoch", "val_accuracy", ".4f", None)]
    subset = ""
    if args.num_train or args.num_test:
        subset = f"; SUBSET: num_train={args.num_train}, num_test={args.num_test}"
    print(f"\nOne epoch of {os.path.relpath(args.config, REPO)}: fastcnn vs PyTorch "
          f"({args.threads or 'default (all cores)'} thread(s), {cpu_name()}, "
          f"{os.cpu_count()} cores; median over {args.rounds} round(s){subset})\n")
    print("| measure | fastcnn | PyTorch | fastcnn/PyTorch |")
    print("|---|---:|---:|---:|")
    for label, key, spec, _lower_better in rows:
        a, b = _med(runs["fastcnn"], key), _med(runs["torch"], key)
        ratio = _f(a / b, ".2f") + "x" if a is not None and b else "-"
        print(f"| {label} | {_f(a, spec)} | {_f(b, spec)} | {ratio} |")
    compiled = [r["kernels_compiled"] for r in runs["fastcnn"]]
    if any(compiled):
        print(f"\nNote: fastcnn compiled kernels in some rounds ({compiled}): Numba's cache was cold or stale; "
              f"those rounds' process times include compilation.")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"config": args.config, "threads": args.threads, "rounds": args.rounds,
                       "num_train": args.num_train, "num_test": args.num_test, "cpu_count": os.cpu_count(),
                       "runs": runs}, f, indent=1)
        print(f"\nraw numbers: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
