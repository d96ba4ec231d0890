"""The process group a training runs in: this process alone, or the K processes an MPI launcher started.

``current_group()`` gives a :class:`LocalGroup` (size 1; mpi4py is never imported) unless an MPI
launcher started several processes (:func:`fastcnn.launcher.launched_world`); then an
:class:`MPIGroup` over mpi4py, imported only then (``pip install 'fastcnn[mpi]'``: mpi4py 4.1.2 over
MPICH 5.0.2 from PyPI, whose ``mpiexec`` lands beside the venv's python). Both offer the same
numpy-only operations; every transfer uses mpi4py's buffer (uppercase) calls, never pickle.

Facts about MPICH 5.0.2's hydra ``mpiexec`` (measured on the 2-core dev VM, as root, 2 and 4 ranks):

* It needs no flag as root and runs more ranks than cores (``mpiexec -n 4`` on 2 cores); it binds
  no rank to a core (each sees the whole affinity mask). Start-up of ``mpiexec -n K python -c
  "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"``: 0.13 s (K=1), 0.23 s (K=2), 0.37 s (K=4).
* Each rank's environment gets ``PMI_SIZE``, ``PMI_RANK``, ``PMI_FD``, ``PMI_HOSTNAME``,
  ``MPI_LOCALNRANKS`` (ranks on this node), ``MPI_LOCALRANKID``, ``HYDI_CONTROL_FD`` and
  ``GFORTRAN_UNBUFFERED_PRECONNECTED=y``. ``mpiexec -n 1`` sets ``PMI_SIZE=1``: an ordinary run.
* A rank waiting in a blocking collective busy-polls (100 % of a core) and runs no Python signal
  handler until the collective returns.
* mpiexec's exit code is the bitwise OR of the ranks' exit codes (2 and 2 -> 2, 0 and 2 -> 2,
  1 and 2 -> 3); a rank killed by a signal gives that signal's number (SIGKILL -> 9).

What ends a job and what hangs it (2 ranks, the other rank waiting in ``Allreduce``):

* ``Comm.Abort(code)`` on one rank ends every rank at once (0.9 s for the whole job, 0.5 s of it
  the script's own sleep); mpiexec exits ``code``. MPICH prints one line to stderr
  (``Abort(7) on node 1 (rank 1 in comm 0): application called MPI_Abort(...)``), which
  :meth:`MPIGroup.abort` silences: the caller has reported the reason. What a rank printed just
  before its Abort can lose its last chunk (the final newline of a flushed message was missing in
  1 of 20 runs on the loaded VM): ``abort`` waits ``ABORT_GRACE_S`` (0.2 s) after flushing.
* A rank killed by SIGKILL: mpiexec kills the others and exits 9 within 0.1 s.
* A rank that ends *without* MPI_Finalize (``os._exit``): mpiexec kills the others at once and
  exits with that code, also 0 (``os._exit(0)`` -> mpiexec 0 although the job did not finish).
* A rank that ends normally while another waits in a collective **hangs the job**: Python's exit
  (an uncaught exception, ``sys.exit(2)``, ``sys.exit(0)``) runs mpi4py's atexit MPI_Finalize, which
  waits for the other ranks forever, and the waiting rank spins. Hence: a failure on one rank must
  end the job with :meth:`Group.abort` (``try: ... except BaseException: group.abort(1)``), or
  run the script as ``python -m mpi4py script.py``, which aborts on an uncaught exception.
* SIGINT, SIGTERM, SIGUSR1 to mpiexec are forwarded to every rank as the same signal within
  milliseconds (SIGINT: "Sending Ctrl-C to processes as requested", a second Ctrl-C forces an
  abort); mpiexec then exits 128+signal (130, 143, 138) once the ranks are gone. A rank that
  leaves on the signal while another sits in a collective hangs the job as above until a second
  Ctrl-C. SIGHUP kills mpiexec itself (no forwarding); its proxy then ends the ranks within 1 s.
"""
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np

from .launcher import MultiProcessLaunch, launched_world

MPI_EXTRA = "pip install 'fastcnn[mpi]'"
# Seconds MPIGroup.abort waits after flushing, so that mpiexec forwards what this process printed.
ABORT_GRACE_S = 0.2


class MPIUnavailable(MultiProcessLaunch):
    """Started by an MPI launcher as several processes, but they cannot form one MPI world (mpi4py
    or its MPI library missing, or an MPI that does not match the launcher). A UserError (exit 2);
    ``quiet`` on ranks other than 0, so the reason is printed once."""


