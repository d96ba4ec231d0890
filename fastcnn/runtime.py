"""The kernels' runtime: thread control and kernel warm-up (compile or load from Numba's cache).

Used by every command that runs kernels: ``fastcnn train``, ``eval``, ``bench``, ``predict``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ConfigError


def set_threads(threads: int | None, key: str = "train.threads") -> int:
    """Numba's thread count for the kernels (None: all cores). Returns the count in use.

    ``key`` names the setting in errors (``--threads`` for commands without a config).
    """
    import numba

    if threads is None:
        return numba.get_num_threads()
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise ConfigError(key, f"must be between 1 and {limit} (the cores Numba was started with), got {threads}")
    numba.set_num_threads(threads)
    return threads


def kernel_dispatchers() -> list:
    """Every Numba dispatcher in fastcnn.kernels (for compile statistics)."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    from . import kernels

    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        found += [obj for obj in vars(module).values() if isinstance(obj, CPUDispatcher)]
    return found


def compile_stats() -> tuple[int, int]:
    """(compiled from scratch, loaded from the on-disk cache) counts so far, over all kernels."""
    compiled = loaded = 0
    for d in kernel_dispatchers():
        compiled += sum(d.stats.cache_misses.values())
        loaded += sum(d.stats.cache_hits.values())
    return compiled, loaded


def warm_up(model_cfg: Any, batch: int = 2, log: Callable[[str], Any] = print, optimizer: Any = "adam",
            clip: bool = False) -> float:
    """Compile (or load from cache) every kernel a training step uses, on a throwaway copy of the model.

    ``optimizer``: a name or the run's ``train.optimizer`` mapping (its options pick the kernel paths,
    e.g. SGD with momentum). Only that optimizer's kernel (and the clipping kernels if ``clip``) are
    compiled: every kernel costs a second or two of a cold start.

    The real model's state (batch-norm running statistics) is untouched.
    Returns seconds spent.
    """
    import threading

    start = time.perf_counter()
    before = compile_stats()
    # Loading cached kernels takes well under a second; if we are still here after one, Numba is compiling:
    # say so while it happens rather than after a silent pause.
    notice = threading.Timer(1.0, lambda: log("Compiling kernels (first run after an install or upgrade; "
                                              "cached for the next runs)..."))
    notice.daemon = True
    notice.start()
    try:
        _warm_up_step(model_cfg, batch, optimizer, clip)
    finally:
        notice.cancel()
    seconds = time.perf_counter() - start
    compiled, loaded = (a - b for a, b in zip(compile_stats(), before))
    if compiled:
        log(f"Compiled {compiled} kernel(s) in {seconds:.1f} s (first run; cached for the next ones)")
    else:
        log(f"Kernels loaded from cache in {seconds:.2f} s")
    return seconds


def _warm_up_step(model_cfg, batch, optimizer, clip):
    """One training step (the trainer's own) and one evaluation forward on a throwaway model."""
    from .model import build_model
    from .optim import build_optimizer
    from .step import train_step

    scratch = build_model(model_cfg, seed=0)
    options = dict(optimizer) if isinstance(optimizer, dict) else {"name": optimizer}
    opt = build_optimizer(options, scratch.parameters())
    x = np.zeros((batch, *scratch.input_shape), scratch.dtype)
    labels = np.zeros(batch, np.int64)
    train_step(scratch, opt, x, labels, clip_grad_norm=1.0 if clip else None)
    scratch.forward(x, training=False)
