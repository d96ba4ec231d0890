"""``mpiexec -n K fastcnn train``: one model trained by K processes, bit-identical to one process.

Real jobs under MPICH's mpiexec (the ``fastcnn[mpi]`` extra, installed by ``make test``): a plain
network and the layer zoo of test_determinism_training (batch norm, dropout, residual blocks, every
fused block) on the synthetic dataset, whose training set leaves a partial last batch. Every array
of last.npz (weights, buffers, optimizer state) must equal the one-process run's byte for byte for
K = 2 and 4, and so must the metrics; a resume with another K continues bit-identically; a killed
process ends the job instead of hanging it; mistakes are reported once.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_determinism_training import ZOO

from fastcnn.checkpoint import open_checkpoint

from conftest import REPO

pytest.importorskip("mpi4py")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists():  # pragma: no cover - the extra installs it
    pytest.skip("no mpiexec beside the Python of the tests (pip install 'fastcnn[mpi]')", allow_module_level=True)

FASTCNN = [sys.executable, "-m", "fastcnn"]
TIMEOUT = 600

PLAIN = {
    "seed": 1,
    "model": {"input_shape": [12, 12, 1], "num_classes": 5, "layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3},
        {"type": "relu"},
        {"type": "maxpool2d"},
        {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "dense", "units": 5},
    ]},
    # 300 = 2 x 128 + 44: the last batch is partial, and 44 images are shared by the processes too;
    # 1100 validation images: 3 batches of evaluation (500, 500, 100) shared by the processes.
    "data": {"dataset": "synthetic", "batch_size": 128, "num_train": 300, "num_test": 1100},
    "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.01}},
}

# The zoo: batch norm (after conv and dense), residual blocks, dropout, every fused block; 200 = 3 x 64 + 8.
BN = dict(ZOO, data={"dataset": "synthetic", "batch_size": 64, "num_train": 200, "num_test": 50},
          train=dict(ZOO["train"], epochs=2))

NETS = {"plain": PLAIN, "batchnorm": BN}


def _write_config(tmp_path, name, cfg):
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def _env(threads=1):
    env = dict(os.environ, PYTHONPATH=REPO, NUMBA_NUM_THREADS=str(threads))
    for key in list(env):
        if key.startswith(("PMI_", "OMPI_", "MV2_")):
            del env[key]
    return env


def _train(config, out, processes=1, *extra, threads=1, check=True, timeout=TIMEOUT):
    command = [*FASTCNN, "train", config, "--no-progress", "--set", f"output.dir={out}", *extra]
    if processes > 1:
        command = [str(MPIEXEC), "-n", str(processes), *command]
    proc = subprocess.run(command, env=_env(threads), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != "meta"}


def _metrics(run):
    timing = ("images_per_sec", "epoch_seconds")
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def _assert_same_run(a, b, what):
    ref, other = _arrays(Path(a) / "last.npz"), _arrays(Path(b) / "last.npz")
    assert sorted(ref) == sorted(other)
    differ = [k for k in ref if ref[k].tobytes() != other[k].tobytes()]
    assert not differ, f"{what}: {len(differ)} of {len(ref)} arrays differ (first: {differ[0]})"
    assert _metrics(a) == _metrics(b), what


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of each network (the reference), 2 threads."""
    tmp = tmp_path_factory.mktemp("mpi")
    runs = {}
    for name, cfg in NETS.items():
        config = _write_config(tmp, name, cfg)
        out = tmp / f"{name}-k1"
        _train(config, out, 1, threads=2)
        runs[name] = (config, out)
    return tmp, runs


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("net", sorted(NETS))
def test_k_processes_give_the_one_process_weights(one_process, net, processes):
    tmp, runs = one_process
    config, reference = runs[net]
    out = tmp / f"{net}-k{processes}"
    proc = _train(config, out, processes)
    _assert_same_run(reference, out, f"{net}, {processes} processes")
    # Rank 0 alone logs: one line per epoch, not one per process.
    assert proc.stdout.count("epoch 2/2:") == 1, proc.stdout
    with open_checkpoint(str(out / "last.npz")) as checkpoint:
        assert checkpoint.meta["processes"] == processes


def test_resume_with_another_number_of_processes(one_process):
    """Epoch 1 with 2 processes, epoch 2 resumed by 1 and by 3: the one-process run's weights."""
    tmp, runs = one_process
    config, reference = runs["batchnorm"]
    first = tmp / "resume-k2"
    _train(config, first, 2, "--set", "train.epochs=1")
    for k in (1, 3):
        out = tmp / f"resume-k2-then-k{k}"
        _train(config, out, k, "--resume", str(first / "last.npz"))
        _assert_same_run(reference, out, f"resumed by {k} process(es)")


