"""CIFAR-10 (binary version): find (or download and extract) the batches, read, normalize.

Files live in ``<root>/cifar10/cifar-10-batches-bin/``: ``data_batch_1.bin``
.. ``data_batch_5.bin`` (training, in that order), ``test_batch.bin`` and
``batches.meta.txt`` (class names, one per line; optional, the standard names
are used without it). Each record is 1 label byte then 3072 pixel bytes:
1024 red, 1024 green, 1024 blue, each a 32x32 image in row-major order. They
are returned NHWC ``(N, 32, 32, 3)``, normalized per channel.

When batch files are missing, ``cifar-10-binary.tar.gz`` is taken from
``<root>/cifar10/`` if it is there (air-gapped machines), else downloaded
(see :mod:`fastcnn.data.download`; mirror override ``FASTCNN_CIFAR10_MIRROR``),
MD5-verified, and its batch files extracted into a temporary folder then
renamed into place: only the expected regular files are extracted (tarfile's
``data`` filter where available), and an archive holding a path that would
escape the folder is rejected. A downloaded archive is deleted once extracted.
"""
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np

from fastcnn.atomicio import fsync_dir
from fastcnn.errors import DataError

from . import download as _dl
from .idx import read_file
from .mnist import _check_n

__all__ = ["ARCHIVE", "ARCHIVE_MD5", "BATCHES_DIR", "TRAIN_FILES", "TEST_FILE", "META_FILE", "MEAN", "STD",
           "CLASS_NAMES", "RECORD_BYTES", "load_cifar10", "read_batch", "find_missing"]

ARCHIVE = "cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
BATCHES_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
BATCH_FILES = TRAIN_FILES + (TEST_FILE,)
RECORD_BYTES = 1 + 32 * 32 * 3
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def find_missing(batches):
    """The batch files (not the optional meta file) missing in ``batches``."""
    return [n for n in BATCH_FILES if not (Path(batches) / n).is_file()]


def read_batch(path):
    """One batch file: ``(images uint8 (N, 32, 32, 3), labels int64 (N,))``."""
    data = read_file(path, "a CIFAR-10 batch file")
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise DataError(f"{path}: not a CIFAR-10 batch file: its size ({len(data)} bytes) is not a "
                        f"positive multiple of {RECORD_BYTES} (1 label byte + 3072 pixel bytes per image)")
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels > 9)
    if len(bad):
        raise DataError(f"{path}: label {int(labels[bad[0]])} out of range in record {int(bad[0])} "
                        f"(expected 0..9); the file is corrupt or not a CIFAR-10 batch file")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # a view: NCHW planes -> NHWC
    return images, labels


def read_class_names(batches):
    """The names in batches.meta.txt (10 non-empty lines), else the standard ones."""
    path = Path(batches) / META_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return list(CLASS_NAMES)
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names if len(names) == len(CLASS_NAMES) else list(CLASS_NAMES)


def normalize(images, mean=MEAN, std=STD, out=None):
    """uint8 NHWC (any strides) -> float32 NHWC: (x/255 - mean) / std per channel.

    Into ``out`` when given, else a new C-contiguous array.
    """
    scale = np.array([1.0 / (255.0 * s) for s in std], np.float32)
    shift = np.array([m / s for m, s in zip(mean, std)], np.float32)
    if out is None:
        out = np.empty(images.shape, np.float32)
    np.multiply(images, scale, out=out)
    out -= shift
    return out


def _where_hint(folder, batches, mirrors):
    urls = " or ".join(m + ARCHIVE for m in mirrors)
    return (f"Put {ARCHIVE} (from {urls}) in {folder}, or its extracted files "
            f"({', '.join(BATCH_FILES)}) in {batches}, or point data.root (or $FASTCNN_DATA) at a folder "
            f"holding cifar10/.")


