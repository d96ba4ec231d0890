"""Full disk, permissions and I/O errors on the output side: one line naming the file and what is intact,
exit 2 (130/143 while saving after a signal), the old files loadable, a resume that ends as if nothing
happened. Failures are injected with fastcnn.faults (an OSError at a named write point), and once for
real: a file-size limit (RLIMIT_FSIZE) makes the kernel refuse the checkpoint write.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from fastcnn import faults
from fastcnn.checkpoint import load_checkpoint
from fastcnn.data import loader as loader_module
from fastcnn.rundir import config_run_id, verify_run

from conftest import REPO, SMALL_CONFIG, run_cli

TIMING = ("images_per_sec", "epoch_seconds")


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Python's own SIGINT/SIGTERM handlers around each test: the CLI ignores signals once a run has stopped
    on one (it is about to exit), which in this process would outlive the test."""
    def reset():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    reset()
    yield
    reset()


def argv(out_dir, *extra):
    return ["train", SMALL_CONFIG, "--set", f"output.dir={out_dir}", "--set", "train.epochs=3",
            "--set", "data.num_train=64", "--set", "data.batch_size=16", "--threads", "1", "--no-progress", *extra]


@pytest.fixture
def inject(monkeypatch):
    """inject('enospc@write:last.npz#2'): what FASTCNN_FAULT would do, in this process."""
    def arm(spec):
        monkeypatch.setattr(faults, "_RULES", faults._parse(spec))
        monkeypatch.setattr(faults, "_HITS", {})
    return arm


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from fastcnn.cli import main

    out = tmp_path_factory.mktemp("disk") / "reference"
    with pytest.raises(SystemExit) as info:
        main(argv(out))
    assert info.value.code == 0
    return out


def assert_same_as(run_dir, ref_dir):
    assert verify_run(str(run_dir), complete=True) == []
    for name in ("last.npz", "best.npz"):
        ref, got = load_checkpoint(ref_dir / name), load_checkpoint(run_dir / name)
        for key in ref.model:
            np.testing.assert_array_equal(got.model[key], ref.model[key], err_msg=f"{name} {key}")
        for key in ref.optim:
            np.testing.assert_array_equal(got.optim[key], ref.optim[key], err_msg=f"{name} optim.{key}")

    def records(d):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert records(run_dir) == records(ref_dir)


def one_line(err):
    assert err.startswith("Error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("spec, words", [
    ("enospc@write:last.npz#2", r"last.npz: no space left on device; last.npz \(end of epoch 1\) and best.npz "
                                r"\(epoch 2\) are intact in .* \(continue with --resume .*last.npz\)"),
    ("enospc@write:best.npz#2", r"best.npz: no space left on device; last.npz \(end of epoch 1\) and best.npz "
                                r"\(epoch 1\) are intact"),
    ("enospc@write:metrics.jsonl#3", r"metrics.jsonl: no space left on device; last.npz \(end of epoch 3\) and "
                                     r"best.npz \(epoch 2\) are intact"),
    ("enospc@tmp:last.npz#1", r"last.npz: no space left on device; best.npz \(epoch 1\) is intact in .* "
                              r"\(continue with --resume .*best.npz\)"),
    ("eacces@write:last.npz#1", r"last.npz: permission denied; best.npz \(epoch 1\) is intact"),
    ("eio@write:best.npz#1", r"best.npz: input/output error; no checkpoint was written yet"),
])
def test_write_failure_at_an_epoch_end_is_one_line_and_resumable(reference, tmp_path, capsys, inject, spec, words):
    import re

    out = tmp_path / "run"
    inject(spec)
    code, _, err = run_cli(argv(out), capsys)
    assert code == 2
    assert re.search(words, one_line(err)), err
    assert verify_run(str(out)) == []
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    inject("")
    # From last.npz, else from best.npz (a failure between the two saves of epoch 1 leaves only best.npz).
    resume = next((["--resume", str(out / n)] for n in ("last.npz", "best.npz") if (out / n).exists()), [])
    code, _, err = run_cli(argv(out, *resume), capsys)
    assert code == 0, err
    assert_same_as(out, reference)


def test_config_yaml_write_failure_before_training(tmp_path, capsys, inject):
    out = tmp_path / "run"
    inject("enospc@write:config.yaml")
    code, out_text, err = run_cli(argv(out), capsys)
    assert code == 2 and "config.yaml: no space left on device; no checkpoint was written yet" in one_line(err)
    assert "First training step" not in out_text
    assert not (out / ".fastcnn.lock").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_full_disk_while_saving_after_a_signal(tmp_path, capsys, inject, monkeypatch, signum, code):
    original = loader_module.BatchLoader.epoch_batches

    def epoch_batches(self, e, start=0):
        for i, item in enumerate(original(self, e, start=start), start=start):
            if (e, i) == (1, 1):
                signal.raise_signal(signum)
            yield item

    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", epoch_batches)
    out = tmp_path / "run"
    inject("enospc@write:last.npz#2")
    got, _, err = run_cli(argv(out), capsys)
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    assert got == code
    assert (f"interrupted by {name}, but cannot write {out}/last.npz: no space left on device; last.npz "
            f"(end of epoch 1) and best.npz (epoch 1) are intact") in one_line(err)
    assert load_checkpoint(out / "last.npz").meta["epoch"] == 1
    assert verify_run(str(out)) == []


def test_full_disk_at_the_first_checkpoint_of_an_overwrite_keeps_the_old_run(reference, tmp_path, capsys, inject):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    inject("enospc@write:last.npz#1")
    code, _, err = run_cli(argv(out, "--overwrite", "--set", "seed=3"), capsys)
    assert code == 2
    assert f"no space left on device; the earlier run in {out} is untouched" in one_line(err)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".run.overwrite-")]


def test_a_real_write_failure_file_size_limit(reference, tmp_path):
    """The kernel refuses the write (EFBIG under RLIMIT_FSIZE): the same one line, no temporary file left."""
    pytest.importorskip("resource")
    out = tmp_path / "run"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000)); "
            "from fastcnn.cli import main; sys.argv[0] = 'fastcnn'; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, *argv(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert f"cannot write {out}/best.npz: file too large; no checkpoint was written yet" in line
    assert sorted(os.listdir(out)) == ["config.yaml"]  # no temporary file, no lock
    assert config_run_id(out / "config.yaml")