class Group:
    """The processes of one training (ranks ``0 .. size-1``; rank 0 is the root).

    Collective operations must be called by every rank of the group in the same order.
    Arrays are numpy arrays of a numeric dtype (float32, float64, int32, int64, ...).
    """

    rank: int = 0
    size: int = 1
    local_size: int = 1  # processes of this group on this node (this one included)
    cpu_sharers: int = 1  # processes of this group on this node whose CPU sets overlap this one's

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def _check_rows(self, local: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        if not isinstance(local, np.ndarray) or local.ndim < 1:
            raise ValueError("allgather_rows: local must be a numpy array of at least one dimension")
        if len(counts) != self.size:
            raise ValueError(f"allgather_rows: {len(counts)} counts for a group of {self.size} processes")
        if any(int(c) < 0 for c in counts):
            raise ValueError(f"allgather_rows: negative count in {list(counts)}")
        if local.shape[0] != int(counts[self.rank]):
            raise ValueError(f"allgather_rows: rank {self.rank} holds {local.shape[0]} rows, "
                             f"counts say {int(counts[self.rank])}")
        return np.ascontiguousarray(local)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}, {self.local_size} on this node>"


class LocalGroup(Group):
    """This process alone: every collective is the identity, and nothing imports mpi4py."""

    def allgather_rows(self, local: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        self._check_rows(local, counts)
        return local

    def bcast_array(self, arr: np.ndarray, root: int = 0) -> np.ndarray:
        _check_root(root, 1)
        return arr

    def bcast_bytes(self, data: Optional[bytes], root: int = 0) -> bytes:
        _check_root(root, 1)
        if data is None:
            raise ValueError("bcast_bytes: the root passed None")
        return bytes(data)

    def allreduce_max(self, value: int) -> int:
        return int(value)

    def allreduce_sum_int(self, value: int) -> int:
        return int(value)

    def barrier(self) -> None:
        pass

    def idle_barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        _flush()
        os._exit(int(code))


class MPIGroup(Group):
    """The K processes of an MPI job (a duplicate of ``MPI.COMM_WORLD``, so no other MPI traffic
    of the process can mix with the group's). Building one is collective."""

    def __init__(self, MPI, comm=None):
        self._MPI = MPI
        self._comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            self.local_size = node.Get_size()
            self.cpu_sharers = _cpu_sharers(MPI, node)
        finally:
            node.Free()

    def allgather_rows(self, local: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """Every rank's ``local`` rows, concatenated in rank order (Allgatherv): a new array of
        ``sum(counts)`` rows. ``local`` has ``counts[rank]`` rows (zero allowed); dtype and the
        shape of a row must be the same on every rank."""
        local = self._check_rows(local, counts)
        rest = local.shape[1:]
        row = int(np.prod(rest, dtype=np.int64))
        counts = [int(c) for c in counts]
        out = np.empty((sum(counts), *rest), dtype=local.dtype)
        sizes = [c * row for c in counts]
        displs = np.concatenate(([0], np.cumsum(sizes[:-1], dtype=np.int64))).tolist()
        mpitype = self._mpitype(local.dtype)
        self._comm.Allgatherv([local, sizes[self.rank], mpitype], [out, sizes, displs, mpitype])
        return out

    def bcast_array(self, arr: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite ``arr`` (C-contiguous, writable; same shape and dtype everywhere) with the
        root's values, in place; returns it."""
        _check_root(root, self.size)
        if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError("bcast_array: arr must be a C-contiguous, writable numpy array")
        self._comm.Bcast([arr, arr.size, self._mpitype(arr.dtype)], root=root)
        return arr

    def bcast_bytes(self, data: Optional[bytes], root: int = 0) -> bytes:
        """The root's ``data`` on every rank (the others pass None). The length goes first; a root
        that passes None makes every rank raise ValueError (no rank is left waiting)."""
        _check_root(root, self.size)
        length = np.array([-1 if data is None or self.rank != root else len(data)], dtype=np.int64)
        self._comm.Bcast([length, 1, self._MPI.INT64_T], root=root)
        n = int(length[0])
        if n < 0:
            raise ValueError("bcast_bytes: the root passed None")
        buf = bytearray(data) if self.rank == root else bytearray(n)
        if n:
            self._comm.Bcast([buf, n, self._MPI.BYTE], root=root)
        return bytes(buf)

    def allreduce_max(self, value: int) -> int:
        return self._allreduce_int(value, self._MPI.MAX)

    def allreduce_sum_int(self, value: int) -> int:
        return self._allreduce_int(value, self._MPI.SUM)

    def barrier(self) -> None:
        self._comm.Barrier()

    def idle_barrier(self, poll_s: float = 0.005) -> None:
        """A barrier that sleeps while it waits instead of spinning: for waits that may be long (rank 0
        compiling the kernels or writing a checkpoint), so that the waiting ranks leave the cores to
        it and run their Python signal handlers (Ctrl-C) meanwhile."""
        request = self._comm.Ibarrier()
        while not request.Test():
            time.sleep(poll_s)

    def abort(self, code: int = 1) -> None:
        """End every process of the job now (MPI_Abort); mpiexec exits ``code``. Call it when this
        rank fails alone: leaving normally would hang the job (see the module docstring). MPICH's
        own "Abort(code) on node ..." line is not printed: report the reason before calling."""
        _flush()
        # mpiexec forwards each process's output in chunks; Abort ends the job at once, and the last
        # chunk (the reason just printed, or its final newline) is sometimes lost without a pause.
        time.sleep(ABORT_GRACE_S)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        except OSError:
            pass
        self._MPI.COMM_WORLD.Abort(int(code))
        os._exit(int(code))  # not reached

    def _allreduce_int(self, value: int, op) -> int:
        buf = np.array([int(value)], dtype=np.int64)
        self._comm.Allreduce(self._MPI.IN_PLACE, [buf, 1, self._MPI.INT64_T], op=op)
        return int(buf[0])

    def _mpitype(self, dtype: np.dtype):
        dtype = np.dtype(dtype)
        mpitype = self._MPI._typedict.get(dtype.char) if dtype.isnative and dtype.kind in "biufc" else None
        if mpitype is None:
            raise ValueError(f"unsupported dtype for an MPI transfer: {dtype}")
        return mpitype


_GROUP: Optional[MPIGroup] = None


def current_group() -> Group:
    """The group of this process: a LocalGroup unless an MPI launcher started several processes;
    then the MPIGroup of all of them (made once per process, collectively, on first call).

    Raises MPIUnavailable (a UserError, exit 2, printed by rank 0 only) when the launcher's
    processes cannot form one MPI world: mpi4py or its MPI library is missing, or the MPI that
    mpi4py loads is not the launcher's (each process would see a world of one)."""
    global _GROUP
    world = launched_world()
    if world is None:
        return LocalGroup()
    if _GROUP is not None:
        return _GROUP
    size_var, size, rank = world
    started = f"started as {size} processes by an MPI launcher ({size_var}={size})"
    try:
        with warnings.catch_warnings():
            # mpi4py warns when the launcher's variables are another MPI's; the size check below says it once.
            warnings.simplefilter("ignore", RuntimeWarning)
            from mpi4py import MPI
    except ImportError:
        raise MPIUnavailable(f"fastcnn was {started} but mpi4py is not installed: {MPI_EXTRA}", rank) from None
    except (RuntimeError, OSError) as e:  # mpi4py found no MPI library to load
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MPIUnavailable(f"fastcnn was {started} but mpi4py cannot load an MPI library ({first}): "
                             f"{MPI_EXTRA}", rank) from None
    world_size = MPI.COMM_WORLD.Get_size()
    if world_size != size:
        raise MPIUnavailable(
            f"fastcnn was {started} but its MPI ({MPI.Get_library_version().splitlines()[0].strip()}) sees "
            f"{world_size} process(es): the launcher is not the one of the MPI that mpi4py uses; start with "
            f"{os.path.join(os.path.dirname(sys.executable), 'mpiexec')}", rank)
    _GROUP = MPIGroup(MPI)
    return _GROUP


def default_threads(group: Group) -> int:
    """Numba threads for one process of ``group`` by default: its share of the CPUs it may run on,
    so that the group's processes on one node do not oversubscribe it. The CPUs are this process's
    affinity set (``os.sched_getaffinity``, else ``os.cpu_count()``), shared with the processes of
    the group on this node whose sets overlap it (all of them unless the launcher binds ranks)."""
    sharers = getattr(group, "cpu_sharers", None) or group.local_size
    return max(1, usable_cpu_count() // max(1, int(sharers)))


def _cpu_set() -> set:
    if hasattr(os, "sched_getaffinity"):
        try:
            return set(os.sched_getaffinity(0))
        except OSError:
            pass
    return set(range(os.cpu_count() or 1))


def usable_cpu_count() -> int:
    """CPUs this process may run on: its affinity set, else all (``os.cpu_count()``)."""
    return max(1, len(_cpu_set()))


def _cpu_sharers(MPI, node) -> int:
    """How many processes of the node communicator ``node`` may run on a CPU this one may run on
    (this one included): all of them when the launcher binds none, 1 when it binds each apart."""
    if node.Get_size() == 1:
        return 1
    mine = _cpu_set()
    width = np.array([max(mine) + 1], dtype=np.int64)
    node.Allreduce(MPI.IN_PLACE, [width, 1, MPI.INT64_T], op=MPI.MAX)
    mask = np.zeros(int(width[0]), dtype=np.uint8)
    mask[sorted(mine)] = 1
    masks = np.empty((node.Get_size(), mask.size), dtype=np.uint8)
    node.Allgather([mask, mask.size, MPI.UNSIGNED_CHAR], [masks, mask.size, MPI.UNSIGNED_CHAR])
    return int(np.count_nonzero((masks & mask).any(axis=1)))


def _check_root(root: int, size: int) -> None:
    if not 0 <= int(root) < size:
        raise ValueError(f"root {root} is not a rank of a group of {size} processes")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
