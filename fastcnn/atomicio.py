"""Atomic file replacement helpers shared by checkpoints, downloads and run folders."""
import os


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
