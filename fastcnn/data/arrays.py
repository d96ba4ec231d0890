"""Datasets from NumPy arrays: a ``.npz`` file, and per-channel standardization.

The ``.npz`` file (``np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)``)
holds four arrays:

- ``x_train``, ``x_test``: images ``(N, H, W, C)`` or ``(N, H, W)`` (one
  channel); ``uint8`` (0..255, scaled by 1/255) or floating point (used as
  they are); no NaN or infinite values;
- ``y_train``, ``y_test``: integer class indices ``0..K-1``, one per image;
  K is the model's ``num_classes`` when given, else the largest label + 1;
- optionally ``class_names``: K strings (a NumPy string array, not objects).

It is read with ``np.load(path, allow_pickle=False)``: object arrays are an
error, never unpickled. Images are standardized per channel with the mean and
standard deviation of the training images (see :func:`standardize`).
"""
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fastcnn.errors import DataError

__all__ = ["NPZ_KEYS", "load_npz", "channel_stats", "standardize"]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_CHUNK = 4096  # images per chunk when computing statistics (bounded temporary memory)


def channel_stats(x, scale=1.0):
    """Per-channel mean and standard deviation (float64) of ``x * scale``, ``x`` NHWC.

    Two passes over chunks of samples: exact enough for float32 and uint8
    data, and never a float64 copy of the whole array. A channel with zero
    spread gets std 1.
    """
    c = x.shape[-1]
    n = x.size // c if c else 0
    total = np.zeros(c, np.float64)
    for i in range(0, len(x), _CHUNK):
        total += x[i:i + _CHUNK].reshape(-1, c).sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    sq = np.zeros(c, np.float64)
    for i in range(0, len(x), _CHUNK):
        d = x[i:i + _CHUNK].reshape(-1, c).astype(np.float64) - mean
        sq += np.einsum("ij,ij->j", d, d)
    std = np.sqrt(sq / max(n, 1))
    mean, std = mean * scale, std * scale
    std[~(std > 0)] = 1.0
    return mean, std


def standardize(x, mean, std, scale=1.0):
    """float32 C-contiguous ``(x * scale - mean) / std`` per channel (``x`` uint8 or float NHWC)."""
    mult = (scale / np.asarray(std, np.float64)).astype(np.float32)
    shift = (np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
    out = np.empty(x.shape, np.float32)
    for i in range(0, len(x), _CHUNK):  # chunked: no float64 temporary of the whole array
        o = out[i:i + _CHUNK]
        np.multiply(x[i:i + _CHUNK], mult, out=o, casting="unsafe")
        o -= shift
    return out


def _member(z, path, key):
    try:
        return z[key]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(f"{path}: {key} is an object array; only numeric arrays are read "
                            f"(pickled data is never loaded)") from None
        raise DataError(f"{path}: cannot read {key}: {e}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read {key}: corrupt file ({e})") from None


def _images(path, key, x):
    if x.dtype.kind == "O":
        raise DataError(f"{path}: {key} is an object array; only numeric arrays are read")
    if x.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif x.dtype.kind == "f":
        scale = 1.0
    else:
        raise DataError(f"{path}: {key} has dtype {x.dtype}; expected uint8 (0..255) or floating-point images")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or min(x.shape[1:]) < 1:
        raise DataError(f"{path}: {key} has shape {list(x.shape)}; expected images (N, H, W, C) or (N, H, W)")
    if len(x) == 0:
        raise DataError(f"{path}: {key} holds no images")
    if scale == 1.0:
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise DataError(f"{path}: {key} holds NaN or infinite values (first in image {int(np.argmax(bad))})")
    return x, scale


def _labels(path, key, y, n, xkey):
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} has dtype {y.dtype}; expected integer class indices 0..K-1")
    if y.ndim != 1:
        raise DataError(f"{path}: {key} has shape {list(y.shape)}; expected one label per image ({n},)")
    if len(y) != n:
        raise DataError(f"{path}: {key} has {len(y)} labels but {xkey} has {n} images")
    if y.dtype.kind == "i" and len(y) and int(y.min()) < 0:
        i = int(np.argmin(y))
        raise DataError(f"{path}: {key} holds a negative label ({int(y[i])} at index {i}); expected 0..K-1")
    return y.astype(np.int64)


