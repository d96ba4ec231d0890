"""fastcnn.distributed: the process group of a training, checked in real MPICH jobs (``mpiexec -n 2``
and ``-n 4``, the ``fastcnn[mpi]`` extra that ``make test`` installs).

Every Group operation is checked inside the ranks (bit-exact gathers with uneven and zero counts,
broadcasts, reductions); the one-process group never imports mpi4py; a launcher without mpi4py
(or with another MPI) is one clear error; and a failing or killed rank ends the job in seconds.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fastcnn import distributed
from fastcnn.distributed import LocalGroup, MPIUnavailable, current_group, default_threads
from fastcnn.errors import UserError

from conftest import REPO

LAUNCHER_PREFIXES = ("PMI_", "OMPI_", "MV2_", "MPI_LOCAL", "HYDI_", "MPI4PY_")
TIMEOUT = 60


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = REPO
    env.update(extra)
    return env


def _python(tmp_path, code, *, env=None, name="script.py"):
    script = tmp_path / name
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], env=env or _env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def _mpiexec():
    pytest.importorskip("mpi4py")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():  # pragma: no cover - the extra installs it beside python
        pytest.skip("no mpiexec beside the Python of the tests (pip install 'fastcnn[mpi]')")
    return mpiexec


def _job(tmp_path, n, code, *args, name="ranks.py"):
    """Run ``code`` as ``mpiexec -n n python script args``; (completed process, seconds)."""
    mpiexec = _mpiexec()
    script = tmp_path / name
    script.write_text(textwrap.dedent(code))
    start = time.monotonic()
    done = subprocess.run([str(mpiexec), "-n", str(n), sys.executable, str(script), *map(str, args)],
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return done, time.monotonic() - start


# --- this process alone --------------------------------------------------------------------------

def test_local_group_is_the_identity(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1: an ordinary run
    group = current_group()
    assert isinstance(group, LocalGroup)
    assert (group.rank, group.size, group.local_size, group.is_root) == (0, 1, 1, True)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert group.allgather_rows(rows, [4]) is rows
    with pytest.raises(ValueError):
        group.allgather_rows(rows, [3])
    with pytest.raises(ValueError):
        group.allgather_rows(rows, [4, 0])
    arr = np.ones(3)
    assert group.bcast_array(arr) is arr
    assert group.bcast_bytes(b"abc") == b"abc" and group.bcast_bytes(bytearray(b"")) == b""
    with pytest.raises(ValueError):
        group.bcast_bytes(None)
    assert group.allreduce_max(-5) == -5 and group.allreduce_sum_int(2**40) == 2**40
    group.barrier()


def test_local_group_never_imports_mpi4py_and_abort_exits(tmp_path):
    done = _python(tmp_path, """
        import sys
        import fastcnn, fastcnn.cli, fastcnn.train
        from fastcnn.distributed import current_group, default_threads
        g = current_group()
        g.barrier(); g.allreduce_max(1); g.allgather_rows(__import__("numpy").zeros((2, 1)), [2])
        assert default_threads(g) >= 1
        assert "mpi4py" not in sys.modules, "mpi4py imported by a one-process run"
        print("unflushed output is written before the exit", end="")
        g.abort(3)
        print("not reached")
    """)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "unflushed output is written before the exit"


def test_default_threads_shares_the_cpus(monkeypatch):
    monkeypatch.setattr(distributed, "_cpu_set", lambda: set(range(16)))

    class Fake:
        local_size = 4

    assert default_threads(Fake()) == 4
    Fake.local_size = 32
    assert default_threads(Fake()) == 1
    Fake.cpu_sharers = 1  # the launcher bound each process to its own CPUs
    assert default_threads(Fake()) == 16
    assert default_threads(LocalGroup()) == 16


# --- started by a launcher, without a usable MPI -------------------------------------------------

REPORT = """
    import sys
    {hide}
    from fastcnn.errors import UserError
    from fastcnn.distributed import current_group
    try:
        current_group()
    except UserError as e:  # as the CLI does: one line from rank 0, exit 2 everywhere
        if not getattr(e, "quiet", False):
            print(f"Error: {{e}}", file=sys.stderr)
        sys.exit(2)
    print("no error")
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_launched_without_mpi4py_is_one_clear_error(tmp_path, rank):
    done = _python(tmp_path, REPORT.format(hide="sys.modules['mpi4py'] = None  # not installed"),
                   env=_env(PMI_SIZE="2", PMI_RANK=str(rank)))
    assert done.returncode == 2, done.stderr
    if rank == 0:
        assert done.stderr == ("Error: fastcnn was started as 2 processes by an MPI launcher (PMI_SIZE=2) "
                               "but mpi4py is not installed: pip install 'fastcnn[mpi]'\n")
    else:
        assert done.stderr == ""


