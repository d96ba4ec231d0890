"""A run owns its output folder: an exclusive lock, --overwrite by folder swap, output errors in one line.

- :class:`RunLock`: ``<output.dir>/.fastcnn.lock``, held with ``flock`` for the
  whole run (the kernel drops it when the process dies, kill -9 included, so a
  lock file left by a dead run is stale and simply taken over). A second run
  on the same folder stops with :class:`RunInUse`.
- :class:`RunFolder`: where a run writes. ``--overwrite`` builds the new run
  in a hidden sibling folder (``.<name>.overwrite-XXXX``) and swaps it with
  the old one only once its first checkpoint is written (one atomic
  ``renameat2(RENAME_EXCHANGE)`` on Linux), so a run that fails to start
  never destroys the previous one. Leftovers of killed runs (such sibling
  folders, ``.last.npz.*.tmp`` files of an interrupted save) are removed when
  the next run takes the lock.
- :class:`OutputError`: an OSError on the output side (full disk,
  permissions, a folder in the way, a vanished folder) as one line naming the
  file; ``exit_code`` 2, or 130/143 when it happened while saving after a signal.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import tempfile
import time

from . import faults
from .atomicio import fsync_dir
from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: an exclusive-create lock file with a pid check instead
    fcntl = None

LOCK_NAME = ".fastcnn.lock"
RUN_FILES = ("last.npz", "best.npz", "metrics.jsonl", "config.yaml", "curves.png")
_TMP = re.compile(r"^\.(?:%s)\..+\.tmp$" % "|".join(re.escape(n) for n in RUN_FILES))


class OutputError(UserError):
    """Writing the run's output failed; one line, ``exit_code`` 2 (or 128 + signal when saving after one)."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


class RunInUse(UserError):
    """Another live fastcnn run holds the output folder's lock."""


def describe_oserror(e: OSError, path: str) -> str:
    """What went wrong writing ``path``, in words (no errno numbers)."""
    code = getattr(e, "errno", None)
    folder = os.path.dirname(os.path.abspath(path))
    if code == errno.ENOSPC:
        return "no space left on device"
    if code == getattr(errno, "EDQUOT", -1):
        return "disk quota exceeded"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(path):
        return "a folder of that name is in the way (move it away)"
    if code == errno.ENOENT and not os.path.isdir(folder):
        return f"the folder {folder} no longer exists (moved or deleted while the run was writing)"
    if code == errno.ENOTDIR:
        return "a file is in the way where a folder should be"
    return (e.strerror or str(e)).lower() if (e.strerror or str(e)) else type(e).__name__


# -- the lock --------------------------------------------------------------------------
def _owner(text: str) -> dict:
    out = {}
    for part in text.split():
        key, _, value = part.partition("=")
        if value:
            out[key] = value
    return out


