"""kill -9 at every write point (the FASTCNN_FAULT hook, fastcnn/faults.py), then resume.

Each kill runs `fastcnn train` in a fresh interpreter (never a fork after Numba ran) on a tiny
synthetic run (3 epochs of 4 batches; epochs 1 and 2 improve, epoch 3 does not). After the kill the
folder's files must agree with each other (fastcnn.rundir.verify_run); after the resume the run must
end bit-identical to an uninterrupted one, with every epoch once in metrics.jsonl, best.npz the best
epoch's, and no temporary file, lock or staging folder left.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fastcnn.checkpoint import load_checkpoint
from fastcnn.rundir import config_run_id, verify_run

from conftest import REPO, SMALL_CONFIG, run_cli

TIMING = ("images_per_sec", "epoch_seconds")


def train(out_dir, *extra, fault=None, timeout=180):
    """`fastcnn train` of the tiny run in a subprocess; FASTCNN_FAULT=fault. Returns the CompletedProcess."""
    env = dict(os.environ)
    env.pop("FASTCNN_FAULT", None)
    if fault:
        env["FASTCNN_FAULT"] = fault
    cmd = [sys.executable, "-m", "fastcnn", "train", SMALL_CONFIG, "--set", f"output.dir={out_dir}",
           "--set", "train.epochs=3", "--set", "data.num_train=64", "--set", "data.batch_size=16",
           "--threads", "1", "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def arrays(path):
    ck = load_checkpoint(path)
    return {**ck.model, **{f"optim.{k}": v for k, v in ck.optim.items()}}


def metrics(path):
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_same_run(run_dir, ref_dir):
    """Bit-identical last.npz and best.npz, the same metrics (but timings), nothing left behind."""
    assert verify_run(str(run_dir), complete=True) == []
    for name in ("last.npz", "best.npz"):
        ref, got = arrays(ref_dir / name), arrays(run_dir / name)
        assert ref.keys() == got.keys(), name
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name} {key}")
        assert load_checkpoint(run_dir / name).meta["epoch"] == load_checkpoint(ref_dir / name).meta["epoch"]
    assert metrics(run_dir / "metrics.jsonl") == metrics(ref_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    proc = train(out)
    assert proc.returncode == 0, proc.stderr
    history = load_checkpoint(out / "last.npz").meta["history"]
    # The kill points below assume that epochs 1 and 2 improve and epoch 3 does not.
    assert [r["val_accuracy"] > max([0] + [h["val_accuracy"] for h in history[:i]])
            for i, r in enumerate(history)] == [True, True, False]
    return out


@pytest.mark.parametrize("point", [
    "start:after-config",          # the folder, its lock and config.yaml; no checkpoint
    "tmp:best.npz#2",              # epoch 2's best.npz written to its temporary file, not renamed
    "epoch-end:after-best#2",      # best.npz of epoch 2, last.npz of epoch 1
    "tmp:last.npz#2",
    "epoch-end:after-last#2",      # metrics.jsonl one epoch short
    "tmp:metrics.jsonl#2",
])
def test_kill_at_a_write_point_then_resume(reference, tmp_path, point, capsys):
    out = tmp_path / "run"
    proc = train(out, fault=f"kill@{point}")
    assert proc.returncode == -9, proc.stderr
    assert verify_run(str(out)) == []
    if point.startswith("tmp:"):
        assert any(n.endswith(".tmp") for n in os.listdir(out)), "the kill left no temporary file?"
    if point == "epoch-end:after-best#2":  # best.npz one epoch ahead of last.npz: the resume redoes it
        assert load_checkpoint(out / "best.npz").meta["epoch"] == 2
        assert load_checkpoint(out / "last.npz").meta["epoch"] == 1
    resume = ["--resume", str(out / "last.npz")] if (out / "last.npz").exists() else []
    proc = train(out, *resume)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_same_run(out, reference)
    if point.startswith("tmp:"):
        assert "temporary file(s) of an interrupted save" in proc.stdout
    if point == "epoch-end:after-last#2":
        assert "metrics.jsonl rewritten from the checkpoint's history" in proc.stdout
    if point.startswith("start:"):
        assert "took over the lock of an earlier run that no longer runs" in proc.stdout
    if point == "epoch-end:after-best#2":
        # The run reports the best accuracy best.npz really scores (validation = test split here).
        reported = float(proc.stdout.split("Best validation accuracy ")[1].split(";")[0])
        code, out_text, err = run_cli(["eval", str(out / "best.npz"), "--json", "--threads", "1"], capsys)
        assert code == 0, err
        assert round(json.loads(out_text)["accuracy"], 4) == reported


@pytest.mark.parametrize("point, replaced", [
    ("start:after-config", False),       # the new run never wrote a checkpoint: the old one stays whole
    ("overwrite:before-swap", False),    # its first checkpoint is written, in the staging folder
    ("overwrite:after-swap", True),      # swapped: the new run's first epoch is in place, whole
])
def test_kill_during_overwrite_never_loses_or_mixes(reference, tmp_path, point, replaced):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    old_id = config_run_id(out / "config.yaml")
    old_last = (out / "last.npz").read_bytes()
    proc = train(out, "--overwrite", "--set", "seed=1", fault=f"kill@{point}")
    assert proc.returncode == -9, proc.stderr
    assert verify_run(str(out)) == []
    run_id = config_run_id(out / "config.yaml")
    if replaced:
        assert run_id != old_id and load_checkpoint(out / "last.npz").meta["epoch"] == 1
    else:
        assert run_id == old_id and (out / "last.npz").read_bytes() == old_last
    # The next start cleans up what the kill left (staging folder, lock, temporary files).
    proc = train(out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, reference)


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_double_signal_while_saving_leaves_a_loadable_run(tmp_path, signame, code):
    """Ctrl-C (or SIGTERM) twice: the second one raises at once, wherever the first save is; files
    still agree, and the exit code is the signal's (a third one while exiting changes nothing)."""
    import signal
    import time

    sig = getattr(signal, signame)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastcnn", "train", SMALL_CONFIG, "--set", f"output.dir={out}",
           "--set", "train.epochs=1000", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 2/"):
            break
    for _ in range(3):
        proc.send_signal(sig)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert verify_run(str(out)) == []
    assert not (out / ".fastcnn.lock").exists()
