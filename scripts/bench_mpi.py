"""Processes x threads: `fastcnn train` for one epoch as P processes (mpiexec) of T threads each.

Each setup is a separate `fastcnn train CONFIG --set train.epochs=1` (under `mpiexec -n P` when
P > 1), the setups alternated in every round; the epoch time is metrics.jsonl's epoch_seconds (the
training loop, without start-up and validation), the wall time the whole command's. Prints one
line per run, then the medians and the speed-up over the first setup, and checks that every run of
a network ended with the same weights (the same bits whatever the setup).

    python scripts/bench_mpi.py --rounds 3 --setups 1x1,1x2,2x1 --nets mnist,resnet20

``mnist`` is configs/mnist.yaml on MNIST (FASTCNN_DATA); ``resnet20`` is
configs/resnet20_cifar10.yaml on synthetic 32x32x3 data (--resnet-images images).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def networks(resnet_images, mnist_images):
    mnist = ["configs/mnist.yaml"]
    if mnist_images:
        mnist += ["--set", f"data.num_train={mnist_images}"]
    return {
        "mnist": mnist,
        "resnet20": ["configs/resnet20_cifar10.yaml", "--set", "data.dataset=synthetic",
                     "--set", f"data.num_train={resnet_images}", "--set", "data.num_test=500"],
    }


def run(net_args, processes, threads, out):
    command = [sys.executable, "-m", "fastcnn", "train", *net_args, "--set", "train.epochs=1", "--no-progress",
               "--threads", str(threads), "--set", f"output.dir={out}"]
    if processes > 1:
        command = [MPIEXEC, "-n", str(processes), *command]
    env = dict(os.environ, PYTHONPATH=REPO)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = json.loads(f.read().splitlines()[-1])
    with np.load(os.path.join(out, "last.npz")) as f:
        weights = b"".join(f[k].tobytes() for k in sorted(f.files) if k != "meta")
    return record["epoch_seconds"], record["images_per_sec"], wall, weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    parser.add_argument("--nets", default="mnist,resnet20")
    parser.add_argument("--resnet-images", type=int, default=5120)
    parser.add_argument("--mnist-images", type=int, default=None, help="data.num_train (default: all 60,000)")
    args = parser.parse_args(argv)
    setups = [tuple(int(v) for v in s.split("x")) for s in args.setups.split(",")]
    nets = networks(args.resnet_images, args.mnist_images)
    results = {}
    work = tempfile.mkdtemp(prefix="bench-mpi-")
    try:
        for r in range(args.rounds):
            for net in args.nets.split(","):
                for p, t in setups:
                    out = os.path.join(work, f"{net}-{p}x{t}-{r}")
                    epoch, ips, wall, weights = run(nets[net], p, t, out)
                    results.setdefault(net, {}).setdefault((p, t), []).append((epoch, ips, wall, weights))
                    print(f"round {r} {net} {p}x{t}: epoch {epoch:.2f} s, {ips:.0f} img/s, wall {wall:.1f} s, "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("medians (processes x threads):")
    for net, by_setup in results.items():
        first = None
        for (p, t), runs in by_setup.items():
            epoch = statistics.median(x[0] for x in runs)
            first = first or epoch
            print(f"  {net} {p}x{t}: epoch {epoch:.2f} s, {statistics.median(x[1] for x in runs):.0f} img/s, "
                  f"wall {statistics.median(x[2] for x in runs):.1f} s, {first / epoch:.2f}x the first setup "
                  f"(rounds: {', '.join(f'{x[0]:.2f}' for x in runs)})")
        distinct = {x[3] for runs in by_setup.values() for x in runs}
        print(f"  {net}: {sum(len(v) for v in by_setup.values())} runs, "
              f"{'all with the same weights' if len(distinct) == 1 else f'{len(distinct)} different weights'}")


if __name__ == "__main__":
    main()
