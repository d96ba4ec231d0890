"""Shared test helpers: numerical gradients, data location, torch availability."""
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numerical_grad(f, x, eps=1e-6, indices=None):
    """Central differences of the scalar f() w.r.t. array x (modified in place and restored).

    ``indices``: flat indices to check (default: all).
    """
    flat = x.reshape(-1)
    idx = range(flat.size) if indices is None else indices
    grad = np.zeros(flat.size, dtype=np.float64)
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad.reshape(x.shape)


def sample_indices(size, count, rng):
    """Up to ``count`` distinct flat indices (all of them when the array is small)."""
    if size <= count:
        return np.arange(size)
    return rng.choice(size, size=count, replace=False)


def mnist_root():
    """The folder holding mnist/ (from $FASTCNN_DATA), or None."""
    root = os.environ.get("FASTCNN_DATA")
    if root and os.path.exists(os.path.join(root, "mnist", "train-images-idx3-ubyte.gz")):
        return root
    return None


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
