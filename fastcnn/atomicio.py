"""Atomic file replacement, the one way fastcnn writes a file that must never be half written.

Checkpoints, plots, exported models, run files and downloads: the bytes go to a temporary file in
the destination's folder, are fsync'ed, and replace the destination with ``os.replace``; the folder
is then fsync'ed so the rename survives a power cut. A crash leaves the old file or the new one,
never half of one; an error removes the temporary file.

Fault-injection points (fastcnn/faults.py): ``write:<name>`` before the temporary file is created,
``tmp:<name>`` after it is written and synced, before it replaces ``<name>``.
"""
import os
import tempfile

from . import faults


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk; best effort where the OS refuses."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file beside ``path`` that replaces ``path`` when its ``with`` block ends cleanly.

    Creating it (the constructor) raises OSError when the folder cannot be written, before any
    data is produced; the ``with`` block yields the binary file object. On an exception inside the
    block the temporary file is removed and ``path`` is untouched. Temporary names are
    ``.<name>.<random><suffix>`` (hidden, recognizable for clean-up).
    """

    def __init__(self, path, suffix: str = ".tmp"):
        self.path = os.fspath(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))
        self.name = os.path.basename(self.path)
        faults.hit(f"write:{self.name}", self.path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=suffix, dir=self.folder)
        try:
            # mkstemp makes the file private (0600); give it the permissions any other new file gets.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            self.file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self._remove_tmp()
            raise

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                faults.hit(f"tmp:{self.name}", self.path)
                os.replace(self.tmp, self.path)
        except BaseException:
            self._remove_tmp()
            raise
        if exc_type is not None:
            self._remove_tmp()
            return False
        fsync_dir(self.folder)
        return False

    def _remove_tmp(self):
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    with AtomicFile(path) as f:
        f.write(data)