def load_npz(path, *, input_shape=None, num_classes=None):
    """Read and check a ``.npz`` dataset file; standardize it.

    Returns ``(x_train, y_train, x_test, y_test, class_names, mean, std)``:
    float32 NHWC images, int64 labels, the per-channel statistics used.
    """
    from fastcnn.safeio import NotRegularFile, ObjectArray, UnsafeFile, inspect_npz, npy_header, open_regular

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: file not found (data.path of the npz dataset)")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a .npz file with {', '.join(NPZ_KEYS)}")
    try:
        f, size = open_regular(path)
    except NotRegularFile as e:
        raise DataError(f"{path}: {e}; expected a .npz file with {', '.join(NPZ_KEYS)}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        magic = f.read(6)
        f.seek(0)
        if magic == b"\x93NUMPY":
            try:
                npy_header(f)
            except ObjectArray:
                raise DataError(f"{path}: holds pickled data, which is never loaded; save the arrays with "
                                f"np.savez") from None
            except UnsafeFile as e:
                raise DataError(f"{path}: not a .npz file ({e})") from None
            raise DataError(f"{path}: holds a single array; expected a .npz archive with {', '.join(NPZ_KEYS)} "
                            f"(np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))")
        # Every entry's header is checked against its size before anything is inflated (no zip bomb,
        # no header declaring more than the file holds, no pickles).
        try:
            inspect_npz(f, size)
        except ObjectArray as e:
            raise DataError(f"{path}: {e.key} is an object array; only numeric arrays are read "
                            f"(pickled data is never loaded)") from None
        except UnsafeFile as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        f.seek(0)
        try:
            z = np.load(f, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path}: not a .npz file ({e})") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        if isinstance(z, np.ndarray):
            raise DataError(f"{path}: holds a single array; expected a .npz archive with {', '.join(NPZ_KEYS)}")
        return _load_npz_members(path, z, input_shape, num_classes)


def _load_npz_members(path, z, input_shape, num_classes):
    with z:
        have = list(z.files)
        missing = [k for k in NPZ_KEYS if k not in have]
        if missing:
            raise DataError(f"{path}: missing key {missing[0]!r} (the file has: {', '.join(have) or 'nothing'}); "
                            f"expected {', '.join(NPZ_KEYS)}")
        x_tr, scale_tr = _images(path, "x_train", _member(z, path, "x_train"))
        x_te, scale_te = _images(path, "x_test", _member(z, path, "x_test"))
        y_tr = _labels(path, "y_train", _member(z, path, "y_train"), len(x_tr), "x_train")
        y_te = _labels(path, "y_test", _member(z, path, "y_test"), len(x_te), "x_test")
        names = _member(z, path, "class_names") if "class_names" in have else None
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise DataError(f"{path}: x_test has images of shape {list(x_te.shape[1:])} but x_train of "
                        f"{list(x_tr.shape[1:])}")
    if scale_te != scale_tr:
        raise DataError(f"{path}: x_test has dtype {x_te.dtype} but x_train {x_tr.dtype}; store both as uint8 "
                        f"or both as floating point")
    shape = tuple(int(s) for s in x_tr.shape[1:])
    if input_shape is not None and tuple(input_shape) != shape:
        raise DataError(f"{path}: x_train has images of shape {list(shape)} (height, width, channels) but the "
                        f"model's input_shape is {list(input_shape)}")
    top = max(int(y_tr.max()), int(y_te.max()))
    if num_classes is not None:
        for key, y in (("y_train", y_tr), ("y_test", y_te)):
            if int(y.max()) >= num_classes:
                i = int(np.argmax(y))
                raise DataError(f"{path}: {key} holds label {int(y[i])} (index {i}) but the model's num_classes "
                                f"is {num_classes} (expected 0..{num_classes - 1})")
        k = int(num_classes)
    else:
        k = top + 1
    if names is not None:
        if names.dtype.kind not in "US" or names.ndim != 1 or len(names) != k:
            raise DataError(f"{path}: class_names must be {k} strings (a 1-D string array), got "
                            f"{names.dtype} of shape {list(names.shape)}")
        class_names = [str(s.decode() if isinstance(s, bytes) else s) for s in names.tolist()]
    else:
        class_names = [str(i) for i in range(k)]
    mean, std = channel_stats(x_tr, scale_tr)
    x_train = standardize(x_tr, mean, std, scale_tr)
    x_test = standardize(x_te, mean, std, scale_tr)
    return x_train, y_tr, x_test, y_te, class_names, tuple(mean.tolist()), tuple(std.tolist())
