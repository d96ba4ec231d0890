"""Soak test: train, SIGTERM at random moments, resume each time; the end must equal an uninterrupted run.

    FASTCNN_DATA=../shared/data python scripts/soak_resume.py --epochs 3 --kills 5

Runs `fastcnn train` once without interruption (the reference), then again
with SIGTERM sent at random times (each one must exit 143 and leave a
loadable last.npz), resuming with --resume after each, until it finishes.
Every parameter, buffer and optimizer array of the final last.npz must be
bit-identical to the reference's. Exits 0 when they are, 1 otherwise.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(config, out_dir, epochs, extra):
    return [sys.executable, "-m", "fastcnn.cli", "train", config, "--set", f"output.dir={out_dir}",
            "--set", f"train.epochs={epochs}", "--no-progress", *extra]


def arrays(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k != "meta"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "mnist.yaml"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kills", type=int, default=5, help="how many SIGTERMs to send")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for both runs")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    extra = ["--threads", str(args.threads)] + [a for o in args.overrides for a in ("--set", o)]
    work = tempfile.mkdtemp(prefix="fastcnn-soak-")
    ref_dir, run_dir = os.path.join(work, "reference"), os.path.join(work, "interrupted")

    t = time.perf_counter()
    subprocess.run(train_cmd(args.config, ref_dir, args.epochs, extra), check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    duration = time.perf_counter() - t
    print(f"reference run: {duration:.1f} s")

    resume = []
    kills = 0
    while True:
        proc = subprocess.Popen(train_cmd(args.config, run_dir, args.epochs, extra + resume), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < args.kills:
            delay = rng.uniform(2.0, max(2.5, duration / (args.kills + 1)))
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                kills += 1
        _, err = proc.communicate()
        if proc.returncode == 0:
            break
        if proc.returncode != 143:
            print(f"FAIL: exit code {proc.returncode} after SIGTERM:\n{err}")
            return 1
        last = os.path.join(run_dir, "last.npz")
        meta_line = [line for line in err.splitlines() if "Interrupted" in line]
        # A SIGTERM before the first step stops the run before it saved anything (exit 143 all the same).
        print(f"kill {kills}: exit 143, {meta_line[0].strip() if meta_line else 'stopped before its first save'}")
        resume = ["--resume", last] if os.path.exists(last) else []

    ref, got = arrays(os.path.join(ref_dir, "last.npz")), arrays(os.path.join(run_dir, "last.npz"))
    differing = [k for k in ref if k not in got or not np.array_equal(ref[k], got[k])]
    if differing or ref.keys() != got.keys():
        print(f"FAIL after {kills} interruption(s): differing arrays: {differing[:5]}")
        return 1
    print(f"OK: {kills} interruption(s) and resumes; all {len(ref)} arrays bit-identical to the "
          f"uninterrupted run ({work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
