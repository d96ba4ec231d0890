"""A training step allocates nothing that grows with the batch: activations live in planned buffers."""
import tracemalloc

import numpy as np
import pytest

import fastcnn
from fastcnn.data import BatchLoader

from conftest import REPO


@pytest.mark.parametrize("config", ["mnist.yaml", "mnist_bn.yaml"])
def test_step_loop_allocates_no_activation_sized_arrays(config):
    cfg = fastcnn.load_config(f"{REPO}/configs/{config}")
    peaks = {}
    for batch in (32, 128):
        model = fastcnn.build_model(cfg.model, seed=0)
        opt = fastcnn.Adam(model.parameters())
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch * 4, 28, 28, 1)).astype(np.float32)
        y = rng.integers(0, 10, batch * 4)
        loader = BatchLoader(x, y, batch, reuse=True)  # as the trainer uses it

        def epoch(loader=loader, model=model, opt=opt):
            for xb, yb in loader.epoch_batches(0):
                assert fastcnn.train_step(model, opt, xb, yb).ok  # the trainer's step, NaN/Inf check included

        epoch()  # first pass: buffers are planned and allocated here
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            epoch()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert current - base < 64 * 1024, "memory retained across steps"
        peaks[batch] = peak - base
    # One conv1 activation at batch 128 is 128*26*26*32*4 bytes = 11 MB; what a step allocates
    # (a few small per-call scratch arrays) must stay far below it and must not grow with the batch.
    assert peaks[128] < 4 * 2 ** 20, peaks
    assert peaks[128] < 1.5 * peaks[32] + 256 * 1024, peaks
