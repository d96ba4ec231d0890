"""Read and write IDX files (the MNIST format), gzip-compressed or not.

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian uint32 sizes, then the elements in row-major order
(big-endian for multi-byte types). MNIST images are magic 2051
(``0x00000803``: uint8, 3 dimensions), labels 2049 (uint8, 1 dimension).

Compression is detected from the gzip magic bytes (``0x1f 0x8b``), not from
the file name, so a ``.gz`` name holding plain IDX (or the reverse) still reads.
Every problem with a file is a :class:`~fastcnn.errors.DataError` whose
message starts with the file's path.
"""
import gzip
import os
import zlib

import numpy as np

from fastcnn.errors import DataError

__all__ = ["read_idx", "write_idx", "read_idx_images", "read_idx_labels",
           "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC"]

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> big-endian dtype.
_TYPE_TO_DTYPE = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_TO_TYPE = {
    (np.dtype(np.uint8).kind, 1): 0x08,
    (np.dtype(np.int8).kind, 1): 0x09,
    ("i", 2): 0x0B,
    ("i", 4): 0x0C,
    ("f", 4): 0x0D,
    ("f", 8): 0x0E,
}
_MAX_NDIM = 16  # IDX allows 255; anything above this is surely not an IDX file


MAX_DATA_FILE = 1 << 30  # bytes of one data file (IDX, CIFAR-10 batch), on disk or after gunzip


def read_file(path, what, limit=MAX_DATA_FILE):
    """A data file's bytes; DataError naming the file (``what``: the kind of file expected).

    Only a regular file of at most ``limit`` bytes is read (a FIFO would block, a device never end).
    """
    from fastcnn.safeio import NotRegularFile, UnsafeFile, read_regular

    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected {what}") from None
    except NotRegularFile as e:
        raise DataError(f"{path}: {e}, expected {what}") from None
    except UnsafeFile as e:
        raise DataError(f"{path}: {e} for {what}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


class _Bytes:
    """Reads a file's content in pieces: plain, or gunzipped as it is read (never more than asked)."""

    def __init__(self, data):
        self.gzip = data[:2] == GZIP_MAGIC
        self.data, self.pos = data, 0
        if self.gzip:
            self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.tail = data

    def read(self, n):
        if not self.gzip:
            out = self.data[self.pos:self.pos + n]
            self.pos += len(out)
            return out
        out = bytearray()
        while len(out) < n:
            if self.d.eof:
                rest = self.d.unused_data
                if rest[:2] == GZIP_MAGIC:  # a further gzip member
                    self.d, self.tail = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
                    continue
                if rest.strip(b"\0"):
                    raise zlib.error("data after the end of the gzip stream")
                break
            if not self.tail:
                raise EOFError
            chunk = self.d.decompress(self.tail, n - len(out))
            self.tail = self.d.unconsumed_tail
            out += chunk
            if not chunk and not self.tail and not self.d.eof:
                raise EOFError
        return bytes(out)


def read_idx(path, *, expect_magic=None):
    """Read an IDX file (gzip or raw) into a native-endian, writable ndarray.

    ``expect_magic``: if given (e.g. 2051 for images, 2049 for labels), a file
    with any other magic number is an error. A gzip file is inflated only as far
    as its header says (at most MAX_DATA_FILE bytes): a gzip bomb is refused,
    not inflated.
    """
    path = os.fspath(path)
    stream = _Bytes(read_file(path, "an IDX file"))
    try:
        return _parse_idx(path, stream, expect_magic)
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (the compressed stream ends early)") from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e})") from None


def _parse_idx(path, stream, expect_magic):
    data = stream.read(4)
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected at least 4)")
    magic = int.from_bytes(data[:4], "big")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in _TYPE_TO_DTYPE or not 1 <= ndim <= _MAX_NDIM:
        hint = f" (expected {expect_magic})" if expect_magic is not None else ""
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{magic:08x}{hint})")
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{path}: wrong IDX magic number {magic}, expected {expect_magic}")
    header_len = 4 + 4 * ndim
    data += stream.read(4 * ndim)
    if len(data) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header_len})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _TYPE_TO_DTYPE[type_code]
    count = 1
    for s in shape:
        count *= s
    body_len = count * dtype.itemsize
    if header_len + body_len > MAX_DATA_FILE:
        raise DataError(f"{path}: its IDX header declares shape {shape} ({body_len:,} bytes), more than the "
                        f"{MAX_DATA_FILE:,} bytes a data file may hold")
    body = stream.read(body_len)
    if len(body) < body_len:
        raise DataError(f"{path}: truncated IDX file: shape {shape} needs {body_len} bytes of data, "
                        f"the file has {len(body)}")
    extra = stream.read(1 << 20)
    if extra:
        more = "+" if len(extra) == 1 << 20 else ""
        raise DataError(f"{path}: {len(extra)}{more} unexpected bytes after the IDX data of shape {shape}")
    arr = np.frombuffer(body, dtype=dtype, count=count).reshape(shape)
    # astype copies: the result is writable, native-endian and owns its memory.
    return arr.astype(dtype.newbyteorder("="))


def read_idx_images(path):
    """An IDX image file (magic 2051): uint8 array (count, rows, cols)."""
    return read_idx(path, expect_magic=IDX_IMAGES_MAGIC)


def read_idx_labels(path):
    """An IDX label file (magic 2049): uint8 array (count,)."""
    return read_idx(path, expect_magic=IDX_LABELS_MAGIC)


def write_idx(path, array, compress=True):
    """Write ``array`` as an IDX file; gzip-compressed when ``compress``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64. The gzip
    header carries no time stamp, so the same array gives the same bytes.
    """
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _KIND_TO_TYPE:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    type_code = _KIND_TO_TYPE[key]
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    body = np.ascontiguousarray(array, dtype=_TYPE_TO_DTYPE[type_code]).tobytes()
    data = header + body
    if compress:
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
