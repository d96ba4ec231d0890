"""Reading untrusted files with bounds, and writing JSON that is JSON.

Everything here checks before it allocates: a file must be a regular file (a
FIFO would block forever, ``/dev/zero`` never ends) of at most a given size;
an ``.npy`` header's shape must agree with the bytes that follow it; an
``.npz`` archive's members are inspected (names, declared sizes, ``.npy``
headers) before any of them is inflated, so a zip bomb or a header declaring
a billion elements is refused without reading its data. Parsed JSON is depth
limited. Problems are ``UnsafeFile`` (a ValueError) with a message that does
not repeat the path: callers prefix it and raise their own UserError.

Non-finite floats are not JSON: :func:`json_safe` turns them into ``null``
wherever fastcnn prints JSON (metrics.jsonl, ``--json``).
"""
from __future__ import annotations

import json
import math
import os
import stat
import zipfile

import numpy as np

__all__ = ["UnsafeFile", "ObjectArray", "NotRegularFile", "file_kind", "open_regular", "read_regular", "npy_header",
           "NpzIndex", "inspect_npz", "check_json_depth", "json_loads_bounded", "json_safe", "dumps_json"]

MAX_NPY_HEADER = 10_000          # numpy's own default limit for the header text
MAX_NPY_BYTES = 4 << 30          # an .npy input file (fastcnn predict)
MAX_IMAGE_PIXELS = 1 << 25       # one PNG/JPEG (32 M pixels): checked from its header before decoding
MAX_JSON_DEPTH = 64              # nesting of objects/lists in a checkpoint's meta
MAX_ZIP_MEMBERS = 100_000
# An .npz may inflate to at most this much more than its size on disk (fastcnn writes them uncompressed:
# np.savez; a compressed one of float weights shrinks little).
ZIP_INFLATE_SLACK = 256 << 20
ZIP_INFLATE_RATIO = 20


class UnsafeFile(ValueError):
    """A file that is not what it must be; the message names the problem, not the path."""


class ObjectArray(UnsafeFile):
    """An .npy (or .npz entry ``key``) holding Python objects: loading it would unpickle."""

    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


class NotRegularFile(UnsafeFile):
    """A folder, FIFO, device or socket where a regular file is needed."""


