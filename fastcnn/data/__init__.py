"""Datasets: MNIST, Fashion-MNIST, CIFAR-10 (verified download), image folders, .npz
arrays, a synthetic set; batching; training-data augmentation.

>>> ds = load_dataset("mnist")                    # files under resolve_root()/mnist
>>> loader = BatchLoader(ds.x_train, ds.y_train, batch_size=64, seed=0)
>>> for xb, yb in loader.epoch_batches(epoch=0):  # xb float32 NHWC, yb int64
...     ...
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from fastcnn.errors import DataError

from .augment import AUGMENT_KEYS, Augmenter
from .idx import read_idx, write_idx
from .loader import BatchLoader, split_validation

__all__ = ["DATASETS", "DATASET_SPECS", "DatasetSpec", "Dataset", "resolve_root", "load_dataset",
           "split_validation", "BatchLoader", "Augmenter", "make_augmenter", "read_idx", "write_idx"]


def resolve_root(root=None):
    """The data root: ``root`` if given, else ``$FASTCNN_DATA``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/fastcnn`` or ``~/.cache/fastcnn``.
    ``~`` is expanded in all of them; the folder need not exist.
    """
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("FASTCNN_DATA", "")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache).expanduser() if cache else Path("~/.cache").expanduser()
    return base / "fastcnn"


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray   # float32 NHWC (N, H, W, C), normalized
    y_train: np.ndarray   # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple    # (H, W, C)
    class_names: list = field(default_factory=list)
    mean: tuple = None    # per-channel statistics the images were standardized with (None: synthetic)
    std: tuple = None
    augmenter: object = None  # an Augmenter for the training batches when augment= was given, else None


def make_augmenter(augment, seed=0):
    """An :class:`Augmenter` from ``augment`` (None, a mapping with crop_padding /
    horizontal_flip, or an Augmenter); None when it enables nothing."""
    if augment is None:
        return None
    if isinstance(augment, Augmenter):
        return augment if augment.enabled else None
    if not isinstance(augment, dict):
        raise DataError(f"augment must be a mapping ({', '.join(AUGMENT_KEYS)}), got {augment!r}")
    unknown = [k for k in augment if k not in AUGMENT_KEYS]
    if unknown:
        raise DataError(f"augment: unknown key {unknown[0]!r} (known: {', '.join(AUGMENT_KEYS)})")
    try:
        aug = Augmenter(**augment, seed=seed)
    except ValueError as e:
        raise DataError(f"augment: {e}") from None
    return aug if aug.enabled else None


def _first_n(x, y, n, key, where):
    if n is None:
        return x, y
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{key} must be a positive integer, got {n!r}")
    if n > len(y):
        raise DataError(f"{key}={n} but {where} holds only {len(y)} samples")
    return np.ascontiguousarray(x[:n]), y[:n].copy()


# --------------------------------------------------------------------------
# The datasets. Each is declared once, below: its name, what is fixed about it,
# what it needs, and its loader. Config validation reads the declarations
# (data.dataset's choices, data.path, the model's shape against the images')
# before any data is read; load_dataset reads them to load. The loaders import
# their readers on first use: importing this package imports no reader.


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset as ``data.dataset`` names it."""

    name: str
    load: Callable  # (request) -> (x_train, y_train, x_test, y_test, class_names, mean, std)
    input_shape: Optional[Tuple[int, int, int]] = None  # the images' (height, width, channels) when fixed
    num_classes: Optional[int] = None                   # the number of classes when fixed
    path: Optional[str] = None  # what data.path must name ("folder of class sub-folders"); None: not used


def _load_mnist(r):
    from .mnist import SPECS, load_mnist

    x_tr, y_tr, x_te, y_te, class_names = load_mnist(
        r.name, resolve_root(r.root) / r.name, num_train=r.num_train, num_test=r.num_test, download=r.download,
        progress=r.progress, mirrors=r.mirrors, checksums=r.checksums, timeout=r.timeout,
    )
    return x_tr, y_tr, x_te, y_te, class_names, (SPECS[r.name].mean,), (SPECS[r.name].std,)


def _load_cifar10(r):
    from .cifar10 import MEAN, STD, load_cifar10

    x_tr, y_tr, x_te, y_te, class_names = load_cifar10(
        resolve_root(r.root) / r.name, num_train=r.num_train, num_test=r.num_test, download=r.download,
        progress=r.progress, mirrors=r.mirrors, checksums=r.checksums, timeout=r.timeout)
    return x_tr, y_tr, x_te, y_te, class_names, MEAN, STD


def _load_synthetic(r):
    from .synthetic import make_synthetic

    x_tr, y_tr, x_te, y_te, class_names = make_synthetic(
        r.input_shape, r.num_classes,
        num_train=512 if r.num_train is None else r.num_train,
        num_test=128 if r.num_test is None else r.num_test,
        seed=r.seed,
    )
    return x_tr, y_tr, x_te, y_te, class_names, None, None