def _open_folder(folder: str):
    """A descriptor of ``folder`` to remove files in it by name wherever it is moved; None where unsupported."""
    if os.stat not in os.supports_dir_fd or os.unlink not in os.supports_dir_fd:
        return None
    try:
        return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder (``<folder>/.fastcnn.lock``); see the module doc."""

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd = None
        self._dir_fd = None  # the folder itself: it follows the folder if it is moved while the run holds it
        self.stale = None  # the owner record of a dead run whose lock file was taken over

    def acquire(self, wait: bool = False) -> "RunLock":
        """Take the lock or raise RunInUse (OSError when the folder cannot be written)."""
        if fcntl is None:
            return self._acquire_exclusive()
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunInUse(self._in_use_message()) from None
                raise
            try:  # the file we locked must still be the one at the path (a releasing run unlinks it)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._dir_fd = _open_folder(self.folder)
                break
            os.close(fd)
        else:
            raise RunInUse(self._in_use_message())
        previous = _owner(os.pread(self.fd, 4096, 0).decode("utf-8", "replace"))
        if previous.get("pid") and previous.get("pid") != str(os.getpid()):
            self.stale = previous
        self._write_owner()
        return self

    def check_free(self) -> None:
        """RunInUse when a live run holds this folder's lock; creates and changes nothing."""
        if fcntl is None:
            owner = self._read_owner()
            pid = owner.get("pid", "")
            if pid.isdigit() and _alive(int(pid)):
                raise RunInUse(self._in_use_message())
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or unreadable: acquire() reports it)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInUse(self._in_use_message()) from None
        finally:
            os.close(fd)

    def try_acquire(self) -> bool:
        """Take the lock if it is free (True), else False; never raises RunInUse."""
        try:
            self.acquire()
        except RunInUse:
            return False
        return True

    def _write_owner(self):
        record = (f"pid={os.getpid()} host={socket.gethostname()} "
                  f"started={time.strftime('%Y-%m-%dT%H:%M:%S')}\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)

    def _acquire_exclusive(self):
        for _ in range(20):
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._read_owner()
                pid = owner.get("pid", "")
                if pid.isdigit() and not _alive(int(pid)) and owner.get("host") in (None, socket.gethostname()):
                    self.stale = owner
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise RunInUse(self._in_use_message()) from None
            self._write_owner()
            return self
        raise RunInUse(self._in_use_message())

    def _read_owner(self) -> dict:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return _owner(f.read(4096))
        except OSError:
            return {}

    def _in_use_message(self) -> str:
        owner = self._read_owner()
        who = ""
        if owner.get("pid"):
            who = f" (pid {owner['pid']}" + (f" on {owner['host']}" if owner.get("host") else "") + \
                  (f", started {owner['started']}" if owner.get("started") else "") + ")"
        return (f"output.dir: {self.folder} is in use by another fastcnn run{who}; wait for it to end, "
                f"or pass --set output.dir=OTHER")

    def release(self) -> None:
        """Remove the lock file (where the folder is now, if it was moved meanwhile) and drop the lock.

        Only the file this lock holds is removed, never one another run created at the same name.
        """
        if self.fd is None:
            return
        try:
            held = os.fstat(self.fd)
            if self._dir_fd is not None:
                found = os.stat(LOCK_NAME, dir_fd=self._dir_fd, follow_symlinks=False)
                if (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino):
                    os.unlink(LOCK_NAME, dir_fd=self._dir_fd)
            else:
                found = os.stat(self.path, follow_symlinks=False)
                if (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino):
                    os.unlink(self.path)
        except OSError:
            pass
        for fd in (self.fd, self._dir_fd):
            if fd is not None:
                try:
                    os.close(fd)  # (the lock file's: drops the flock)
                except OSError:
                    pass
        self.fd = self._dir_fd = None


# -- atomic exchange of two folders ------------------------------------------------
def _renameat2_exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError, ImportError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)):
        return False
    raise OSError(code, os.strerror(code), b)


