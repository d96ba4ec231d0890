"""fastcnn.runtime: thread control and kernel warm-up."""
import numba
import numpy as np
import pytest

import fastcnn
from fastcnn.config import load_config
from fastcnn.errors import ConfigError
from fastcnn.runtime import compile_stats, kernel_dispatchers, set_threads, warm_up

from conftest import SMALL_CONFIG


def test_set_threads():
    before = numba.get_num_threads()
    try:
        assert set_threads(None) == before
        assert set_threads(1) == 1 and numba.get_num_threads() == 1
        limit = numba.config.NUMBA_NUM_THREADS
        with pytest.raises(ConfigError, match=rf"^train.threads: must be between 1 and {limit}.*got 0$"):
            set_threads(0)
        with pytest.raises(ConfigError, match=r"^--threads: must be between 1"):
            set_threads(limit + 1, key="--threads")
    finally:
        numba.set_num_threads(before)


def test_warm_up_compiles_or_loads_every_kernel_of_a_step_and_touches_no_model():
    cfg = load_config(SMALL_CONFIG)
    model = fastcnn.build_model(cfg.model, seed=0)
    state = model.state_dict()
    lines = []
    seconds = warm_up(cfg.model, log=lines.append, optimizer={"name": "sgd", "momentum": 0.9}, clip=True)
    assert seconds >= 0 and lines
    assert lines[-1].startswith(("Compiled ", "Kernels loaded from cache"))
    # Everything a step and an evaluation need is ready now: another warm-up compiles nothing.
    before = compile_stats()
    lines.clear()
    warm_up(cfg.model, log=lines.append, optimizer={"name": "sgd", "momentum": 0.9}, clip=True)
    assert compile_stats()[0] == before[0] and lines[-1].startswith("Kernels loaded from cache")
    for key, value in model.state_dict().items():
        assert np.array_equal(value, state[key]), key


def test_compile_stats_count_the_kernels():
    dispatchers = kernel_dispatchers()
    assert dispatchers and all(hasattr(d, "stats") for d in dispatchers)
    compiled, loaded = compile_stats()
    assert isinstance(compiled, int) and isinstance(loaded, int) and compiled >= 0 and loaded >= 0
