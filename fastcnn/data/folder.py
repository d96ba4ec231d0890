"""Image folders: ``<path>/<class>/*.png|jpg|jpeg``, read with Pillow.

Layout: either ``<path>/train/<class>/...`` (and optionally
``<path>/test/<class>/...``), used as the two splits, or
``<path>/<class>/...`` with everything as training data. Classes are the
sorted names of the training split's sub-folders (hidden ones skipped); every
class folder must hold at least one image; a test class must also be a
training class. Images are the files ending in ``.png``, ``.jpg`` or ``.jpeg``
(any case) directly in a class folder; other files are ignored.

Without a test split, a seeded 20% of each class's images is held out as the
test split (the same images for every run: the hold-out uses seed 0, not the
run's seed, so runs with different seeds are scored on the same images).

Images are converted to the model's channels (``L`` for 1, ``RGB`` for 3),
resized (bilinear) to its height and width when ``resize`` (else a size
mismatch is an error), scaled to [0, 1] and standardized per channel with the
training split's mean and standard deviation.

Pillow is an optional dependency (``pip install 'fastcnn[images]'``), imported
only when a folder dataset is loaded.
"""
from pathlib import Path

import numpy as np

from fastcnn.errors import DataError

from .arrays import channel_stats, standardize

__all__ = ["IMAGE_EXTENSIONS", "HOLDOUT_FRACTION", "HOLDOUT_SEED", "load_image_folder", "list_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0
PILLOW_HINT = "pip install 'fastcnn[images]'"


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"the folder dataset reads images with Pillow, which is not installed: "
                        f"{PILLOW_HINT}") from None
    return Image


def _subfolders(folder):
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder: {e.strerror or e}") from None


def list_images(folder):
    """The image files directly in ``folder``, sorted by name."""
    try:
        return sorted(p for p in folder.iterdir()
                      if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder: {e.strerror or e}") from None


def _scan(split_dir, classes=None):
    """``[(file, label)]`` and the class names of one split folder."""
    subs = _subfolders(split_dir)
    if classes is None:
        if not subs:
            raise DataError(f"{split_dir}: no class sub-folders; expected {split_dir}/<class>/*.png|jpg|jpeg")
        classes = [p.name for p in subs]
    index = {name: i for i, name in enumerate(classes)}
    files = []
    for sub in subs:
        if sub.name not in index:
            raise DataError(f"{sub}: class {sub.name!r} is not a training class "
                            f"({', '.join(classes)})")
        images = list_images(sub)
        if not images:
            raise DataError(f"{sub}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend((p, index[sub.name]) for p in images)
    if not files:
        raise DataError(f"{split_dir}: no images found")
    return files, classes


def _holdout(labels, fraction=HOLDOUT_FRACTION, seed=HOLDOUT_SEED):
    """Boolean mask of the held-out samples: round(fraction * n_k) random ones of each class k."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        n_out = int(round(fraction * len(idx)))
        if n_out >= len(idx):
            n_out = len(idx) - 1
        if n_out > 0:
            mask[rng.permutation(idx)[:n_out]] = True
    return mask


def _read(Image, path, h, w, c, resize):
    from fastcnn.safeio import MAX_IMAGE_PIXELS

    mode = "L" if c == 1 else "RGB"
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:  # from the header, before decoding
                raise DataError(f"{path}: image is {im.size[1]}x{im.size[0]} pixels, more than the "
                                f"{MAX_IMAGE_PIXELS:,} a training image may have")
            im = im.convert(mode)
            if im.size != (w, h):
                if not resize:
                    raise DataError(f"{path}: image is {im.size[1]}x{im.size[0]} pixels (height x width) but the "
                                    f"model's input_shape needs {h}x{w}; resize the images or set "
                                    f"data.resize: true")
                resample = getattr(Image, "Resampling", Image).BILINEAR
                im = im.resize((w, h), resample)
            a = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    return a.reshape(h, w, c)


def _load_files(Image, files, h, w, c, resize):
    x = np.empty((len(files), h, w, c), np.uint8)
    for i, (p, _) in enumerate(files):
        x[i] = _read(Image, p, h, w, c, resize)
    y = np.array([lab for _, lab in files], np.int64)
    return x, y


def load_image_folder(path, input_shape, *, resize=False):
    """Load an image-folder dataset (see the module doc).

    Returns ``(x_train, y_train, x_test, y_test, class_names, mean, std)``:
    float32 NHWC standardized images, int64 labels, the per-channel statistics
    (of the [0, 1]-scaled training images) used.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "not a folder" if path.exists() else "folder not found"
        raise DataError(f"{path}: {what} (data.path of the folder dataset: <path>/<class>/*.png|jpg|jpeg)")
    if input_shape is None or len(tuple(input_shape)) != 3:
        raise DataError("the folder dataset needs model.input_shape [height, width, channels]")
    h, w, c = (int(s) for s in input_shape)
    if c not in (1, 3):
        raise DataError(f"the folder dataset reads grayscale (1 channel) or RGB (3 channels) images; the "
                        f"model's input_shape has {c} channels")
    Image = _pillow()
    train_dir, test_dir = path / "train", path / "test"
    if train_dir.is_dir():
        train_files, classes = _scan(train_dir)
        test_files = _scan(test_dir, classes)[0] if test_dir.is_dir() else None
    else:
        train_files, classes = _scan(path)
        test_files = None
    x_tr, y_tr = _load_files(Image, train_files, h, w, c, resize)
    if test_files is not None:
        x_te, y_te = _load_files(Image, test_files, h, w, c, resize)
    else:
        held = _holdout(y_tr)
        if not held.any():
            raise DataError(f"{path}: too few images to hold out a test split ({len(y_tr)} images; a class needs "
                            f"at least 3 to give one to the test split); add a test/ folder or more images")
        x_te, y_te = x_tr[held], y_tr[held]
        x_tr, y_tr = x_tr[~held], y_tr[~held]
    mean, std = channel_stats(x_tr, 1.0 / 255.0)
    x_train = standardize(x_tr, mean, std, 1.0 / 255.0)
    x_test = standardize(x_te, mean, std, 1.0 / 255.0)
    return x_train, y_tr, x_test, y_te, classes, tuple(mean.tolist()), tuple(std.tolist())