def exchange_folders(a: str, b: str) -> None:
    """Afterwards ``a`` holds what ``b`` held and the reverse; atomic where the system allows it."""
    if _renameat2_exchange(a, b):
        return
    # Fallback (not Linux): two renames, with a short moment in which ``b`` does not exist.
    aside = a + ".swap"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def remove_stale_temporaries(folder: str) -> int:
    """Delete the temporary files (``.last.npz.XXXX.tmp``...) of saves that a kill interrupted."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if _TMP.match(name):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed


def staging_prefix(path: str) -> tuple:
    """(parent folder, name prefix) of the sibling folders --overwrite stages a new run in."""
    path = os.path.abspath(path)
    return os.path.dirname(path), f".{os.path.basename(path)}.overwrite-"


def remove_stale_staging(path: str) -> int:
    """Delete staging folders of killed --overwrite runs of ``path`` (those whose lock is free)."""
    parent, prefix = staging_prefix(path)
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        folder = os.path.join(parent, name)
        if os.path.islink(folder) or not os.path.isdir(folder):
            continue
        lock = RunLock(folder)
        try:
            if not lock.try_acquire():
                continue
        except OSError:
            continue
        try:
            shutil.rmtree(folder)
            removed += 1
        except OSError:
            pass
        finally:
            lock.release()
    return removed


class RunFolder:
    """Where a run writes: its output folder (locked), or a staging folder until an --overwrite commits.

    ``mode``: 'fresh' (empty or new folder), 'resume', or 'overwrite' (the folder holds an earlier run
    that is replaced, by a folder swap, once this run has written its first checkpoint).
    """

    def __init__(self, path: str, mode: str):
        self.path = os.fspath(path)
        self.mode = mode
        self.write_dir = self.path
        self.staging = None
        self.committed = mode != "overwrite"
        self._locks = []
        self.notes = []

    def file(self, name: str) -> str:
        """Where ``name`` is written now (the staging folder before an --overwrite commits)."""
        return os.path.join(self.write_dir, name)

    def final(self, name: str) -> str:
        """Where ``name`` is once the run has committed: in output.dir."""
        return os.path.join(self.path, name)

    def open(self) -> None:
        """Create and lock the folder(s); remove leftovers of killed runs. OSError / RunInUse on failure."""
        os.makedirs(self.path, exist_ok=True)
        lock = RunLock(self.path).acquire()
        self._locks.append(lock)
        if lock.stale:
            self.notes.append(f"took over the lock of an earlier run that no longer runs "
                              f"(pid {lock.stale.get('pid')})")
        faults.hit("start:after-lock")
        staged = remove_stale_staging(self.path)
        if staged:
            self.notes.append(f"removed {staged} staging folder(s) of an interrupted --overwrite run")
        tmp = remove_stale_temporaries(self.path)
        if tmp:
            self.notes.append(f"removed {tmp} temporary file(s) of an interrupted save")
        if self.mode == "overwrite":
            parent, prefix = staging_prefix(self.path)
            try:
                self.staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
            except OSError as e:
                raise UserError(f"--overwrite: cannot create the new run's folder beside {self.path} (in {parent}): "
                                f"{describe_oserror(e, parent)}; the earlier run is untouched (remove it by hand, "
                                f"or pass --set output.dir=OTHER)") from None
            try:
                os.chmod(self.staging, stat.S_IMODE(os.stat(self.path).st_mode))
                self._locks.append(RunLock(self.staging).acquire())
            except BaseException:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
                raise
            self.write_dir = self.staging

    def commit(self) -> None:
        """--overwrite: the new run has its first checkpoint; swap its folder in, remove the old run."""
        if self.committed:
            return
        faults.hit("overwrite:before-swap")
        exchange_folders(self.staging, self.path)
        self.committed = True
        self.write_dir = self.path
        old_lock, new_lock = self._locks
        old, self.staging = self.staging, None
        # The folders traded places, and their lock files with them (both still held by this process).
        new_lock.folder, new_lock.path = self.path, os.path.join(self.path, LOCK_NAME)
        old_lock.folder, old_lock.path = old, os.path.join(old, LOCK_NAME)
        self._locks = [new_lock]
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        faults.hit("overwrite:after-swap")
        shutil.rmtree(old, ignore_errors=True)  # the earlier run, now in the staging folder
        old_lock.release()

    def close(self) -> None:
        """Release the locks; an --overwrite that never committed leaves the old run as it was."""
        if self.staging is not None and not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []


# -- checking a run folder ---------------------------------------------------------------
def config_run_id(path: str):
    """The run id in config.yaml's first line (``# fastcnn <version>, run <id>``), or None."""
    try:
        with open(path, "rb") as f:
            first = f.readline(200).decode("utf-8", "replace")
    except OSError:
        return None
    match = re.match(r"# fastcnn \S+, run (\w+)", first)
    return match.group(1) if match else None