def test_launched_without_mpi4py_by_mpiexec(tmp_path):
    done, _ = _job(tmp_path, 2, REPORT.format(hide="sys.modules['mpi4py'] = None  # not installed"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "started as 2 processes" in lines[0] and "pip install 'fastcnn[mpi]'" in lines[0]


def test_mpi4py_without_its_mpi_library(tmp_path):
    pytest.importorskip("mpi4py")
    env = _env(PMI_SIZE="2", PMI_RANK="0", MPI4PY_LIBMPI="/nonexistent/libmpi.so")
    done = _python(tmp_path, REPORT.format(hide=""), env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("Error: fastcnn was started as 2 processes by an MPI launcher (PMI_SIZE=2) but "
                                  "mpi4py cannot load an MPI library (cannot load MPI library)"), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_launcher_of_another_mpi_is_refused(tmp_path):
    # Open MPI's mpirun starting mpi4py-over-MPICH: every process would be a world of one.
    pytest.importorskip("mpi4py")
    done = _python(tmp_path, REPORT.format(hide=""), env=_env(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "started as 2 processes by an MPI launcher (OMPI_COMM_WORLD_SIZE=2)" in lines[0]
    assert "sees 1 process(es)" in lines[0] and "mpiexec" in lines[0]


def test_the_error_is_a_quiet_user_error_on_other_ranks():
    e = MPIUnavailable("x", 1)
    assert isinstance(e, UserError) and e.quiet and not MPIUnavailable("x", 0).quiet


# --- real jobs -----------------------------------------------------------------------------------

OPERATIONS = """
    import os, sys, traceback
    import numpy as np
    import fastcnn, fastcnn.distributed
    assert "mpi4py" not in sys.modules, "imported by import fastcnn"
    from fastcnn.distributed import MPIGroup, current_group, default_threads
    g = current_group()

    def check():
        assert "mpi4py" in sys.modules and isinstance(g, MPIGroup) and current_group() is g
        K = int(sys.argv[1])
        assert (g.size, g.is_root, g.local_size, g.cpu_sharers) == (K, g.rank == 0, K, K)
        assert g.rank == int(os.environ["PMI_RANK"])
        assert default_threads(g) == max(1, len(os.sched_getaffinity(0)) // K)

        def rows(rank, count, rest, dtype):
            rng = np.random.default_rng(1000 + rank)
            bits = rng.integers(0, 256, size=(count, *rest, np.dtype(dtype).itemsize), dtype=np.uint8)
            return bits.view(dtype).reshape(count, *rest)  # every bit pattern: NaN payloads, -0.0, denormals

        for dtype in (np.float32, np.float64, np.int32, np.int64, np.uint8):
            for rest in ((), (3,), (2, 5, 4), (0,)):
                for counts in ([3, 0, 5, 1, 2, 0][:K], [0] * K, [7000] * K):
                    local = rows(g.rank, counts[g.rank], rest, dtype)
                    got = g.allgather_rows(local, counts)
                    want = np.concatenate([rows(r, counts[r], rest, dtype) for r in range(K)])
                    assert got.dtype == dtype and got.shape == want.shape and got.flags.c_contiguous
                    assert got.tobytes() == want.tobytes(), (dtype, rest, counts)
                    assert got is not local
        # a non-contiguous view is sent as its values
        full = np.arange(6 * 4, dtype=np.float64).reshape(6, 4) + 100 * g.rank
        got = g.allgather_rows(full[:, ::2], [6] * K)
        want = np.concatenate([(np.arange(24.0).reshape(6, 4) + 100 * r)[:, ::2] for r in range(K)])
        assert np.array_equal(got, want)

        for root in (0, K - 1):
            for dtype in (np.float32, np.float64, np.int64):
                arr = np.full((4, 3), g.rank, dtype=dtype)
                assert g.bcast_array(arr, root=root) is arr and (arr == root).all()
            for data in (b"", b"fastcnn", bytes(range(256)) * 4096):
                got = g.bcast_bytes(data if g.rank == root else None, root=root)
                assert type(got) is bytes and got == data
        try:
            g.bcast_bytes(None)  # the root has nothing to send: every rank raises, none waits
        except ValueError:
            pass
        else:
            raise AssertionError("bcast_bytes(None) on the root")

        assert g.allreduce_max(g.rank * 7 - 3) == (K - 1) * 7 - 3
        assert g.allreduce_max(-(2**40) - g.rank) == -(2**40)
        assert g.allreduce_sum_int(2**40 + g.rank) == K * 2**40 + K * (K - 1) // 2
        g.barrier()
        print(f"OK {g.rank}", flush=True)


    try:
        check()
    except BaseException:  # a failed check ends every rank at once: none waits in a collective
        traceback.print_exc()
        g.abort(1)
"""


@pytest.mark.parametrize("n", [2, 4])
def test_every_operation_in_a_real_job(tmp_path, n):
    done, _ = _job(tmp_path, n, OPERATIONS, n)
    assert done.returncode == 0, done.stdout + done.stderr
    # mpiexec forwards the ranks' output in chunks, not lines: "OK 0OK 1\n\n" happens
    assert sorted(re.findall(r"OK (\d+)", done.stdout)) == [str(r) for r in range(n)], done.stdout + done.stderr


FAILING = """
    import os, signal, sys, time
    import numpy as np
    from fastcnn.distributed import current_group
    g = current_group()
    how = sys.argv[1]
    try:
        if g.rank == 1:
            time.sleep(0.3)  # the others are waiting in the collective by now
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("rank 1 failed")
        g.allgather_rows(np.zeros((1, 4)), [1] * g.size)
        print("collective completed without rank 1", flush=True)
    except BaseException as e:
        print(f"Error: process {g.rank}: {e}", file=sys.stderr, flush=True)
        g.abort(2 if how == "raise2" else 1)
"""


@pytest.mark.parametrize("how, code", [("raise", 1), ("raise2", 2)])
def test_a_failing_rank_ends_the_job_through_abort(tmp_path, how, code):
    done, seconds = _job(tmp_path, 2, FAILING, how)
    assert done.returncode == code, done.stdout + done.stderr
    assert seconds < 10
    assert done.stderr == "Error: process 1: rank 1 failed\n"  # MPICH's own Abort line is silenced
    assert "completed" not in done.stdout


def test_a_killed_rank_ends_the_job(tmp_path):
    done, seconds = _job(tmp_path, 2, FAILING, "kill")
    assert done.returncode != 0 and seconds < 20, (done.returncode, seconds)
    assert "completed" not in done.stdout


def test_the_launcher_forwards_sigint_to_every_rank(tmp_path):
    # Ctrl-C on mpiexec: each rank gets SIGINT (a rank inside a collective only once it returns).
    mpiexec = _mpiexec()
    script = tmp_path / "wait.py"
    script.write_text(textwrap.dedent("""
        import time
        from fastcnn.distributed import current_group
        g = current_group()
        g.barrier()
        try:
            print(f"ready {g.rank}", flush=True)
            time.sleep(30)
        except KeyboardInterrupt:
            print(f"interrupted {g.rank}", flush=True)
            g.barrier()  # every rank got it: they leave together
            raise SystemExit(130)
    """))
    job = subprocess.Popen([str(mpiexec), "-n", "2", sys.executable, str(script)], env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen = ""
        deadline = time.monotonic() + TIMEOUT
        while seen.count("ready") < 2 and time.monotonic() < deadline:
            char = job.stdout.read(1)
            if not char:
                break
            seen += char
        assert seen.count("ready") == 2, seen
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 130, err
    assert "interrupted 0" in out and "interrupted 1" in out
