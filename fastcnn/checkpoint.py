"""Checkpoints: one .npz of plain arrays plus a JSON ``meta`` string.

Keys: ``layers.<i>.<name>`` (model state; ``layers.<i>.<...>.<name>`` for nested layers),
``optim.<...>`` (optimizer state),
``meta`` (JSON: resolved config, epoch, step, metrics, RNG state, version).
Written atomically (temporary file in the same folder, fsync, rename), read
with ``allow_pickle=False``: a checkpoint never runs code.
"""
import io
import json
import os
import tempfile

import numpy as np

from . import __version__
from .errors import CheckpointError

FORMAT_VERSION = 1


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file private (0600); give it the permissions any other new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(path, model_state, optim_state=None, meta=None):
    """Save {key: array} model state, optimizer state (prefixed ``optim.``) and meta (JSON-able dict)."""
    arrays = dict(model_state)
    for key, value in (optim_state or {}).items():
        arrays[f"optim.{key}"] = np.asarray(value)
    meta = dict(meta or {})
    meta.setdefault("fastcnn_version", __version__)
    meta.setdefault("format", FORMAT_VERSION)
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


class Checkpoint:
    """A loaded checkpoint: ``model`` {key: array}, ``optim`` {key: array}, ``meta`` dict."""

    def __init__(self, path, model, optim, meta):
        self.path, self.model, self.optim, self.meta = path, model, optim, meta


def load_checkpoint(path):
    """Read a checkpoint; CheckpointError (one clear line) for anything that is not a good one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not a fastcnn checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{path}: not a fastcnn checkpoint (a single .npy array, not an .npz)")
            arrays = {key: data[key] for key in data.files}
    except CheckpointError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CheckpointError(f"{path}: holds object arrays (pickled data); refusing to load it") from None
        raise CheckpointError(f"{path}: not a valid checkpoint ({e})") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: zipfile and numpy raise many kinds
        raise CheckpointError(f"{path}: not a valid checkpoint (unreadable or truncated: "
                              f"{type(e).__name__}: {str(e)[:200]})".replace("\n", " ")) from None
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # a zip member that is not an .npy file
            raise CheckpointError(f"{path}: entry {key!r} is not an array; not a fastcnn checkpoint")
    if "meta" not in arrays:
        raise CheckpointError(f"{path}: not a fastcnn checkpoint (no 'meta' entry)")
    try:
        meta_array = arrays.pop("meta")
        if meta_array.dtype.kind != "U" or meta_array.shape != ():
            raise ValueError(f"expected a JSON string, got an array of {meta_array.dtype} {meta_array.shape}")
        meta = json.loads(str(meta_array[()]))
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt 'meta' entry ({e})") from None
    model = {k: v for k, v in arrays.items() if k.startswith("layers.")}
    optim = {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}
    for key, value in model.items():
        if value.dtype.kind != "f":
            raise CheckpointError(f"{path}: {key} has dtype {value.dtype}, expected floats")
    return Checkpoint(path, model, optim, meta)
