"""A seeded synthetic classification dataset for any input shape.

Each class has a template: a smooth random pattern (random values on a coarse
grid, upsampled by pixel repetition, so that convolutions and pooling see
structure at several scales). A sample is its class's template times a random
contrast in [0.6, 1.4], plus Gaussian noise of the same strength as the
template. Classes are balanced (their sizes differ by at most one) and a small
CNN separates them within an epoch or two. Images are standardized with the
training set's mean and standard deviation, float32 NHWC.

Everything is a pure function of ``seed``; the templates and the test set do
not depend on ``num_train`` (independent random streams).
"""
import numpy as np

from fastcnn.errors import DataError

__all__ = ["make_synthetic", "NOISE"]

NOISE = 1.0  # noise standard deviation, relative to the templates' (unit) one


def _templates(rng, num_classes, h, w, c):
    cell = max(1, min(h, w) // 4)
    gh, gw = -(-h // cell), -(-w // cell)
    coarse = rng.standard_normal((num_classes, gh, gw, c))
    t = np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2)[:, :h, :w, :]
    # a finer, weaker component so that small kernels have something to find too
    t = t + 0.5 * rng.standard_normal((num_classes, h, w, c))
    t /= t.std(axis=(1, 2, 3), keepdims=True)
    return t


def _samples(rng, templates, n):
    k = len(templates)
    y = rng.permutation(np.arange(n) % k).astype(np.int64)
    contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
    x = templates[y] * contrast + NOISE * rng.standard_normal((n,) + templates.shape[1:])
    return x, y


def _positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"synthetic dataset: {key} must be a positive integer, got {value!r}")
    return int(value)


def make_synthetic(input_shape, num_classes, num_train=512, num_test=128, seed=0):
    """Return ``(x_train, y_train, x_test, y_test, class_names)``."""
    if input_shape is None or num_classes is None:
        raise DataError("the synthetic dataset needs model.input_shape and model.num_classes")
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise DataError(f"synthetic dataset: input_shape must be [height, width, channels], "
                        f"got {input_shape!r}") from None
    if len(shape) != 3:
        raise DataError(f"synthetic dataset: input_shape must be [height, width, channels], "
                        f"got {list(shape)}")
    h, w, c = (_positive_int(v, "input_shape") for v in shape)
    num_classes = _positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise DataError("synthetic dataset: num_classes must be at least 2")
    num_train = _positive_int(num_train, "num_train")
    num_test = _positive_int(num_test, "num_test")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synthetic dataset: seed must be a non-negative integer, got {seed!r}")

    t_ss, tr_ss, te_ss = np.random.SeedSequence(int(seed)).spawn(3)
    templates = _templates(np.random.default_rng(t_ss), num_classes, h, w, c)
    x_train, y_train = _samples(np.random.default_rng(tr_ss), templates, num_train)
    x_test, y_test = _samples(np.random.default_rng(te_ss), templates, num_test)
    mean, std = x_train.mean(), x_train.std()
    std = std if std > 0 else 1.0
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    class_names = [f"class_{i}" for i in range(num_classes)]
    return x_train, y_train, x_test, y_test, class_names