@contextlib.contextmanager
def _long_job(tmp_path, name):
    """A 2-process job training for a long time, yielded (with its output folder) once rank 0 has
    written last.npz (training is under way on both processes); killed at the end if still alive."""
    config = _write_config(tmp_path, "long", dict(PLAIN, train=dict(PLAIN["train"], epochs=1000)))
    out = tmp_path / name
    command = [str(MPIEXEC), "-n", "2", *FASTCNN, "train", config, "--no-progress", "--set", f"output.dir={out}"]
    job = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not (out / "last.npz").exists():
            assert job.poll() is None and time.monotonic() < deadline, "the job never trained"
            time.sleep(0.5)
        yield job, out
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_a_killed_process_ends_the_job(tmp_path):
    with _long_job(tmp_path, "killed") as (job, out):
        ranks = subprocess.run(["pgrep", "-f", f"output.dir={out}"], capture_output=True, text=True).stdout.split()
        ranks = [int(p) for p in ranks if int(p) != job.pid]
        os.kill(max(ranks), signal.SIGKILL)  # one process of the two (not the launcher)
        killed = time.monotonic()
        job.communicate(timeout=60)
        assert time.monotonic() - killed < 30, "the job took more than 30 s to end"
        assert job.returncode != 0
    # The checkpoints written before stay good.
    assert _arrays(out / "last.npz")


def test_a_mistake_is_reported_once_with_exit_2(tmp_path):
    # A config mistake (seen by every process), then one only rank 0 checks (an earlier run's folder).
    config = _write_config(tmp_path, "bad", dict(PLAIN, data=dict(PLAIN["data"], batch_size=0)))
    proc = _train(config, tmp_path / "bad", 2, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("Error:") == 1 and "data.batch_size" in proc.stderr, proc.stderr
    config = _write_config(tmp_path, "short", dict(PLAIN, train=dict(PLAIN["train"], epochs=0)))
    _train(config, tmp_path / "run", 2)
    proc = _train(config, tmp_path / "run", 2, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("Error:") == 1 and "already holds a run" in proc.stderr, proc.stderr


def test_more_processes_than_the_last_batch_can_share_is_refused(tmp_path):
    # 130 = 128 + 2: a last batch of 2 images cannot be shared by 3 processes.
    config = _write_config(tmp_path, "small", dict(PLAIN, data=dict(PLAIN["data"], num_train=130)))
    proc = _train(config, tmp_path / "small", 3, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("Error:") == 1, proc.stderr
    assert "3 processes need at least 3 images in every batch" in proc.stderr
    assert not (tmp_path / "small").exists()


def test_ctrl_c_on_the_launcher_saves_once_and_exits_130(tmp_path):
    with _long_job(tmp_path, "interrupted") as (job, out):
        job.send_signal(signal.SIGINT)  # mpiexec forwards it to every process
        stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stdout + stderr
    assert stderr.count("Resume with: fastcnn train") == 1, stderr
    with open_checkpoint(str(out / "last.npz")) as checkpoint:
        assert checkpoint.meta["processes"] == 2 and checkpoint.meta["epoch"] >= 1


def test_a_signal_reaching_rank_0_alone_while_it_saves_stops_every_process(tmp_path):
    """Rank 0 gets SIGINT while it writes last.npz at the end of epoch 1, when the other process is
    already in the next step: all agree on the stop after rank 0's save (no hang), exit 130."""
    config = _write_config(tmp_path, "plain", dict(PLAIN, train=dict(PLAIN["train"], epochs=3)))
    out = tmp_path / "signal"
    command = [str(MPIEXEC), "-n", "2", *FASTCNN, "train", config, "--no-progress", "--set", f"output.dir={out}"]
    env = dict(_env(), FASTCNN_FAULT="sigint@tmp:last.npz#1")  # only rank 0 writes files
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert proc.stderr.count("Resume with: fastcnn train") == 1, proc.stderr
    with open_checkpoint(str(out / "last.npz")) as checkpoint:
        assert checkpoint.meta["epoch"] == 1 and checkpoint.meta["batch"] == 0


def test_a_failure_on_another_rank_at_start_is_reported_and_ends_every_process(tmp_path):
    """Rank 1 alone fails while loading (an I/O error injected there, as a dataset missing on its
    machine would): it reports the error naming its rank, every process exits, nothing hangs."""
    config = _write_config(tmp_path, "plain", PLAIN)
    train = [*FASTCNN, "train", config, "--no-progress", "--set", f"output.dir={tmp_path / 'run'}"]
    command = [str(MPIEXEC), "-n", "1", *train, ":", "-n", "1", "-env", "FASTCNN_FAULT", "eio@start:load", *train]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Error: process 1: internal error" in proc.stderr and "Input/output error" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
