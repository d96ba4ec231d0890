"""``fastcnn predict``: classify image files or .npy arrays with a trained checkpoint (or an .onnx file
written by ``fastcnn export``, run in onnxruntime: fastcnn/onnx_export.py).

Inputs get the preprocessing the training data had:

* integer (uint8) pixels are scaled by 1/255; float arrays are taken as pixels in [0, 1];
* then ``(x - mean) / std`` with the training data's statistics:
  ``meta["data_stats"] = {"mean": [...], "std": [...]}`` in the checkpoint (one
  value, or one per channel), else the MNIST / Fashion-MNIST / CIFAR-10
  constants, else nothing (a note says so).

PNG/JPEG files need Pillow (optional extra ``fastcnn[images]``), imported only
when an image file is given.
"""
import os
from typing import Callable, NamedTuple, Optional

import numpy as np

from .errors import UserError
from .safeio import MAX_IMAGE_PIXELS, MAX_NPY_BYTES, UnsafeFile, file_kind, open_regular, read_npy_bounded

IMAGES_EXTRA = "pip install 'fastcnn[images]'"
NPY_SUFFIXES = (".npy",)


class InputError(UserError):
    """An input file is missing, unreadable or has the wrong shape."""


# -- dataset facts -----------------------------------------------------------
def _known_dataset(name):
    """(class names, mean per channel, std per channel, title) of a dataset with fixed statistics, or None."""
    if name in ("mnist", "fashion-mnist"):
        from .data.mnist import SPECS

        spec = SPECS[name]
        return list(spec.class_names), (spec.mean,), (spec.std,), spec.title
    if name == "cifar10":
        try:
            from .data import cifar10
        except ImportError:
            return None
        return list(cifar10.CLASS_NAMES), tuple(cifar10.MEAN), tuple(cifar10.STD), "CIFAR-10"
    return None


def class_names_for(cfg, meta=None):
    """Class names: meta["class_names"] (saved with the checkpoint), the known datasets', else class_<i>."""
    k = int(cfg.model.num_classes)
    names = (meta or {}).get("class_names")
    if isinstance(names, list) and len(names) == k:
        return [str(n) for n in names]
    known = _known_dataset(cfg.data.dataset)
    if known is not None and len(known[0]) == k:
        return known[0]
    return [f"class_{i}" for i in range(k)]


def normalization_for(cfg, meta=None):
    """(mean, std, source): the training data's normalization, or (None, None, reason) when unknown.

    mean and std are float32 arrays broadcastable over the channel axis, in
    units of pixels scaled to [0, 1]. Checked in order: the checkpoint's
    ``meta["data_stats"]``, the fixed statistics of mnist / fashion-mnist / cifar10.
    """
    channels = int(cfg.model.input_shape[2])
    dataset = cfg.data.dataset
    stats = (meta or {}).get("data_stats")
    if isinstance(stats, dict) and stats.get("mean") is not None and stats.get("std") is not None:
        try:
            mean = np.asarray(stats["mean"], np.float32).reshape(-1)
            std = np.asarray(stats["std"], np.float32).reshape(-1)
        except (TypeError, ValueError):
            mean = std = None
        if (mean is not None and mean.size in (1, channels) and std.size in (1, channels)
                and np.all(np.isfinite(mean)) and np.all(std > 0)):
            return mean, std, "the checkpoint's data_stats"
    known = _known_dataset(dataset)
    if known is not None and len(known[1]) in (1, channels):
        _, mean, std, title = known
        return np.float32(mean), np.float32(std), f"{title} mean {list(mean)}, std {list(std)}"
    return None, None, (f"the checkpoint holds no normalization statistics for dataset {dataset!r} "
                        f"(meta data_stats); inputs are only scaled to [0, 1] (uint8 / 255), "
                        f"which may not match how the model was trained")


# -- reading inputs ----------------------------------------------------------
def _require_pil():
    try:
        from PIL import Image
    except ImportError:
        raise UserError(f"reading PNG/JPEG images needs Pillow, which is not installed: {IMAGES_EXTRA} "
                        f"(or pass .npy arrays)") from None
    return Image


def _check_file(path):
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not an image or .npy file")
    if not os.path.isfile(path):  # a FIFO would block the read forever, a device never end
        raise InputError(f"{path}: {file_kind(os.stat(path).st_mode)}, not an image or .npy file")


def _convert_channels(x, channels, path):
    """(N, H, W, C') float -> (N, H, W, channels): gray <-> RGB, alpha dropped."""
    have = x.shape[-1]
    if have == channels:
        return x
    if have == 4 and channels in (1, 3):
        x, have = x[..., :3], 3
        if channels == 3:
            return x
    if have == 3 and channels == 1:  # ITU-R 601-2 luma, as Pillow's convert("L")
        return (x @ np.float32([0.299, 0.587, 0.114])).astype(np.float32)[..., None]
    if have == 1 and channels in (3, 4):
        return np.repeat(x, channels, axis=-1)
    raise InputError(f"{path}: has {have} channel(s); the model takes {channels}")


