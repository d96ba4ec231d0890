"""MNIST and Fashion-MNIST: find (or download) the four IDX files, read, normalize.

Files live in ``<root>/mnist`` and ``<root>/fashion-mnist`` under their
standard names, gzip-compressed (as published) or already uncompressed (the
same name without ``.gz``). Missing files are downloaded (see
:mod:`fastcnn.data.download`) and MD5-verified; files already present are not
re-hashed on every load, but their IDX structure is checked.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcnn.errors import DataError

from . import download as _dl
from .idx import read_idx_images, read_idx_labels

__all__ = ["SPECS", "MnistSpec", "load_mnist", "find_files"]

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class MnistSpec:
    name: str           # folder name under the data root, and the dataset's name
    title: str          # for messages
    md5: dict           # {file name: md5 hex}
    mirrors: tuple      # base URLs, tried in order
    mean: float         # of the training pixels scaled to [0, 1]
    std: float
    class_names: tuple


SPECS = {
    "mnist": MnistSpec(
        name="mnist",
        title="MNIST",
        md5={
            TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
            TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
            TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        mean=0.1307,
        std=0.3081,
        class_names=tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": MnistSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        md5={
            TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
            TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
            TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        mean=0.2860,
        std=0.3530,
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}


def _candidates(name):
    """Accepted file names for a standard ``*.gz`` name, in order of preference."""
    raw = name[:-3]                                   # train-images-idx3-ubyte
    dotted = raw.replace("-idx", ".idx", 1)           # train-images.idx3-ubyte (some unzip tools)
    return [name, raw, dotted]


def find_files(folder):
    """{standard name: existing path or None} for the four files in ``folder``; DataError when a folder (or
    another non-file) of a file's name is in the way (it is not missing: a download could not replace it)."""
    from fastcnn.safeio import file_kind

    folder = Path(folder)
    found = {}
    for name in FILE_NAMES:
        found[name] = None
        for c in _candidates(name):
            path = folder / c
            if path.is_file():
                found[name] = path
                break
            if path.exists():
                raise DataError(f"{path}: is {file_kind(path.stat().st_mode)}, not the data file {name}; "
                                f"move it away")
    return found


def _where_hint(spec, folder, mirrors):
    return (f"Put the files ({', '.join(FILE_NAMES)}; gzip or uncompressed) in {folder}, "
            f"from {' or '.join(mirrors)}, or point data.root (or $FASTCNN_DATA) at a folder "
            f"holding {spec.name}/.")


def _check_n(n, key, available, path):
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{key} must be a positive integer, got {n!r}")
    if n > available:
        raise DataError(f"{key}={n} but {path} holds only {available} samples")
    return int(n)


def _normalize(images, mean, std):
    """uint8 (N, H, W) -> float32 (N, H, W, 1): (x/255 - mean) / std."""
    x = np.multiply(images, np.float32(1.0 / (255.0 * std)), dtype=np.float32)
    x -= np.float32(mean / std)
    return x.reshape(images.shape + (1,))


def _read_pair(images_path, labels_path, n, key, num_classes, hint):
    try:
        images = read_idx_images(images_path)
        labels = read_idx_labels(labels_path)
    except DataError as e:
        raise DataError(f"{e}{hint}") from None
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                        f"{len(labels)} labels{hint}")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range "
                        f"(expected 0..{num_classes - 1}){hint}")
    n = _check_n(n, key, len(images), images_path)
    return images[:n], labels[:n].astype(np.int64)


def load_mnist(name="mnist", folder=None, *, num_train=None, num_test=None, download=True,
               progress=True, mirrors=None, checksums=None, timeout=_dl.DEFAULT_TIMEOUT):
    """Load MNIST or Fashion-MNIST from ``folder`` (downloading missing files).

    Returns ``(x_train, y_train, x_test, y_test, class_names)``: float32 NHWC
    normalized images, int64 labels.

    ``mirrors``: base URLs overriding the defaults (and ``FASTCNN_*_MIRROR``);
    ``checksums``: {file name: md5} overriding the published MD5s (tests).
    """
    spec = SPECS[name]
    folder = Path(folder).expanduser()
    mirror_list = _dl.mirrors_for(spec.name, spec.mirrors, mirrors)
    found = find_files(folder)
    missing = [n for n, p in found.items() if p is None]
    if missing:
        hint = _where_hint(spec, folder, mirror_list)
        if not download:
            raise DataError(f"{name}: files missing in {folder} ({', '.join(missing)}) and "
                            f"download is off\n{hint}")
        md5 = dict(spec.md5)
        if checksums is not None:
            md5.update(checksums)
        _dl.download_files(folder, missing, md5, mirror_list, dataset=name, timeout=timeout,
                           progress=progress, hint=hint)
        found = find_files(folder)
        missing = [n for n, p in found.items() if p is None]
        if missing:  # pragma: no cover - download_files raises first
            raise DataError(f"{name}: files missing in {folder} ({', '.join(missing)})")
    redo = "; delete the bad file to download it again" if download else ""
    nc = len(spec.class_names)
    tr_img, tr_lab = _read_pair(found[TRAIN_IMAGES], found[TRAIN_LABELS], num_train, "num_train", nc, redo)
    te_img, te_lab = _read_pair(found[TEST_IMAGES], found[TEST_LABELS], num_test, "num_test", nc, redo)
    if tr_img.shape[1:] != te_img.shape[1:]:
        raise DataError(f"{found[TRAIN_IMAGES]} has images of {tr_img.shape[1]}x{tr_img.shape[2]} "
                        f"pixels but {found[TEST_IMAGES]} of {te_img.shape[1]}x{te_img.shape[2]}")
    x_train = _normalize(tr_img, spec.mean, spec.std)
    x_test = _normalize(te_img, spec.mean, spec.std)
    return x_train, tr_lab, x_test, te_lab, list(spec.class_names)