def _safe_name(name):
    """The normalized member name, or None if it is absolute or climbs out ("..")."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def _extract(archive, folder, batches, required, optional=()):
    """Extract the ``required`` (and, when present, the ``optional``) files of ``archive``'s batch folder.

    Into a temporary folder beside ``batches`` first; then each file is
    fsync'ed and renamed into place, so ``batches`` never holds a partial file.
    """
    wanted = {f"{BATCHES_DIR}/{n}": n for n in (*required, *optional)}
    try:
        tmp = tempfile.mkdtemp(dir=folder, prefix=".cifar10-extract-")
    except OSError as e:
        raise DataError(f"cannot write to the data folder {folder}: {e.strerror or e}") from None
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                chosen = {}
                for m in tar.getmembers():
                    norm = _safe_name(m.name)
                    if norm is None:
                        raise DataError(f"{archive}: unsafe archive: member {m.name!r} would be written outside "
                                        f"{folder}; nothing was extracted. Delete the file.")
                    if norm in wanted and m.isfile():
                        m.name = norm
                        chosen[norm] = m
                lacking = [n for n in required if f"{BATCHES_DIR}/{n}" not in chosen]
                if lacking:
                    raise DataError(f"{archive}: the archive lacks {', '.join(lacking)} (expected under "
                                    f"{BATCHES_DIR}/); delete it to download it again")
                members = list(chosen.values())
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters: stream the files ourselves
                    for m in members:
                        dest = Path(tmp, *m.name.split("/"))
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(m) as src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise DataError(f"{archive}: corrupt archive ({e}); delete it to download it again") from None
        except OSError as e:
            if e.errno is None:  # gzip's BadGzipFile and friends
                raise DataError(f"{archive}: corrupt archive ({e}); delete it to download it again") from None
            raise DataError(f"cannot extract {archive} into {folder}: {e.strerror or e}") from None
        try:
            batches.mkdir(parents=True, exist_ok=True)
            for path in chosen:
                src = Path(tmp, *path.split("/"))
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(src, batches / wanted[path])
        except OSError as e:
            raise DataError(f"cannot write to the data folder {batches}: {e.strerror or e}") from None
        fsync_dir(batches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_files(folder, batches, download, progress, mirrors, checksums, timeout):
    """Make sure the six batch files are in ``batches``: extract or download them if not."""
    missing = find_missing(batches)
    if not missing:
        return
    mirror_list = _dl.mirrors_for("cifar10", MIRRORS, mirrors)
    hint = _where_hint(folder, batches, mirror_list)
    archive = folder / ARCHIVE
    md5 = ARCHIVE_MD5 if checksums is None else checksums.get(ARCHIVE, ARCHIVE_MD5)
    optional = [] if (batches / META_FILE).is_file() else [META_FILE]
    if archive.is_file():  # put there by hand (air-gapped machines): verify, extract, keep
        got = _dl.md5_of(archive)
        if md5 is not None and got != md5.lower():
            raise DataError(f"cifar10: {archive} has the wrong checksum (MD5 {got}, expected {md5.lower()}); "
                            f"delete it to download it again")
        _extract(archive, folder, batches, missing, optional)
        return
    if not download:
        raise DataError(f"cifar10: files missing in {batches} ({', '.join(missing)}) and download is off\n{hint}")
    _dl.download_files(folder, [ARCHIVE], {ARCHIVE: md5}, mirror_list, dataset="cifar10",
                       timeout=timeout, progress=progress, hint=hint)
    try:
        _extract(archive, folder, batches, missing, optional)
    finally:
        try:
            archive.unlink()
        except OSError:
            pass


def load_cifar10(folder, *, num_train=None, num_test=None, download=True, progress=True, mirrors=None,
                 checksums=None, timeout=_dl.DEFAULT_TIMEOUT):
    """Load CIFAR-10 from ``folder`` (= ``<root>/cifar10``), downloading it when missing.

    Returns ``(x_train, y_train, x_test, y_test, class_names)``: float32 NHWC
    normalized images, int64 labels. ``num_train``/``num_test`` keep the first
    n samples. ``checksums``: ``{"cifar-10-binary.tar.gz": md5}`` overrides the
    published MD5 (tests).
    """
    folder = Path(folder).expanduser()
    batches = folder / BATCHES_DIR
    _ensure_files(folder, batches, download, progress, mirrors, checksums, timeout)
    train = [read_batch(batches / n) for n in TRAIN_FILES]
    te_img, te_lab = read_batch(batches / TEST_FILE)
    total = sum(len(lab) for _, lab in train)
    n_tr = _check_n(num_train, "num_train", total, batches)
    n_te = _check_n(num_test, "num_test", len(te_lab), batches / TEST_FILE)
    x_train = np.empty((n_tr, 32, 32, 3), np.float32)
    y_train = np.empty(n_tr, np.int64)
    start = 0
    for img, lab in train:
        k = min(len(lab), n_tr - start)
        if k <= 0:
            break
        normalize(img[:k], out=x_train[start:start + k])
        y_train[start:start + k] = lab[:k]
        start += k
    x_test = normalize(te_img[:n_te])
    return x_train, y_train, x_test, te_lab[:n_te].copy(), read_class_names(batches)