def _load_folder(r):
    from .folder import load_image_folder

    x_tr, y_tr, x_te, y_te, class_names, mean, std = load_image_folder(r.path, r.input_shape, resize=r.resize)
    if r.num_classes is not None and r.num_classes != len(class_names):
        raise DataError(f"{r.path} has {len(class_names)} class folders ({', '.join(class_names)}) but "
                        f"the model's num_classes is {r.num_classes}")
    return (*_first_splits(r, x_tr, y_tr, x_te, y_te), class_names, mean, std)


def _load_npz(r):
    from .arrays import load_npz

    x_tr, y_tr, x_te, y_te, class_names, mean, std = load_npz(
        r.path, input_shape=r.input_shape, num_classes=r.num_classes)
    return (*_first_splits(r, x_tr, y_tr, x_te, y_te), class_names, mean, std)


def _first_splits(r, x_tr, y_tr, x_te, y_te):
    x_tr, y_tr = _first_n(x_tr, y_tr, r.num_train, "num_train", f"the training split of {r.path}")
    x_te, y_te = _first_n(x_te, y_te, r.num_test, "num_test", f"the test split of {r.path}")
    return x_tr, y_tr, x_te, y_te


DATASET_SPECS: Dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("mnist", _load_mnist, input_shape=(28, 28, 1), num_classes=10),
    DatasetSpec("fashion-mnist", _load_mnist, input_shape=(28, 28, 1), num_classes=10),
    DatasetSpec("synthetic", _load_synthetic),
    DatasetSpec("cifar10", _load_cifar10, input_shape=(32, 32, 3), num_classes=10),
    DatasetSpec("folder", _load_folder, path="folder of class sub-folders"),
    DatasetSpec("npz", _load_npz, path=".npz file"),
)}

# The names (data.dataset's choices, in this order).
DATASETS: Tuple[str, ...] = tuple(DATASET_SPECS)


def load_dataset(name, root=None, *, input_shape=None, num_classes=None, num_train=None, num_test=None,
                 seed=0, download=True, progress=True, mirrors=None, checksums=None, timeout=None,
                 path=None, resize=False, augment=None):
    """Load a dataset by name (see :data:`DATASETS`; declared in :data:`DATASET_SPECS`).

    ``mnist`` / ``fashion-mnist`` / ``cifar10``: the files under
    ``resolve_root(root)/<name>``, downloaded when missing and ``download``.
    ``input_shape``/``num_classes``, when given, must match the dataset's.

    ``folder``: images in ``path/<class>/*.png|jpg|jpeg`` (optionally
    ``path/train/...`` and ``path/test/...``; see :mod:`fastcnn.data.folder`),
    converted to ``input_shape`` (required), resized when ``resize``.

    ``npz``: the arrays in the ``.npz`` file ``path`` (see :mod:`fastcnn.data.arrays`).

    ``synthetic``: ``input_shape`` and ``num_classes`` are required;
    ``num_train`` defaults to 512, ``num_test`` to 128; deterministic for ``seed``.

    ``num_train``/``num_test`` keep the first n samples of each split.
    ``mirrors``, ``checksums``, ``timeout``: download overrides (tests,
    private mirrors); see :func:`fastcnn.data.mnist.load_mnist`.
    ``augment``: ``{"crop_padding": p, "horizontal_flip": bool}`` (or an
    :class:`Augmenter`): the returned ``Dataset.augmenter`` (seeded with
    ``seed``) for the trainer to apply to training batches; None if it
    enables nothing.
    """
    from . import download as _dl

    timeout = _dl.DEFAULT_TIMEOUT if timeout is None else timeout
    augmenter = make_augmenter(augment, seed)
    spec = DATASET_SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if spec.path is not None and (path is None or str(path) == ""):
        raise DataError(f"the {name} dataset needs data.path (a {spec.path})")
    request = SimpleNamespace(name=name, root=root, path=path, input_shape=input_shape, num_classes=num_classes,
                              num_train=num_train, num_test=num_test, seed=seed, download=download,
                              progress=progress, mirrors=mirrors, checksums=checksums, timeout=timeout,
                              resize=resize)
    x_tr, y_tr, x_te, y_te, class_names, mean, std = spec.load(request)
    if spec.input_shape is not None:  # a fixed-shape dataset: the model must fit its images
        _check_model(name, x_tr, class_names, input_shape, num_classes)
    return Dataset(
        name=name,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=len(class_names),
        input_shape=tuple(int(s) for s in x_tr.shape[1:]),
        class_names=list(class_names),
        mean=None if mean is None else tuple(float(m) for m in mean),
        std=None if std is None else tuple(float(s) for s in std),
        augmenter=augmenter,
    )


def _check_model(name, x, class_names, input_shape, num_classes):
    shape = tuple(int(s) for s in x.shape[1:])
    if input_shape is not None and tuple(input_shape) != shape:
        raise DataError(f"{name} has images of shape {list(shape)} (height, width, channels) "
                        f"but the model's input_shape is {list(input_shape)}")
    if num_classes is not None and num_classes != len(class_names):
        raise DataError(f"{name} has {len(class_names)} classes but the model's num_classes "
                        f"is {num_classes}")
