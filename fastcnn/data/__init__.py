"""Datasets: MNIST, Fashion-MNIST (verified download), a synthetic set; batching.

>>> ds = load_dataset("mnist")                    # files under resolve_root()/mnist
>>> loader = BatchLoader(ds.x_train, ds.y_train, batch_size=64, seed=0)
>>> for xb, yb in loader.epoch_batches(epoch=0):  # xb float32 NHWC, yb int64
...     ...
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastcnn.errors import DataError

from .idx import read_idx, write_idx
from .loader import BatchLoader, split_validation

__all__ = ["DATASETS", "Dataset", "resolve_root", "load_dataset", "split_validation",
           "BatchLoader", "read_idx", "write_idx"]

DATASETS = ("mnist", "fashion-mnist", "synthetic")


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


def load_dataset(name, root=None, *, input_shape=None, num_classes=None, num_train=None, num_test=None,
                 seed=0, download=True, progress=True, mirrors=None, checksums=None, timeout=None):
    """Load a dataset by name (see :data:`DATASETS`).

    ``mnist`` / ``fashion-mnist``: the files under ``resolve_root(root)/<name>``,
    downloaded when missing and ``download``; ``num_train``/``num_test`` keep
    the first n samples. ``input_shape``/``num_classes``, when given, must match
    the dataset's.

    ``synthetic``: ``input_shape`` and ``num_classes`` are required;
    ``num_train`` defaults to 512, ``num_test`` to 128; deterministic for ``seed``.

    ``mirrors``, ``checksums``, ``timeout``: download overrides (tests,
    private mirrors); see :func:`fastcnn.data.mnist.load_mnist`.
    """
    if name == "synthetic":
        from .synthetic import make_synthetic

        x_tr, y_tr, x_te, y_te, class_names = make_synthetic(
            input_shape, num_classes,
            num_train=512 if num_train is None else num_train,
            num_test=128 if num_test is None else num_test,
            seed=seed,
        )
    elif name in ("mnist", "fashion-mnist"):
        from . import download as _dl
        from .mnist import load_mnist

        folder = resolve_root(root) / name
        x_tr, y_tr, x_te, y_te, class_names = load_mnist(
            name, folder, num_train=num_train, num_test=num_test, download=download,
            progress=progress, mirrors=mirrors, checksums=checksums,
            timeout=_dl.DEFAULT_TIMEOUT if timeout is None else timeout,
        )
        shape = tuple(int(s) for s in x_tr.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise DataError(f"{name} has images of shape {list(shape)} (height, width, channels) "
                            f"but the model's input_shape is {list(input_shape)}")
        if num_classes is not None and num_classes != len(class_names):
            raise DataError(f"{name} has {len(class_names)} classes but the model's num_classes "
                            f"is {num_classes}")
    else:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return Dataset(
        name=name,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=len(class_names),
        input_shape=tuple(int(s) for s in x_tr.shape[1:]),
        class_names=list(class_names),
    )