def verify_run(path: str, complete: bool = False) -> list:
    """Problems with the files of a run folder (an empty list: they agree). Used by the fault tests.

    At any instant, killed or not: every file loads; last.npz, best.npz and config.yaml name the same
    run; best.npz is the best epoch of last.npz's history (or of the one epoch after it, which a resume
    recomputes); metrics.jsonl is strict JSON and last.npz's history, or one epoch short of it; no
    epoch appears twice. ``complete`` (the run exited normally): metrics.jsonl is the whole history,
    and no lock, temporary file or staging folder is left.
    """
    import json

    from .checkpoint import load_checkpoint
    from .errors import UserError
    from .safeio import json_safe

    def reject(constant):
        raise ValueError(f"bare {constant} in JSON")

    problems = []
    if not os.path.isdir(path):
        return [f"{path}: the run folder is missing"]
    names = set(os.listdir(path))
    loaded = {}
    for name in ("last.npz", "best.npz"):
        if name in names:
            try:
                loaded[name] = load_checkpoint(os.path.join(path, name))
            except UserError as e:
                problems.append(f"{name} does not load: {e}")
    last, best = loaded.get("last.npz"), loaded.get("best.npz")
    history = list(last.meta.get("history", [])) if last else []
    run_id = last.meta.get("run_id") if last else None
    if best is not None and last is not None and best.meta.get("run_id") != run_id:
        problems.append(f"best.npz is of run {best.meta.get('run_id')}, last.npz of run {run_id}")
    if "config.yaml" in names and last is not None:
        cid = config_run_id(os.path.join(path, "config.yaml"))
        if cid != run_id:
            problems.append(f"config.yaml is of run {cid}, last.npz of run {run_id}")
    if last is None and "metrics.jsonl" in names:  # (best.npz alone: a kill between the epoch's two saves)
        problems.append("metrics.jsonl without last.npz")
    if best is not None and last is not None:
        b_hist = list(best.meta.get("history", []))
        b_epoch = best.meta.get("epoch")
        if len(b_hist) <= len(history):
            prefix_ok = json_safe(b_hist) == json_safe(history[:len(b_hist)])
        else:
            prefix_ok = len(b_hist) == len(history) + 1 and json_safe(b_hist[:-1]) == json_safe(history)
        longer = b_hist if len(b_hist) > len(history) else history
        from .train import best_epoch

        if not prefix_ok:
            problems.append("best.npz's history is not last.npz's (or one epoch longer)")
        elif best_epoch(longer) != b_epoch or best.meta.get("batch", 0) != 0:
            problems.append(f"best.npz holds epoch {b_epoch}, but the best epoch of the history is "
                            f"{best_epoch(longer)}")
        elif (b_epoch == len(history) and last.meta.get("epoch") == b_epoch and not last.meta.get("batch")):
            import numpy as np

            for key, value in last.model.items():
                if key not in best.model or not np.array_equal(value, best.model[key]):
                    problems.append(f"best.npz and last.npz hold the same epoch {b_epoch} but differ in {key}")
                    break
    elif last is not None and history and best is None:
        problems.append(f"last.npz has {len(history)} finished epoch(s) but there is no best.npz")
    if "metrics.jsonl" in names:
        try:
            with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as f:
                lines = f.read().splitlines()
            records = [json.loads(line, parse_constant=reject) for line in lines]
        except (OSError, ValueError) as e:
            problems.append(f"metrics.jsonl is not strict JSON lines: {e}")
            records = None
        if records is not None:
            epochs = [r.get("epoch") for r in records]
            if len(set(epochs)) != len(epochs):
                problems.append(f"metrics.jsonl repeats an epoch: {epochs}")
            want = json.loads(json.dumps(json_safe(history)))
            if records != want[:len(records)] or len(records) < len(want) - (0 if complete else 1):
                problems.append(f"metrics.jsonl (epochs {epochs}) is not last.npz's history "
                                f"(epochs {[r.get('epoch') for r in want]})")
    elif complete and history:
        problems.append("no metrics.jsonl")
    if complete:
        leftovers = sorted(n for n in names if _TMP.match(n) or n == LOCK_NAME)
        if leftovers:
            problems.append(f"left behind: {', '.join(leftovers)}")
        parent, prefix = staging_prefix(path)
        staged = [n for n in os.listdir(parent) if n.startswith(prefix)]
        if staged:
            problems.append(f"staging folder(s) left behind: {', '.join(staged)}")
    return problems