def _resize(x, height, width):
    """(N, h, w, C) float32 -> (N, height, width, C), bilinear, with Pillow."""
    Image = _require_pil()
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    out = np.empty((x.shape[0], height, width, x.shape[3]), np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[3]):
            img = Image.fromarray(np.ascontiguousarray(x[i, :, :, c], np.float32), mode="F")
            out[i, :, :, c] = np.asarray(img.resize((width, height), bilinear), np.float32)
    return out


def _fit(x, input_shape, path, resize):
    """Channels converted, size checked (or resized)."""
    h, w, c = input_shape
    x = _convert_channels(x, c, path)
    if x.shape[1:3] != (h, w):
        if not resize:
            raise InputError(f"{path}: images are {x.shape[1]}x{x.shape[2]} (height x width) but the model "
                             f"takes {h}x{w}; pass --resize to resize them")
        x = _resize(x, h, w)
    return x


def _to_unit(arr, path):
    """Integer pixels (uint8, ...) -> float32 / 255; floats -> float32 as they are (pixels in [0, 1])."""
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{path}: dtype {arr.dtype} is not a number type (expected uint8 or float)")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InputError(f"{path}: integer pixels must be in 0..255 (8-bit), found {arr.min()}..{arr.max()}")
        return arr.astype(np.float32) / np.float32(255.0)
    x = arr.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path}: holds NaN or infinite values")
    return x


