"""A launcher's environment without the job behind it (``PMI_SIZE=4`` set by hand, or Open MPI's
variables around mpi4py over MPICH): `fastcnn train` refuses before it writes anything, exit 2, the
reason printed by rank 0 only. Each copy would otherwise be a world of one training on its own; with
mpi4py installed fastcnn.distributed sees MPI's world of 1 against the launcher's 4, without it it
says mpi4py is missing (tests/test_distributed.py). Real jobs: tests/test_distributed.py."""
import os
import subprocess
import sys

import pytest

from fastcnn.launcher import launched_world

from conftest import REPO

LAUNCHERS = [  # (size variable, rank variable): Open MPI, MPICH / Intel MPI / Slurm PMI, MVAPICH
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMI_SIZE", "PMI_RANK"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),
]


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not any(k in pair for pair in LAUNCHERS)}
    env["PYTHONPATH"] = REPO
    return env


def _train(tmp_path, extra_env):
    out = tmp_path / "run"
    env = {**_clean_env(), **extra_env}
    cmd = [sys.executable, "-m", "fastcnn", "train", os.path.join(REPO, "configs", "synthetic_small.yaml"),
           "--set", f"output.dir={out}", "--set", "train.epochs=1", "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600), out


@pytest.mark.parametrize("size_var, rank_var", LAUNCHERS)
def test_several_processes_are_refused_before_anything_is_written(tmp_path, size_var, rank_var):
    first, out = _train(tmp_path, {size_var: "4", rank_var: "0"})
    assert first.returncode == 2
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and "started as 4 processes by an MPI launcher" in lines[0], first.stderr
    assert f"{size_var}=4" in lines[0] and "Traceback" not in first.stderr
    assert not out.exists()
    other, out = _train(tmp_path, {size_var: "4", rank_var: "3"})
    assert other.returncode == 2 and other.stderr.strip() == "" and not out.exists()


def test_a_world_of_one_process_trains(tmp_path):
    done, out = _train(tmp_path, {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0", "PMI_SIZE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "last.npz").is_file()


def test_launched_world(monkeypatch):
    for size_var, rank_var in LAUNCHERS:
        monkeypatch.delenv(size_var, raising=False)
        monkeypatch.delenv(rank_var, raising=False)
    assert launched_world() is None
    monkeypatch.setenv("PMI_SIZE", "junk")
    assert launched_world() is None
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    assert launched_world() == ("PMI_SIZE", 2, 1)


