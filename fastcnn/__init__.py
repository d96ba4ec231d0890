"""fastcnn: train convolutional networks fast on a multicore CPU.

Numba kernels (``fastcnn.kernels``) do the arithmetic; layers, a Sequential
model, optimizers, a trainer and a Click CLI are built on top of them.
"""
import os as _os

# Numba owns the parallelism. A BLAS thread pool spinning beside Numba's makes
# kernels several times slower on small machines, so keep BLAS single-threaded
# unless the user asked otherwise. This only takes effect if numpy is not yet
# imported, which is the case for the CLI.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")

__version__ = "0.1.0"

_API = {
    "load_config": "fastcnn.config",
    "build_model": "fastcnn.model",
    "Sequential": "fastcnn.model",
    "load_model": "fastcnn.evaluate",
    "export_onnx": "fastcnn.onnx_export",
    "softmax_cross_entropy": "fastcnn.losses",
    "train_step": "fastcnn.step",
    "SGD": "fastcnn.optim",
    "Adam": "fastcnn.optim",
    "AdamW": "fastcnn.optim",
}


def __getattr__(name):
    # Lazy: `import fastcnn` (and so `fastcnn --help`) stays fast and never
    # touches Numba until a kernel is needed.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fastcnn' has no attribute {name!r}")


__all__ = ["__version__", *_API]
