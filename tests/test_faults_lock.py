"""A run owns its folder: one run at a time (a lock, released on exit, stale ones taken over), and
--overwrite that replaces the earlier run only once the new one has its first checkpoint."""
import os
import signal
import subprocess
import sys

import pytest

from fastcnn.checkpoint import load_checkpoint
from fastcnn.errors import UserError
from fastcnn.rundir import LOCK_NAME, RunInUse, RunLock, config_run_id, verify_run

from conftest import REPO, SMALL_CONFIG, run_cli


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
    return ["train", SMALL_CONFIG, "--set", f"output.dir={out_dir}", "--set", "train.epochs=2",
            "--set", "data.num_train=64", "--set", "data.batch_size=16", "--threads", "1", "--no-progress", *extra]


def one_line(err):
    assert err.startswith("Error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_two_runs_on_one_folder(tmp_path, capsys):
    """The second run is refused (naming the first one's pid) and the first one's files stay its own."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastcnn", *argv(out, "--set", "train.epochs=1000")]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("epoch 1/"):
                break
        for extra in ([], ["--overwrite"], ["--resume", str(out / "last.npz")]):
            code, _, err = run_cli(argv(out, *extra, "--set", "seed=5"), capsys)
            assert code == 2, extra
            assert f"output.dir: {out} is in use by another fastcnn run (pid {first.pid}" in one_line(err)
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert verify_run(str(out)) == []
    last = load_checkpoint(out / "last.npz")
    assert last.meta["config"]["seed"] == 0 and config_run_id(out / "config.yaml") == last.meta["run_id"]
    assert not (out / LOCK_NAME).exists()


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(RunInUse, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    a.release()
    assert not (tmp_path / LOCK_NAME).exists()
    b = RunLock(tmp_path).acquire()
    assert b.stale is None
    b.release()


def test_lock_released_in_a_folder_moved_meanwhile(tmp_path):
    """The lock file goes with the folder and is removed there; a lock file that is not ours is left alone."""
    run, moved = tmp_path / "run", tmp_path / "moved"
    run.mkdir()
    lock = RunLock(run).acquire()
    os.rename(run, moved)
    lock.release()
    assert os.listdir(moved) == []
    os.rename(moved, run)
    lock = RunLock(run).acquire()
    os.unlink(run / LOCK_NAME)
    (run / LOCK_NAME).write_text("pid=1 host=elsewhere started=2020-01-01T00:00:00\n")  # another run's
    lock.release()
    assert (run / LOCK_NAME).read_text().startswith("pid=1 ")


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid=999999999 host=elsewhere started=2020-01-01T00:00:00\n")
    code, text, err = run_cli(argv(out), capsys)
    assert code == 0, err
    assert "took over the lock of an earlier run that no longer runs (pid 999999999)" in text
    assert not (out / LOCK_NAME).exists()
    assert verify_run(str(out), complete=True) == []


def test_lock_released_after_an_error(tmp_path, capsys, monkeypatch):
    from fastcnn import faults

    monkeypatch.setattr(faults, "_RULES", faults._parse("enospc@write:last.npz"))
    out = tmp_path / "run"
    code, _, err = run_cli(argv(out), capsys)
    assert code == 2
    assert not (out / LOCK_NAME).exists()


def test_a_run_finishing_in_the_folder_while_this_one_starts(tmp_path, monkeypatch):
    """Checked again once the lock is held: never a second run's files over the first's."""
    from fastcnn import train as train_module
    from fastcnn.config import load_config

    out = tmp_path / "run"
    original = train_module.load_data

    def load_data(cfg, progress=True):
        out.mkdir(exist_ok=True)
        (out / "last.npz").write_bytes(b"another run's checkpoint")
        return original(cfg, progress)

    monkeypatch.setattr(train_module, "load_data", load_data)
    cfg = load_config(SMALL_CONFIG, [f"output.dir={out}", "data.num_train=64"])
    with pytest.raises(UserError, match="written while this one started"):
        train_module.Trainer(cfg, progress=False, log=lambda *a: None).run()
    assert (out / "last.npz").read_bytes() == b"another run's checkpoint"
    assert not (out / LOCK_NAME).exists()


# -- --overwrite -------------------------------------------------------------------------


@pytest.fixture
def earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(argv(out), capsys)
    assert code == 0, err
    return out, {n: (out / n).read_bytes() for n in os.listdir(out)}


def _staging(out):
    return [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.overwrite-")]


def test_overwrite_that_fails_to_start_keeps_the_earlier_run(earlier_run, capsys):
    out, before = earlier_run
    code, _, err = run_cli(argv(out, "--overwrite", "--set", "data.validation=0.999"), capsys)
    assert code == 2 and "data.validation" in one_line(err)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert not _staging(out)


@pytest.mark.parametrize("signum, code, words", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_overwrite_interrupted_before_its_first_checkpoint_keeps_the_earlier_run(earlier_run, capsys, monkeypatch,
                                                                                 signum, code, words):
    from fastcnn import train as train_module

    def warm_up(*args, **kwargs):  # a signal while the kernels load, before training handles signals
        signal.raise_signal(signum)

    monkeypatch.setattr(train_module, "warm_up", warm_up)
    out, before = earlier_run
    got, _, err = run_cli(argv(out, "--overwrite"), capsys)
    assert got == code and one_line(err) == f"Error: {words}"
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert not _staging(out)


def test_overwrite_that_diverges_in_its_first_epoch_keeps_the_earlier_run(earlier_run, capsys):
    out, before = earlier_run
    code, _, err = run_cli(argv(out, "--overwrite", "--set", "train.optimizer.lr=1e30"), capsys)
    import re

    assert code == 1
    assert re.search(r"training diverged at step \d+ \(epoch 1, batch \d+\)", err)
    assert f"the earlier run in {out} is untouched" in one_line(err)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_overwrite_replaces_the_whole_folder(earlier_run, capsys):
    out, before = earlier_run
    (out / "notes.txt").write_text("a file of the earlier run")
    code, text, err = run_cli(argv(out, "--overwrite", "--set", "seed=7"), capsys)
    assert code == 0, err
    assert "Replaced the earlier run" in text
    assert load_checkpoint(out / "last.npz").meta["config"]["seed"] == 7
    assert not (out / "notes.txt").exists()  # the folder is the new run's, whole
    assert verify_run(str(out), complete=True) == []
    mode = os.stat(out).st_mode & 0o777
    assert mode == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_into_a_folder_of_another_run(earlier_run, tmp_path, capsys):
    """--resume never writes one run's checkpoints beside another's; with --overwrite it replaces that run."""
    other, before = earlier_run
    source = tmp_path / "source"
    code, _, err = run_cli(argv(source, "--set", "train.epochs=1", "--set", "seed=3"), capsys)
    assert code == 0, err
    resumed = argv(other, "--set", "seed=3", "--resume", str(source / "last.npz"))
    code, _, err = run_cli(resumed, capsys)
    assert code == 2 and "holds another run than the one resumed (last.npz of run" in one_line(err)
    assert {n: (other / n).read_bytes() for n in os.listdir(other)} == before
    code, _, err = run_cli(resumed + ["--overwrite"], capsys)
    assert code == 0, err
    assert verify_run(str(other), complete=True) == []
    last = load_checkpoint(other / "last.npz")
    assert last.meta["run_id"] == load_checkpoint(source / "last.npz").meta["run_id"]
    assert [r["epoch"] for r in last.meta["history"]] == [1, 2]


def test_overwrite_that_cannot_create_its_folder_keeps_the_earlier_run(earlier_run, capsys, monkeypatch):
    import errno
    import tempfile

    def mkdtemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    out, before = earlier_run
    code, _, err = run_cli(argv(out, "--overwrite"), capsys)
    assert code == 2
    assert (f"--overwrite: cannot create the new run's folder beside {out} (in {out.parent}): permission denied; "
            f"the earlier run is untouched") in one_line(err)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