def read_npy(path, input_shape):
    """An .npy file -> float32 (N, H, W, C') in pixel units, before channel/size fitting.

    The header is checked against the file's size before anything is allocated: a header declaring
    more data than the file holds is refused, never allocated.
    """
    _check_file(path)
    try:
        f, size = open_regular(path, MAX_NPY_BYTES)
    except UnsafeFile as e:
        raise InputError(f"{path}: {e}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    with f:
        magic = f.read(6)
        if magic[:4] == b"PK\x03\x04":
            raise InputError(f"{path}: is an .npz archive; save one array with np.save")
        if magic != b"\x93NUMPY":
            raise InputError(f"{path}: not a valid .npy array (no NumPy header)")
        f.seek(0)
        try:
            arr = read_npy_bounded(f, size)
        except UnsafeFile as e:
            raise InputError(f"{path}: not a valid .npy array ({e})") from None
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: cannot read it as .npy ({e})") from None
    h, w, _ = input_shape
    shape = arr.shape
    if arr.ndim == 2:                                   # one (H, W) image
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        if shape[1:] == (h, w) or shape[2] > 4:         # a batch (N, H, W)
            arr = arr[..., None]
        else:                                           # one (H, W, C) image
            arr = arr[None]
    elif arr.ndim != 4:
        raise InputError(f"{path}: array of shape {shape}; expected (N, H, W, C), (N, H, W), (H, W, C) or (H, W)")
    if arr.shape[0] == 0 or arr.size == 0:
        raise InputError(f"{path}: the array is empty (shape {shape})")
    return _to_unit(arr, path)


def read_image(path, input_shape, resize=False):
    """A PNG/JPEG (anything Pillow reads) -> float32 (1, H, W, C) in [0, 1].

    Converted to the model's channels (Pillow's "L" / "RGB" / "RGBA") and, when
    ``resize``, resized to the model's size (bilinear, on the 8-bit image: what
    the ``folder`` dataset does when training).
    """
    Image = _require_pil()
    _check_file(path)
    h, w, channels = input_shape
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise InputError(f"{path}: the model takes {channels} channels; image files give 1, 3 or 4")
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:  # from the header, before decoding
                raise InputError(f"{path}: image is {img.size[1]}x{img.size[0]} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS:,} an input may have")
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I") and channels == 1:  # 16-bit gray: keep the range
                arr = np.asarray(img, np.float32)
                arr = arr / np.float32(65535.0 if arr.max() > 255 else 255.0)
                x = arr[None, :, :, None]
                return _resize(x, h, w) if resize and x.shape[1:3] != (h, w) else x
            img = img.convert(mode)
            if resize and img.size != (w, h):
                img = img.resize((w, h), bilinear)
            arr = np.asarray(img, np.uint8)
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        raise InputError(f"{path}: not an image file Pillow can read (unknown format or corrupt)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError
        raise InputError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr[None].astype(np.float32) / np.float32(255.0)


def load_inputs(paths, input_shape, resize=False):
    """[(label, file, row index or None)], float32 (N, H, W, C) pixels in [0, 1]-ish, per input file."""
    labels, arrays = [], []
    for path in paths:
        path = os.fspath(path)
        if path.lower().endswith(NPY_SUFFIXES):
            x = read_npy(path, input_shape)
            labels += [(f"{path}[{i}]", path, i) for i in range(len(x))]
        elif path.lower().endswith(".npz"):
            raise InputError(f"{path}: an .npz archive (a checkpoint?); inputs are image files or .npy arrays")
        else:
            x = read_image(path, input_shape, resize)
            labels.append((path, path, None))
        arrays.append(_fit(x, input_shape, path, resize))
    return labels, np.concatenate(arrays).astype(np.float32, copy=False)


# -- predicting --------------------------------------------------------------
def softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Classifier(NamedTuple):
    """What predict needs of a model: its input, class names, normalization and logits."""

    input_shape: tuple        # (H, W, C)
    dataset: Optional[str]
    class_names: Optional[list]  # None: class_<i>
    mean: Optional[np.ndarray]   # the normalization to apply (None: none known, or in_graph)
    std: Optional[np.ndarray]
    note: Optional[str]          # why there is no normalization, when there is none
    in_graph: bool               # the model normalizes pixels itself (an .onnx exported with --raw-pixels)
    logits: Callable             # logits(x float32 NHWC, batch_size) -> (N, num_classes)


def open_classifier(path, threads=None) -> Classifier:
    """A checkpoint (.npz) or an exported .onnx file (run in onnxruntime) as a Classifier."""
    if os.fspath(path).lower().endswith(".onnx"):
        from .onnx_export import open_onnx

        return open_onnx(path, threads=threads)
    from .evaluate import load_model_checkpoint

    checkpoint, cfg, model = load_model_checkpoint(path)
    mean, std, source = normalization_for(cfg, checkpoint.meta)
    return Classifier(tuple(int(s) for s in cfg.model.input_shape), cfg.data.dataset,
                      class_names_for(cfg, checkpoint.meta), mean, std, source, False,
                      lambda x, batch_size: model.predict(np.ascontiguousarray(x, dtype=model.dtype), batch_size))


def predict_inputs(checkpoint_path, inputs, top_k=3, batch_size=256, resize=False, invert=False, normalize=True,
                   threads=None):
    """Classify files with a checkpoint, or an .onnx file written by ``fastcnn export`` (onnxruntime;
    ``threads`` its thread count).

    Returns {"predictions": [{"input", "file", "index", "top": [{"class", "name", "probability"}, ...]}, ...],
    "notes": [str, ...]} with ``top`` sorted by probability, ``top_k`` long (at most num_classes).
    """
    if not inputs:
        raise UserError("no input given: pass image files (PNG/JPEG) or .npy arrays")
    model = open_classifier(checkpoint_path, threads=threads)
    if model.in_graph and not normalize:
        raise UserError(f"--no-normalize: {checkpoint_path} normalizes its input itself (exported with "
                        f"--raw-pixels): it takes pixels in [0, 1]")
    labels, x = load_inputs(inputs, model.input_shape, resize=resize)
    notes = []
    mean, std, source = (model.mean, model.std, model.note) if normalize else (None, None, None)
    if (mean is not None or model.in_graph) and float(np.abs(x).max()) > 1.5:
        notes.append(f"values up to {float(np.abs(x).max()):.4g} in float input: float arrays are taken as pixels "
                     f"in [0, 1] (save uint8 pixels, or pass --no-normalize for already normalized data)")
    if invert:
        x = np.float32(1.0) - x
    elif normalize and model.dataset in ("mnist", "fashion-mnist"):
        bright = [label for (label, _, _), xi in zip(labels, x) if float(xi.mean()) > 0.5]
        if bright:
            more = f" and {len(bright) - 1} more" if len(bright) > 1 else ""
            notes.append(f"{bright[0]}{more}: mostly bright, but {model.dataset} images are light "
                         f"on a dark background (try --invert)")
    if normalize and not model.in_graph:
        if mean is None:
            notes.append(source)
        else:
            x = (x - mean) / std
    probs = softmax(model.logits(np.ascontiguousarray(x, dtype=np.float32), batch_size))
    names = model.class_names
    if names is None or len(names) != probs.shape[1]:
        names = [f"class_{i}" for i in range(probs.shape[1])]
    k = min(int(top_k), probs.shape[1])
    predictions = []
    for (label, path, index), p in zip(labels, probs):
        order = np.argsort(-p, kind="stable")[:k]
        predictions.append({"input": label, "file": path, "index": index,
                            "top": [{"class": int(c), "name": names[c], "probability": float(p[c])} for c in order]})
    return {"predictions": predictions, "notes": notes, "class_names": names}


def format_predictions(predictions):
    """One line per input: ``name  class (p%)  class (p%) ...``."""
    if not predictions:
        return ""
    width = max(len(p["input"]) for p in predictions)
    lines = []
    for p in predictions:
        cells = [f"{t['name']} ({t['probability']:.1%})" for t in p["top"]]
        lines.append(f"{p['input'].ljust(width)}  " + "   ".join(cells))
    return "\n".join(lines)