def file_kind(mode: int) -> str:
    """'a folder', 'a FIFO (named pipe)', ... for an st_mode that is not a regular file."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path, limit: int | None = None):
    """Open ``path`` for binary reading if it is a regular file of at most ``limit`` bytes.

    Opened without blocking (a FIFO does not hang the open), then checked on the
    open descriptor (no race with a file swapped in between). Raises
    FileNotFoundError / PermissionError / other OSError as ``open`` does,
    NotRegularFile, or UnsafeFile when larger than ``limit``. Returns (file, size).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(os.fspath(path), flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"is {file_kind(st.st_mode)}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise UnsafeFile(f"is {st.st_size:,} bytes, more than the {limit:,} allowed")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    f, _ = open_regular(path, limit)
    with f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise UnsafeFile(f"is more than the {limit:,} bytes allowed")
    return data


def npy_header(f, max_bytes: int | None = None):
    """Read an .npy header from file object ``f``: (shape, fortran_order, dtype, header length).

    Refuses object dtypes (pickles) and shapes whose data would exceed ``max_bytes``.
    Leaves ``f`` positioned at the start of the data.
    """
    fmt = np.lib.format
    start = f.tell() if hasattr(f, "tell") else 0
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
        else:
            raise UnsafeFile(f"unsupported .npy format version {version}")
    except UnsafeFile:
        raise
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise UnsafeFile(f"not a valid .npy header ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                         ) from None
    if dtype.hasobject:
        raise ObjectArray("holds object arrays (pickled data); refusing to load it")
    if any(not isinstance(s, int) or s < 0 for s in shape):
        raise UnsafeFile(f"not a valid .npy header (shape {shape})")
    count = 1
    for s in shape:
        count *= s
    nbytes = count * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise UnsafeFile(f"its header declares an array of shape {shape} ({nbytes:,} bytes), more than the "
                         f"{max_bytes:,} bytes the file holds")
    header_len = (f.tell() if hasattr(f, "tell") else 0) - start
    return tuple(shape), fortran, dtype, header_len, nbytes


class NpzIndex:
    """What an .npz holds, read from its directory and .npy headers only: ``arrays`` {key: (shape, dtype)}."""

    def __init__(self, arrays: dict, total_bytes: int):
        self.arrays, self.total_bytes = arrays, total_bytes


def inspect_npz(f, file_size: int, max_total: int | None = None,
                limits: dict | None = None) -> NpzIndex:
    """Check every member of the .npz open as ``f`` without inflating any data.

    Each member must be an ``.npy`` (no pickles) whose header agrees with its
    declared uncompressed size; the declared sizes together must stay within
    ``max_total`` (default: what the file could honestly hold: its size plus
    ZIP_INFLATE_SLACK, or ZIP_INFLATE_RATIO times its size). ``limits``: {key:
    bytes} caps for single members (e.g. the meta string).
    """
    if max_total is None:
        max_total = max(file_size + ZIP_INFLATE_SLACK, ZIP_INFLATE_RATIO * file_size)
    try:
        z = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UnsafeFile(f"not a readable .npz archive ({e})") from None
    with z:
        infos = z.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise UnsafeFile(f"holds {len(infos):,} entries (at most {MAX_ZIP_MEMBERS:,})")
        declared = sum(i.file_size for i in infos)
        if declared > max_total:
            raise UnsafeFile(f"its entries would inflate to {declared:,} bytes, more than the {max_total:,} "
                             f"allowed for a file of {file_size:,} bytes (a zip bomb?)")
        arrays = {}
        for info in infos:
            name = info.filename
            key = name[:-4] if name.endswith(".npy") else name
            if key in arrays:
                raise UnsafeFile(f"holds the entry {key!r} twice")
            try:
                with z.open(info) as member:
                    shape, _, dtype, header_len, nbytes = npy_header(member, max_bytes=info.file_size)
            except ObjectArray as e:
                raise ObjectArray(f"entry {key!r}: {e}", key) from None
            except UnsafeFile as e:
                raise UnsafeFile(f"entry {key!r}: {e}") from None
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
                raise UnsafeFile(f"entry {key!r} is unreadable ({type(e).__name__}: {e})") from None
            if header_len + nbytes != info.file_size:
                raise UnsafeFile(f"entry {key!r}: its header declares {nbytes:,} bytes of data but the entry "
                                 f"holds {info.file_size - header_len:,}")
            cap = (limits or {}).get(key)
            if cap is not None and nbytes > cap:
                raise UnsafeFile(f"entry {key!r} is {nbytes:,} bytes (at most {cap:,})")
            arrays[key] = (shape, dtype)
    return NpzIndex(arrays, declared)


def check_json_depth(value, max_depth: int = MAX_JSON_DEPTH) -> None:
    """UnsafeFile when lists/objects nest deeper than ``max_depth`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise UnsafeFile(f"nests deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children)


def json_loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads, refusing nesting deeper than ``max_depth`` (RecursionError included) as UnsafeFile."""
    try:
        value = json.loads(text, object_hook=_decode_nonfinite)
    except RecursionError:
        raise UnsafeFile(f"nests deeper than {max_depth} levels") from None
    check_json_depth(value, max_depth)
    return value


# -- non-finite numbers --------------------------------------------------------
# In metrics.jsonl and --json output a NaN or infinity is null. Inside a checkpoint's meta (which a
# resume must restore exactly, e.g. a plateau schedule's best loss) it is {"__float__": "nan"}.
_NONFINITE_TAG = "__float__"


def _decode_nonfinite(obj):
    if len(obj) == 1 and _NONFINITE_TAG in obj and obj[_NONFINITE_TAG] in ("nan", "inf", "-inf"):
        return float(obj[_NONFINITE_TAG])
    return obj


def _walk(value, leaf):
    if isinstance(value, dict):
        return {k: _walk(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, leaf) for v in value]
    if isinstance(value, np.ndarray):
        return _walk(value.tolist(), leaf)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return leaf(value)
    return value


def json_safe(value):
    """``value`` with every NaN/Inf float replaced by None (numpy scalars and arrays made plain)."""
    return _walk(value, lambda v: None)


def dumps_json(value, **kwargs) -> str:
    """Strict JSON text (never a bare NaN or Infinity): non-finite numbers become null."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def dumps_meta(value) -> str:
    """JSON for a checkpoint's meta: non-finite numbers tagged so that they load back as they were."""
    return json.dumps(_walk(value, lambda v: {_NONFINITE_TAG: repr(v)}), allow_nan=False)


def read_npy_bounded(f, file_size: int):
    """An .npy array from the open regular file ``f`` of ``file_size`` bytes, its header checked first."""
    shape, fortran, dtype, header_len, nbytes = npy_header(f, max_bytes=max(file_size, 0))
    if header_len + nbytes != file_size:
        raise UnsafeFile(f"its header declares {nbytes:,} bytes of data but the file holds "
                         f"{file_size - header_len:,}")
    if dtype.itemsize == 0:
        return np.empty(shape, dtype)
    data = bytearray(nbytes)
    if f.readinto(data) != nbytes:
        raise UnsafeFile("truncated .npy data")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)

