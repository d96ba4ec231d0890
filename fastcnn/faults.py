"""Fault injection for the fault tests: named write points where a process can be made to fail.

Off unless the environment variable ``FASTCNN_FAULT`` is set (it is read
once, at import). Its value is a comma-separated list of ``ACTION@POINT`` or
``ACTION@POINT#N`` (only the N-th time the point is reached, counting from
1), with ACTION one of:

- ``kill``: the process sends itself SIGKILL (no handler, no cleanup runs);
- ``sigint`` / ``sigterm``: the process sends itself SIGINT / SIGTERM (as Ctrl-C or a scheduler
  would, at a known point);
- ``enospc`` / ``eacces`` / ``eio``: an OSError (no space left on device,
  permission denied, input/output error) is raised at that point.

Points (see fastcnn/train.py, fastcnn/checkpoint.py, fastcnn/rundir.py):
``write:<file>`` before a file's temporary copy is written, ``tmp:<file>``
after it is written and synced but before it replaces ``<file>``,
``epoch-end:after-best``, ``epoch-end:after-last``,
``epoch-end:after-metrics``, ``overwrite:before-swap``,
``overwrite:after-swap``, ``start:load`` (every process of a multi-process run, before it
loads the model and data), ``start:after-lock``, ``start:after-config``, ``signal-save:before``.

    FASTCNN_FAULT='kill@epoch-end:after-best#2' fastcnn train ...
"""
from __future__ import annotations

import errno
import os
import signal

_ERRNO = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "eio": errno.EIO}


def _parse(text):
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        action, _, point = item.partition("@")
        point, _, nth = point.partition("#")
        rules.append((action, point, int(nth) if nth.isdigit() else None))
    return rules


_RULES = _parse(os.environ.get("FASTCNN_FAULT", ""))
_HITS: dict = {}


def hit(point: str, path: str | None = None) -> None:
    """The process reached ``point``: do what FASTCNN_FAULT says for it (nothing when unset)."""
    if not _RULES:
        return
    count = _HITS[point] = _HITS.get(point, 0) + 1
    for action, where, nth in _RULES:
        if where != point or (nth is not None and nth != count):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action in ("sigint", "sigterm"):
            os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)
        if action in _ERRNO:
            code = _ERRNO[action]
            raise OSError(code, os.strerror(code), path)
