"""Training gives bit-identical weights whatever the thread count (1 to 4), for every shipped config
and for a network holding every layer type and every fused block; so does the evaluation forward
after it (batch norm folded into the convolutions, residual adds in their epilogue).

Each thread count runs in its own process (``NUMBA_NUM_THREADS`` is read when Numba starts; more
threads than cores is allowed). Each process trains every network a few steps from the same
seeded weights and batches, with the config's optimizer, schedule-free, and writes the final
weights, buffers and optimizer state; the parent compares them byte for byte.
"""
import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO

THREADS = (1, 2, 3, 4)
STEPS = 3

# Every layer type and every fused block (conv+BN+ReLU, conv+BN, conv+ReLU, BN+ReLU+max-pool, BN+ReLU,
# ReLU+max-pool, leaky ReLU+max-pool), with odd channel counts, padding, stride, dilation and
# overlapping windows.
ZOO = {
    "seed": 3,
    "model": {
        "input_shape": [27, 25, 3],
        "num_classes": 7,
        "layers": [
            {"type": "conv2d", "filters": 10, "kernel_size": 5, "padding": 2},
            {"type": "batchnorm"},
            {"type": "relu"},
            {"type": "maxpool2d", "pool_size": 3, "stride": 2, "padding": 1},
            {"type": "residual", "repeat": 2, "body": [
                {"type": "conv2d", "filters": 10, "kernel_size": 3, "padding": 1, "bias": False},
                {"type": "batchnorm"}, {"type": "relu"},
                {"type": "conv2d", "filters": 10, "kernel_size": 3, "padding": 1, "bias": False},
                {"type": "batchnorm"}]},
            {"type": "residual", "activation": "none", "body": [
                {"type": "conv2d", "filters": 12, "kernel_size": 3, "stride": 2, "padding": 1},
                {"type": "batchnorm"}, {"type": "relu"}, {"type": "dropout", "rate": 0.2},
                {"type": "conv2d", "filters": 12, "kernel_size": 3, "padding": 1}],
             "shortcut": [{"type": "conv2d", "filters": 12, "kernel_size": 1, "stride": 2, "bias": False},
                          {"type": "batchnorm"}]},
            {"type": "conv2d", "filters": 24, "kernel_size": 3, "stride": 2, "dilation": 1, "bias": False},
            {"type": "batchnorm"},
            {"type": "relu"},
            {"type": "conv2d", "filters": 17, "kernel_size": [3, 2], "padding": "same", "dilation": 2},
            {"type": "relu"},
            {"type": "maxpool2d", "pool_size": 2, "stride": 1},
            {"type": "conv2d", "filters": 48, "kernel_size": 1},
            {"type": "leaky_relu", "negative_slope": 0.1},
            {"type": "maxpool2d", "pool_size": 2},
            {"type": "dropout", "rate": 0.3},
            {"type": "conv2d", "filters": 20, "kernel_size": 1},
            {"type": "relu"},
            {"type": "batchnorm"},
            {"type": "relu"},
            {"type": "conv2d", "filters": 20, "kernel_size": 1},
            {"type": "leaky_relu"},
            {"type": "avgpool2d", "pool_size": 1},
            {"type": "global_avgpool"},
            {"type": "flatten"},
            {"type": "dense", "units": 100},
            {"type": "batchnorm"},
            {"type": "leaky_relu", "negative_slope": 0.2},
            {"type": "dropout", "rate": 0.5},
            {"type": "dense", "units": 7},
        ],
    },
    "data": {"dataset": "synthetic", "batch_size": 100},
    "train": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}},
}

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastcnn
    from fastcnn.config import load_config, validate
    from fastcnn.optim import build_optimizer

    configs, out = json.loads(sys.argv[1]), sys.argv[2]
    arrays = {}
    for name, source in configs.items():
        cfg = load_config(source) if isinstance(source, str) else validate(source)
        model = fastcnn.build_model(cfg.model, seed=cfg.seed)
        opt = build_optimizer(cfg.train.optimizer, model.parameters())
        rng = np.random.default_rng(0)
        n = cfg.data.batch_size
        for step in range(%d):
            x = rng.standard_normal((n, *cfg.model.input_shape)).astype(model.dtype)
            y = rng.integers(0, cfg.model.num_classes, n)
            model.step = step
            result = fastcnn.train_step(model, opt, x, y)
            assert result.ok, result.fault
        for key, value in model.state_dict().items():
            arrays[f"{name}/{key}"] = value
        arrays[f"{name}/eval_logits"] = model.forward(x, training=False).copy()
        for key, value in opt.state_dict().items():
            if isinstance(value, np.ndarray):
                arrays[f"{name}/{key}"] = value
    np.savez(out, **arrays)
""" % STEPS)


def _networks():
    nets = {os.path.basename(p)[:-5]: p for p in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))}
    nets["zoo"] = ZOO
    return nets


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("threads")
    nets = json.dumps(_networks())
    results = {}
    for threads in THREADS:
        out = str(tmp / f"t{threads}.npz")
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-c", SCRIPT, nets, out], env=env, capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(out) as f:
            results[threads] = {k: f[k] for k in f.files}
    return results


@pytest.mark.parametrize("network", sorted(_networks()))
def test_bit_identical_for_1_to_4_threads(runs, network):
    reference = {k: v for k, v in runs[1].items() if k.startswith(network + "/")}
    assert reference
    for threads in THREADS[1:]:
        other = {k: v for k, v in runs[threads].items() if k.startswith(network + "/")}
        assert sorted(other) == sorted(reference)
        differ = [k for k in reference if reference[k].tobytes() != other[k].tobytes()]
        assert not differ, f"{network}: {len(differ)} of {len(reference)} arrays differ between 1 and " \
                           f"{threads} threads (first: {differ[0]})"


def test_the_zoo_holds_every_layer_type_and_fused_block():
    import fastcnn
    from fastcnn.layers import LAYER_TYPES

    model = fastcnn.build_model(ZOO["model"], seed=0)
    missing = set(LAYER_TYPES) - {m.kind for _, m in model.named_modules()}
    assert not missing, f"add {sorted(missing)} to ZOO"
    fused = {getattr(b, "kind", "") for b in model.blocks if b not in model.layers}
    assert {"conv2d+batchnorm+relu", "conv2d+relu", "batchnorm+relu", "batchnorm+relu+maxpool2d",
            "relu+maxpool2d", "leaky_relu+maxpool2d"} <= fused, fused
    inner = {getattr(b, "kind", "") for _, m in model.named_modules() if hasattr(m, "branch_blocks")
             for b in m.branch_blocks()}
    assert "conv2d+batchnorm" in inner, inner
