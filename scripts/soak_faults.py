"""Soak test of fault handling: a real run killed again and again, every invariant checked after each fault.

    FASTCNN_DATA=../shared/data python scripts/soak_faults.py --faults 40

Trains once without interruption (the reference), then again while faults are
injected at random, resuming after each one until the run completes:

- kill-time:  SIGKILL at a random moment;
- kill-point: SIGKILL at a named write point (FASTCNN_FAULT=kill@POINT#N, fastcnn/faults.py);
- signal:     SIGINT or SIGTERM at a random moment (must exit 130 / 143, or 0 if it had finished);
- double-int: two SIGINTs a few milliseconds apart (exit 130);
- full-disk:  ENOSPC at a random save (FASTCNN_FAULT=enospc@write:FILE#N; exit 2 with one line);
- concurrent: a second run started on the same folder (refused, exit 2), then the first one killed;
- overwrite:  on a copy of the finished reference, an --overwrite run killed at a random moment or
              point (the folder must hold the old run or the new one, whole).

After every fault the folder must pass fastcnn.rundir.verify_run (every file loads; last.npz, best.npz
and config.yaml are of one run; best.npz is the best epoch's; metrics.jsonl is last.npz's history or
one epoch short; no epoch twice) and stderr must hold no traceback. The finished run must be
bit-identical to the reference (last.npz and best.npz: every parameter, buffer and optimizer array),
with the same metrics but timings, and leave no lock, temporary file or staging folder.
Exits 0 when every check held, 1 otherwise.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastcnn.checkpoint import load_checkpoint  # noqa: E402
from fastcnn.rundir import verify_run  # noqa: E402

TIMING = ("images_per_sec", "epoch_seconds")
KILL_POINTS = ["start:after-lock", "start:after-config", "write:best.npz", "tmp:best.npz", "epoch-end:after-best",
               "write:last.npz", "tmp:last.npz", "epoch-end:after-last", "tmp:metrics.jsonl",
               "epoch-end:after-metrics", "signal-save:before"]
OVERWRITE_POINTS = ["start:after-config", "tmp:last.npz", "overwrite:before-swap", "overwrite:after-swap"]
DISK_FILES = ["best.npz", "last.npz", "metrics.jsonl", "config.yaml"]


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.failures = []
        self.counts = Counter()
        self.missed = 0  # faults that found the run already finished (nothing was tested)

    def cmd(self, out_dir, *extra):
        a = self.args
        cmd = [sys.executable, "-m", "fastcnn", "train", a.config, "--set", f"output.dir={out_dir}",
               "--set", f"train.epochs={a.epochs}", "--set", f"data.num_train={a.num_train}",
               "--set", f"data.num_test={a.num_test}",
               "--threads", str(a.threads), "--no-progress"]
        for item in a.overrides:
            cmd += ["--set", item]
        return cmd + list(extra)

    def start(self, out_dir, *extra, fault=None):
        env = dict(os.environ)
        env.pop("FASTCNN_FAULT", None)
        if fault:
            env["FASTCNN_FAULT"] = fault
        return subprocess.Popen(self.cmd(out_dir, *extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def fail(self, what):
        print(f"  FAIL: {what}")
        self.failures.append(what)

    def check(self, out_dir, label, complete=False):
        problems = verify_run(out_dir, complete=complete)
        for p in problems:
            self.fail(f"{label}: {p}")
        return not problems

    def epochs_left(self, out_dir):
        """Epoch ends the next (resumed) run will reach: the N of a fault at a point's N-th time."""
        last = os.path.join(out_dir, "last.npz")
        done = load_checkpoint(last).meta["epoch"] if os.path.isfile(last) else 0
        return max(1, self.args.epochs - done)

    @staticmethod
    def resume_args(out_dir):
        for name in ("last.npz", "best.npz"):
            if os.path.isfile(os.path.join(out_dir, name)):
                return ["--resume", os.path.join(out_dir, name)]
        return []

    def wait_running(self, proc, timeout=120):
        """Until the run prints its first training step (True), or ends (False)."""
        start = time.perf_counter()
        for line in proc.stdout:
            if line.startswith("First training step"):
                return True
            if time.perf_counter() - start > timeout:
                break
        return False

    # -- the faults --------------------------------------------------------------------
    def one_fault(self, out_dir, kind):
        """Inject one fault into a run (resumed when there is something to resume); check the result."""
        resume = self.resume_args(out_dir)
        existed = os.path.isdir(out_dir)
        rng = self.rng
        expect = {0}
        second, first_ended = None, False
        if kind == "kill-point":
            point = rng.choice(KILL_POINTS)
            nth = 1 if point.startswith("start:") else rng.randint(1, self.epochs_left(out_dir))
            label = f"kill@{point}#{nth}"
            if point == "signal-save:before":
                proc = self.start(out_dir, *resume, fault=f"kill@{point}")
                delay = rng.uniform(0.0, self.duration / 2)
                self.sleep_then(proc, delay, signal.SIGINT)
                expect = {-9, 0, 130}
            else:
                proc = self.start(out_dir, *resume, fault=label)
                expect = {-9, 0}
        elif kind == "full-disk":
            name = rng.choice(DISK_FILES)
            nth = 1 if name == "config.yaml" else rng.randint(1, self.epochs_left(out_dir))
            label = f"enospc@write:{name}#{nth}"
            proc = self.start(out_dir, *resume, fault=label)
            expect = {2, 0}
        elif kind in ("kill-time", "signal", "double-int"):
            sig = {"kill-time": signal.SIGKILL, "double-int": signal.SIGINT}.get(
                kind, rng.choice([signal.SIGINT, signal.SIGTERM]))
            # Within the time the resumed run needs (its share of the reference's epochs), so that
            # most faults land while it trains, not after it has finished.
            delay = rng.uniform(0.2, max(0.3, self.duration * self.epochs_left(out_dir) / self.args.epochs))
            label = f"{kind} {signal.Signals(sig).name} after {delay:.2f} s"
            proc = self.start(out_dir, *resume)
            self.sleep_then(proc, delay, sig, twice=kind == "double-int")
            expect = {0, -9} if sig == signal.SIGKILL else {0, 128 + sig}
        elif kind == "concurrent":
            label = "second run on the same folder"
            proc = self.start(out_dir, *resume)
            if self.wait_running(proc):
                second = subprocess.run(self.cmd(out_dir), cwd=REPO, capture_output=True, text=True, timeout=300)
                first_ended = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            expect = {-9, 0}
        else:
            raise ValueError(kind)
        _, err = proc.communicate(timeout=600)
        self.counts[kind] += 1
        if proc.returncode == 0 and kind != "concurrent":
            self.missed += 1  # the run finished before the fault
        print(f"{kind:>10}: {label}: exit {proc.returncode}")
        if proc.returncode not in expect:
            self.fail(f"{label}: exit {proc.returncode}, expected one of {sorted(expect)}: {err.strip()[-500:]}")
        if "Traceback" in err:
            self.fail(f"{label}: a traceback: {err.strip()[-1500:]}")
        if proc.returncode == 2 and (not err.startswith("Error: ") or len(err.strip().splitlines()) != 1):
            self.fail(f"{label}: not one line: {err!r}")
        if proc.returncode == 2 and kind == "full-disk" and "no space left on device" not in err:
            self.fail(f"{label}: the message does not say what happened: {err.strip()}")
        if second is not None and not (first_ended and proc.returncode == 0):
            if second.returncode != 2 or "is in use by another fastcnn run" not in second.stderr:
                self.fail(f"{label}: the second run was not refused: exit {second.returncode}: "
                          f"{second.stderr.strip()[-300:]}")
        if existed or os.path.isdir(out_dir):  # (a start stopped before its folder existed leaves none)
            self.check(out_dir, label)
        return proc.returncode == 0

    @staticmethod
    def sleep_then(proc, delay, sig, twice=False):
        try:
            proc.wait(timeout=delay)
            return
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(sig)
        if twice:
            time.sleep(random.uniform(0.0, 0.05))
            if proc.poll() is None:
                proc.send_signal(sig)

    # -- the run -----------------------------------------------------------------------
    def compare(self, out_dir, ref_dir, label):
        for name in ("last.npz", "best.npz"):
            ref, got = load_checkpoint(os.path.join(ref_dir, name)), load_checkpoint(os.path.join(out_dir, name))
            for part in ("model", "optim"):
                a, b = getattr(ref, part), getattr(got, part)
                if a.keys() != b.keys():
                    self.fail(f"{label}: {name} {part} keys differ")
                    continue
                for key in a:
                    if not np.array_equal(a[key], b[key]):
                        self.fail(f"{label}: {name} {part} {key} differs from the reference")
            if ref.meta["epoch"] != got.meta["epoch"]:
                self.fail(f"{label}: {name} is of epoch {got.meta['epoch']}, the reference's of {ref.meta['epoch']}")

        def records(d):
            with open(os.path.join(d, "metrics.jsonl"), encoding="utf-8") as f:
                return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
        if records(out_dir) != records(ref_dir):
            self.fail(f"{label}: metrics.jsonl differs from the reference's (timings aside)")

    def check_round(self, run_dir, ref_dir, rounds):
        before = len(self.failures)
        if self.check(run_dir, f"round {rounds}", complete=True):
            self.compare(run_dir, ref_dir, f"round {rounds}")
        print(f"round {rounds} complete: " + ("bit-identical to the reference, nothing left behind"
                                              if len(self.failures) == before else "FAILED"))

    def finish(self, out_dir, label):
        proc = subprocess.run(self.cmd(out_dir, *self.resume_args(out_dir)), cwd=REPO, capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            self.fail(f"{label}: the final resume exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
            return False
        return True

    def main(self):
        a = self.args
        work = tempfile.mkdtemp(prefix="fastcnn-soak-faults-")
        ref_dir, run_dir = os.path.join(work, "reference"), os.path.join(work, "run")
        t = time.perf_counter()
        proc = subprocess.run(self.cmd(ref_dir), cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr)
            return 1
        self.duration = time.perf_counter() - t
        print(f"reference run: {self.duration:.1f} s ({a.epochs} epochs of {a.num_train} images) in {work}")
        self.check(ref_dir, "reference", complete=True)

        kinds = ["kill-time", "kill-point", "signal", "double-int", "full-disk", "concurrent"]
        weights = [4, 5, 2, 1, 2, 1]
        faults = a.faults - a.overwrites
        done, rounds, in_round = 0, 0, False
        while done < faults:
            kind = self.rng.choices(kinds, weights)[0]
            finished = self.one_fault(run_dir, kind)
            done += 1
            in_round = not finished
            if finished:  # the run completed despite the fault: check it, then start the next round
                rounds += 1
                self.check_round(run_dir, ref_dir, rounds)
                shutil.rmtree(run_dir)
        if in_round and self.finish(run_dir, "last round"):  # resumed once more, without a fault
            rounds += 1
            self.check_round(run_dir, ref_dir, rounds)

        for i in range(a.overwrites):  # --overwrite killed at random: the old run or the new one, whole
            target = os.path.join(work, f"overwrite{i}")
            shutil.copytree(ref_dir, target)
            old_id = load_checkpoint(os.path.join(target, "last.npz")).meta["run_id"]
            if self.rng.random() < 0.5:
                point = self.rng.choice(OVERWRITE_POINTS)
                label = f"--overwrite, kill@{point}"
                proc = self.start(target, "--overwrite", "--set", "seed=1", fault=f"kill@{point}")
            else:
                delay = self.rng.uniform(0.2, self.duration)
                label = f"--overwrite, SIGKILL after {delay:.2f} s"
                proc = self.start(target, "--overwrite", "--set", "seed=1")
                self.sleep_then(proc, delay, signal.SIGKILL)
            _, err = proc.communicate(timeout=600)
            self.counts["overwrite"] += 1
            run_id = load_checkpoint(os.path.join(target, "last.npz")).meta["run_id"]
            print(f" overwrite: {label}: exit {proc.returncode}; folder holds the "
                  f"{'old' if run_id == old_id else 'new'} run")
            if "Traceback" in err:
                self.fail(f"{label}: a traceback: {err.strip()[-1500:]}")
            self.check(target, label)
            if run_id == old_id:
                self.compare(target, ref_dir, f"{label} (the old run)")
            proc = subprocess.run(self.cmd(target, "--overwrite"), cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                self.fail(f"{label}: the next --overwrite exited {proc.returncode}: {proc.stderr[-300:]}")
            elif self.check(target, f"{label}, then --overwrite", complete=True):
                self.compare(target, ref_dir, f"{label}, then --overwrite")
            shutil.rmtree(target)

        summary = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        if self.failures:
            print(f"FAIL: {len(self.failures)} check(s) failed over {sum(self.counts.values())} faults ({summary})")
            return 1
        shutil.rmtree(work, ignore_errors=True)
        print(f"OK: {sum(self.counts.values())} faults ({summary}; {self.missed} found the run already finished); "
              f"{rounds} resumed run(s) bit-identical to the reference; every invariant held after every fault")
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "mnist.yaml"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--num-train", type=int, default=2000, help="data.num_train (small: many faults per minute)")
    ap.add_argument("--num-test", type=int, default=2000, help="data.num_test (the validation set)")
    ap.add_argument("--faults", type=int, default=40, help="how many faults to inject in all")
    ap.add_argument("--overwrites", type=int, default=6, help="how many of them hit an --overwrite run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault choices and times")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every run")
    args = ap.parse_args()
    return Soak(args).main()


if __name__ == "__main__":
    sys.exit(main())
