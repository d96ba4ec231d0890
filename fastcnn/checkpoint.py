"""Checkpoints: one .npz of plain arrays plus a JSON ``meta`` string.

Keys: ``layers.<i>.<name>`` (model state; ``layers.<i>.<...>.<name>`` for nested layers),
``optim.<...>`` (optimizer state),
``meta`` (JSON: resolved config, epoch, step, metrics, RNG state, version).
Written atomically (temporary file in the same folder, fsync, rename), read
with ``allow_pickle=False``: a checkpoint never runs code. Reading checks
before it allocates (see :func:`open_checkpoint`): a hostile file is refused
with one line, never inflated or allocated first. Non-finite numbers in the
meta are stored as ``{"__float__": "nan"}`` (strict JSON) and read back as floats.
"""
import io
import os

import numpy as np

from . import __version__
from .atomicio import atomic_write_bytes
from .errors import CheckpointError
from .safeio import NotRegularFile, UnsafeFile, dumps_meta, inspect_npz, json_loads_bounded, open_regular

FORMAT_VERSION = 1
MAX_META_CHARS = 16 << 20  # a meta of a few thousand epochs of history is well under 1 MB


def save_checkpoint(path, model_state, optim_state=None, meta=None):
    """Save {key: array} model state, optimizer state (prefixed ``optim.``) and meta (JSON-able dict)."""
    arrays = dict(model_state)
    for key, value in (optim_state or {}).items():
        arrays[f"optim.{key}"] = np.asarray(value)
    meta = dict(meta or {})
    meta.setdefault("fastcnn_version", __version__)
    meta.setdefault("format", FORMAT_VERSION)
    arrays["meta"] = np.array(dumps_meta(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


class Checkpoint:
    """A loaded checkpoint: ``model`` {key: array}, ``optim`` {key: array}, ``meta`` dict."""

    def __init__(self, path, model, optim, meta):
        self.path, self.model, self.optim, self.meta = path, model, optim, meta


class CheckpointFile:
    """An opened, inspected checkpoint whose arrays are not read yet.

    ``meta`` (dict) and ``shapes`` ({key: shape} of every array, from the .npy
    headers) are known; :meth:`check_shapes` compares them with a model before
    anything is allocated; :meth:`load` reads the arrays (and closes the file).
    """

    def __init__(self, path, f, meta, shapes, dtypes):
        self.path, self._f, self.meta, self.shapes, self.dtypes = path, f, meta, shapes, dtypes

    def check_shapes(self, expected, prefix=""):
        """CheckpointError naming the first key of ``expected`` ({key: shape}) stored with another shape."""
        for key, shape in expected.items():
            stored = self.shapes.get(prefix + key)
            if stored is not None and tuple(stored) != tuple(shape):
                raise CheckpointError(f"{prefix}{key}: shape {tuple(stored)} in the state, {tuple(shape)} "
                                      f"in the model")

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def load(self):
        """Read the arrays: a Checkpoint. Their sizes were checked when the file was opened."""
        path = self.path
        try:
            with np.load(self._f, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files if key != "meta"}
        except Exception as e:  # noqa: BLE001 - untrusted bytes: zipfile and numpy raise many kinds
            raise CheckpointError(f"{path}: not a valid checkpoint (unreadable or truncated: "
                                  f"{type(e).__name__}: {str(e)[:200]})".replace("\n", " ")) from None
        finally:
            self.close()
        model = {k: v for k, v in arrays.items() if k.startswith("layers.")}
        optim = {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}
        for key, value in model.items():
            if value.dtype.kind != "f":
                raise CheckpointError(f"{path}: {key} has dtype {value.dtype}, expected floats")
        return Checkpoint(path, model, optim, self.meta)


def open_checkpoint(path):
    """Open and check a checkpoint without reading its arrays: a CheckpointFile (CheckpointError if bad).

    Only a regular file is opened (a FIFO or a device is refused, never read);
    every member must be an .npy array (never a pickle) whose header agrees
    with its size, and all of them together may inflate to little more than
    the file's size (a zip bomb is refused before any inflating); the meta is
    at most MAX_META_CHARS characters of JSON nested at most MAX_JSON_DEPTH deep.
    """
    path = os.fspath(path)
    try:
        f, size = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except NotRegularFile as e:
        if os.path.isdir(path):
            raise CheckpointError(f"checkpoint path is a folder, not a file: {path}") from None
        raise CheckpointError(f"{path}: {e}; a checkpoint is an .npz file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    try:
        if size == 0:
            raise CheckpointError(f"checkpoint file is empty: {path}")
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"{path}: not a fastcnn checkpoint (not an .npz archive)")
        f.seek(0)
        try:
            index = inspect_npz(f, size, limits={"meta": 4 * MAX_META_CHARS})
        except UnsafeFile as e:
            raise CheckpointError(f"{path}: not a valid checkpoint ({e})") from None
        if "meta" not in index.arrays:
            raise CheckpointError(f"{path}: not a fastcnn checkpoint (no 'meta' entry)")
        shape, dtype = index.arrays["meta"]
        if dtype.kind != "U" or shape != ():
            raise CheckpointError(f"{path}: corrupt 'meta' entry (expected a JSON string, got an array of "
                                  f"{dtype} {shape})")
        meta = _read_meta(f, path)
        shapes = {k: s for k, (s, _) in index.arrays.items() if k != "meta"}
        dtypes = {k: d for k, (_, d) in index.arrays.items() if k != "meta"}
        f.seek(0)
        return CheckpointFile(path, f, meta, shapes, dtypes)
    except BaseException:
        f.close()
        raise


def _read_meta(f, path):
    f.seek(0)
    try:
        with np.load(f, allow_pickle=False) as data:
            text = str(data["meta"][()])
    except Exception as e:  # noqa: BLE001 - untrusted bytes
        raise CheckpointError(f"{path}: not a valid checkpoint (unreadable or truncated: "
                              f"{type(e).__name__}: {str(e)[:200]})".replace("\n", " ")) from None
    try:
        meta = json_loads_bounded(text)
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt 'meta' entry ({str(e)[:200]})") from None
    return meta


def load_checkpoint(path):
    """Read a checkpoint; CheckpointError (one clear line) for anything that is not a good one."""
    return open_checkpoint(path).load()
