"""The residual block (DESIGN.md section 8): gradients, config errors, keys, overrides, summary, training.

The forward, input gradient and parameter gradients against the PyTorch twin are in
tests/test_registry_layers.py (EXAMPLES["residual"]); here: central differences in float64 with a
random upstream gradient, and everything around the block (config, checkpoints, CLI, threads).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

import fastcnn
from fastcnn.checkpoint import load_checkpoint
from fastcnn.config import load_config, validate
from fastcnn.data import loader as loader_module
from fastcnn.errors import ConfigError
from fastcnn.layers import LAYER_TYPES
from fastcnn.summary import format_summary, summarize
from fastcnn.train import Interrupted, Trainer

from conftest import numerical_grad, run_cli, sample_indices

Residual = LAYER_TYPES["residual"]


def conv(filters, k=3, **kw):
    return {"type": "conv2d", "filters": filters, "kernel_size": k, **kw}


BN, RELU = {"type": "batchnorm"}, {"type": "relu"}

# name -> (block options, per-sample input shape)
BLOCKS = {
    "identity_x2": ({"repeat": 2, "body": [conv(3, padding="same"), BN, RELU, conv(3, padding=1), BN]}, (5, 4, 3)),
    "projection": ({"body": [conv(4, stride=2, padding=1, bias=False), BN, RELU, conv(4, padding="same")],
                    "shortcut": [conv(4, 1, stride=2, bias=False), BN]}, (6, 5, 2)),
    "nested_no_activation": ({"repeat": 2, "activation": "none",
                              "body": [{"type": "residual",
                                        "body": [conv(2, 1), RELU, {"type": "maxpool2d", "pool_size": 3,
                                                                    "stride": 1, "padding": 1}]},
                                       BN, {"type": "dropout", "rate": 0.3}]}, (4, 4, 2)),
    "flat": ({"body": [{"type": "dense", "units": 5}, BN, RELU, {"type": "dense", "units": 6}]}, (6,)),
}


def built_block(name, rng, seed=0):
    options, in_shape = BLOCKS[name]
    block = Residual(**options)
    block.build(in_shape, np.random.default_rng(seed), np.float64)
    for _, p in block.named_parameters():  # non-trivial parameters (batch norm starts at 1 and 0)
        p.data[...] = rng.uniform(0.5, 1.5, p.data.shape) * rng.choice([-1, 1], p.data.shape)
    return block, in_shape


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_central_differences(name, training, rng):
    """dx and every parameter's gradient of sum(block(x) * g) for a random g (float64)."""
    block, in_shape = built_block(name, rng)
    x = rng.standard_normal((4, *in_shape))
    x_before = x.copy()
    y = block.forward(x, training).copy()
    g = rng.standard_normal(y.shape)
    g_before = g.copy()
    dx = block.backward(g).copy()
    grads = {k: p.grad.copy() for k, p in block.named_parameters()}
    assert grads, "the block's parameters are its sub-layers'"
    np.testing.assert_array_equal(x, x_before)  # the block never writes into its input
    np.testing.assert_array_equal(g, g_before)  # nor into the gradient it receives
    running = {k: b.copy() for k, b in block.named_buffers()}

    def loss():
        for k, b in block.named_buffers():  # training forwards move the running statistics
            b[...] = running[k]
        return float(np.sum(block.forward(x, training) * g))

    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-7, err_msg=f"{name} dx")
    for key, p in block.named_parameters():
        idx = sample_indices(p.data.size, 6, rng)
        num = numerical_grad(loss, p.data, indices=idx).reshape(-1)[idx]
        np.testing.assert_allclose(grads[key].reshape(-1)[idx], num, rtol=1e-6, atol=1e-7, err_msg=f"{name} {key}")

    # Without the input gradient: None, and the same parameter gradients.
    loss()
    assert block.backward(g, need_input_grad=False) is None
    for key, p in block.named_parameters():
        np.testing.assert_allclose(p.grad, grads[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_forward_is_activation_of_body_plus_shortcut(rng):
    block, in_shape = built_block("projection", rng)
    x = rng.standard_normal((3, *in_shape))
    y = block.forward(x, True).copy()
    (body, short), = block.copies
    b, s = x, x
    for layer in body:
        b = layer.forward(b, True)
    for layer in short:
        s = layer.forward(s, True)
    np.testing.assert_allclose(y, np.maximum(b + s, 0), rtol=1e-12, atol=1e-12)


def test_declaration():
    options, in_shape = BLOCKS["identity_x2"]
    block = Residual(**options)
    assert block.describe() == "residual x2 identity"
    assert Residual(**BLOCKS["projection"][0]).describe() == "residual shortcut conv2d+batchnorm"
    assert Residual(**BLOCKS["nested_no_activation"][0]).describe() == "residual x2 identity, no activation"
    shapes = block.parameter_shapes(in_shape)
    assert sorted(shapes) == sorted(f"{r}.body.{j}.{n}" for r in (0, 1) for j, names in
                                    ((0, ("weight", "bias")), (1, ("gamma", "beta", "running_mean", "running_var")),
                                     (3, ("weight", "bias")), (4, ("gamma", "beta", "running_mean", "running_var")))
                                    for n in names)
    assert block.flops(8) == 0  # the add; the sub-layers count on their own rows
    with pytest.raises(ValueError, match="residual.body: expected a non-empty list of layers"):
        Residual(body=[])
    with pytest.raises(ValueError, match="residual.shortcut: must be 'identity' or a non-empty list"):
        Residual(body=[RELU], shortcut="projection")
    with pytest.raises(ValueError, match=r"residual.body\[0\].type: unknown layer type"):
        Residual(body=[{"type": "conv3d"}])


# -- config ----------------------------------------------------------------------------------------

def model_cfg(*layers, input_shape=(8, 8, 2), num_classes=3):
    return {"input_shape": list(input_shape), "num_classes": num_classes, "layers": list(layers)}


HEAD = [{"type": "global_avgpool"}, {"type": "dense", "units": 3}]


def raw_config(model, out_dir="runs/x", **data):
    return {"seed": 0, "model": model, "data": {"dataset": "synthetic", "num_train": 64, "num_test": 32, **data},
            "train": {"epochs": 1}, "output": {"dir": str(out_dir)}}


def test_branch_shapes_must_agree_naming_block_copy_and_shapes():
    cfg = raw_config(model_cfg(conv(4, padding="same"), BN, RELU,
                               {"type": "residual", "body": [conv(8, padding="same")]}, *HEAD))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    msg = str(info.value)
    assert info.value.path == "model.layers[3]"
    assert msg.startswith("model.layers[3]: copy 0 ") and "(8, 8, 8)" in msg and "(8, 8, 4)" in msg
    assert "projection shortcut" in msg  # the hint for an identity shortcut

    # A mismatch that appears only in the third copy: body H -> H-1, shortcut H -> H//2 + 1 (equal at 4 and 3).
    block = {"type": "residual", "repeat": 3, "body": [{"type": "avgpool2d", "pool_size": 2, "stride": 1}],
             "shortcut": [{"type": "maxpool2d", "pool_size": 2, "stride": 2, "padding": 1}]}
    with pytest.raises(ConfigError) as info:
        validate(raw_config(model_cfg(block, *HEAD, input_shape=(4, 4, 2))))
    msg = str(info.value)
    assert msg.startswith("model.layers[0]: copy 2 (of 3)") and "(1, 1, 2)" in msg and "(2, 2, 2)" in msg

    # A sub-layer's own error names its path inside the block (and the copy when the block repeats).
    block = {"type": "residual", "repeat": 2, "body": [conv(2, 30)]}
    with pytest.raises(ConfigError, match=r"^model.layers\[0\].body\[0\]: .*below 1.*\(copy 0 of 2"):
        validate(raw_config(model_cfg(block, *HEAD)))
    with pytest.raises(ConfigError, match=r"^model.layers\[1\].shortcut\[0\].kernel_size: expected an integer"):
        validate(raw_config(model_cfg(RELU, {"type": "residual", "body": [RELU], "shortcut": [conv(2, "3")]},
                                      *HEAD)))
    with pytest.raises(ConfigError, match=r"^model.layers\[0\].body\[0\].body\[1\].filterz: unknown key"):
        validate(raw_config(model_cfg({"type": "residual", "body": [
            {"type": "residual", "body": [RELU, {"type": "conv2d", "filterz": 2, "kernel_size": 1}]}]}, *HEAD)))


def test_mismatch_is_reported_before_any_data_is_read(tmp_path, capsys):
    """With an MNIST config whose data folder is empty (and offline), the config error comes first."""
    cfg = raw_config(model_cfg(conv(4, padding="same"), {"type": "residual", "body": [conv(5, padding="same")]},
                               {"type": "global_avgpool"}, {"type": "dense", "units": 10}, input_shape=(28, 28, 1),
                               num_classes=10), tmp_path / "run")
    cfg["data"] = {"dataset": "mnist", "root": str(tmp_path / "no_data_here")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["train", str(path)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("Error: model.layers[1]: copy 0 (of 1): the body gives "
                                                   "(28, 28, 5)"), err
    assert not (tmp_path / "no_data_here").exists() and not (tmp_path / "run").exists()


def test_model_size_check_counts_every_copy():
    flat = [{"type": "flatten"}]
    block = {"type": "residual", "repeat": 40, "body": [{"type": "dense", "units": 1000},
                                                       {"type": "dense", "units": 30000}]}
    cfg = raw_config(model_cfg(*flat, block, {"type": "dense", "units": 3}, input_shape=(1, 1, 30000)))
    with pytest.raises(ConfigError, match=r"^model.layers\[1\]: the model would have 2,401,2"):
        validate(cfg)
    block["repeat"] = 10  # 600 million: allowed (nothing is allocated by validation)
    validate(cfg)


STAGE = {"type": "residual", "body": [conv(16, padding="same", bias=False), BN, RELU,
                                      conv(16, padding="same", bias=False), BN]}


def write_yaml(tmp_path, raw):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_set_reaches_inside_a_body(tmp_path, capsys):
    raw = raw_config(model_cfg(conv(16, padding="same"), BN, RELU, dict(STAGE), *HEAD))
    path = write_yaml(tmp_path, raw)
    cfg = load_config(path, ["model.layers[3].body[0].filters=32"])
    assert cfg.model.layers[3]["body"][0]["filters"] == 32
    model = fastcnn.build_model(cfg.model)
    assert model.state_dict()["layers.3.0.body.0.weight"].shape == (3, 3, 16, 32)
    assert model.state_dict()["layers.3.0.body.3.weight"].shape == (3, 3, 32, 16)
    # Options absent from the file (their defaults) and the block's own options can be set too.
    cfg = load_config(path, ["model.layers[3].body[0].dilation=2", "model.layers[3].repeat=3",
                             "model.layers[3].shortcut=[{type: conv2d, filters: 16, kernel_size: 1}]"])
    model = fastcnn.build_model(cfg.model)
    assert "layers.3.2.shortcut.0.weight" in model.state_dict()
    assert model.layers[3].copies[0][0][0].dilation == (2, 2)
    with pytest.raises(ConfigError, match=r"^model.layers\[3\]: copy 0 .*\(8, 8, 8\).*\(8, 8, 16\)"):
        load_config(path, ["model.layers[3].body[3].filters=8"])
    with pytest.raises(ConfigError, match=r"model.layers\[3\].body\[7\]: no such list element"):
        load_config(path, ["model.layers[3].body[7].filters=8"])
    with pytest.raises(ConfigError, match=r"model.layers\[3\].body\[0\].filterz: no such key.*'filters'"):
        load_config(path, ["model.layers[3].body[0].filterz=8"])
    code, out, err = run_cli(["summary", path, "--set", "model.layers[3].body[0].filters=32"], capsys)
    assert code == 0, err
    assert any(line.split()[:3] == ["3.0.body.0", "conv2d", "32"] for line in out.splitlines()), out


# -- model: keys, dropout, summary --------------------------------------------------------------------

NESTED = model_cfg(conv(4, padding="same"),
                   {"type": "residual", "repeat": 2,
                    "body": [conv(4, padding="same"), BN, RELU, {"type": "dropout", "rate": 0.25},
                             {"type": "residual", "body": [conv(4, 1), {"type": "dropout", "rate": 0.5}],
                              "activation": "none"}]},
                   {"type": "residual", "body": [conv(6, stride=2, padding=1), BN],
                    "shortcut": [conv(6, 1, stride=2), BN]},
                   {"type": "dropout", "rate": 0.1}, *HEAD)


def test_state_dict_keys():
    model = fastcnn.build_model(NESTED, seed=1)
    bn = ["gamma", "beta", "running_mean", "running_var"]
    expected = ["layers.0.weight", "layers.0.bias"]
    for r in (0, 1):
        expected += [f"layers.1.{r}.body.0.weight", f"layers.1.{r}.body.0.bias"]
        expected += [f"layers.1.{r}.body.1.{n}" for n in bn]
        expected += [f"layers.1.{r}.body.4.0.body.0.weight", f"layers.1.{r}.body.4.0.body.0.bias"]
    expected += ["layers.2.0.body.0.weight", "layers.2.0.body.0.bias", *(f"layers.2.0.body.1.{n}" for n in bn),
                 "layers.2.0.shortcut.0.weight", "layers.2.0.shortcut.0.bias",
                 *(f"layers.2.0.shortcut.1.{n}" for n in bn), "layers.5.weight", "layers.5.bias"]
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    assert state["layers.2.0.shortcut.0.weight"].shape == (1, 1, 4, 6)
    # A model built from another seed takes the state and then computes the same thing.
    other = fastcnn.build_model(NESTED, seed=2)
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 2)).astype(np.float32)
    assert not np.array_equal(other.forward(x, training=False), model.forward(x, training=False))
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.forward(x, training=False), model.forward(x, training=False))
    # Same seed, same weights: sub-layers are built in a fixed order from the model's rng.
    again = fastcnn.build_model(NESTED, seed=1).state_dict()
    assert all(np.array_equal(again[k], v) for k, v in state.items())


def test_nested_dropout_has_the_model_seed_a_unique_index_and_the_step():
    model = fastcnn.build_model(NESTED, seed=5)
    drops = [(path, m) for path, m in model.named_modules() if m.kind == "dropout"]
    assert [p for p, _ in drops] == ["layers.1.0.body.3", "layers.1.0.body.4.0.body.1", "layers.1.1.body.3",
                                     "layers.1.1.body.4.0.body.1", "layers.3"]
    # Top-level: the position; nested: after the top-level positions, in named_modules() order.
    assert [m.index for _, m in drops] == [6, 7, 8, 9, 3]
    assert all(m.seed == 5 for _, m in drops)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 2)).astype(np.float32)
    model.step = 7
    model.forward(x, training=True)
    assert all(m.step == 7 for _, m in drops)
    masks = [m.mask.copy() for _, m in drops[:4]]
    assert not any(np.array_equal(masks[0], other) for other in masks[2:3])  # copies draw their own masks


def test_summary_rows_walk_the_blocks(capsys):
    model = fastcnn.build_model(NESTED)
    info = summarize(model, batch_size=2)
    rows = info["layers"]
    assert [r["index"] for r in rows[:4]] == [0, 1, "1.0.body.0", "1.0.body.1"]
    nested = next(r for r in rows if r["index"] == "1.0.body.4")
    assert nested["type"] == "residual" and nested["depth"] == 1 and nested["description"] == \
        "residual identity, no activation"
    assert next(r for r in rows if r["index"] == "1.0.body.4.0.body.0")["depth"] == 2
    block = next(r for r in rows if r["index"] == 1)
    assert block["description"] == "residual x2 identity" and block["depth"] == 0
    assert block["params"] == sum(v.size for k, v in model.state_dict().items() if k.startswith("layers.1."))
    assert block["flops"] == sum(m.flops(1) for _, m in model.layers[1].named_modules()) > 0
    assert info["total_params"] == sum(v.size for v in model.state_dict().values())
    assert info["flops_per_image"] == sum(m.flops(1) for _, m in model.named_modules())
    text = format_summary(info)
    assert "2.0.shortcut.0    conv2d 6 1x1 s2 p0" in text, text


# -- training -----------------------------------------------------------------------------------------

def tiny_config(out_dir, epochs=2):
    model = model_cfg(conv(6, padding="same", bias=False), BN, RELU,
                      {"type": "residual", "repeat": 2,
                       "body": [conv(6, padding="same", bias=False), BN, RELU, {"type": "dropout", "rate": 0.1},
                                conv(6, padding="same", bias=False), BN]},
                      {"type": "residual", "body": [conv(8, stride=2, padding=1, bias=False), BN, RELU,
                                                    conv(8, padding="same", bias=False), BN],
                       "shortcut": [conv(8, 1, stride=2, bias=False), BN]},
                      {"type": "global_avgpool"}, {"type": "dense", "units": 4},
                      input_shape=(12, 12, 1), num_classes=4)
    raw = raw_config(model, out_dir, num_train=192, num_test=64, batch_size=32)
    raw["train"] = {"epochs": epochs, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "threads": 2}
    return raw


def test_train_resume_eval_predict_through_the_cli(tmp_path, capsys, monkeypatch):
    import signal

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config("unused")))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    code, _, err = run_cli(["train", str(config), "--set", f"output.dir={ref_dir}", "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[1]["train_loss"] < records[0]["train_loss"]

    # Interrupted mid-epoch 2 (SIGTERM, as test_robustness), then resumed: bit for bit the same weights.
    original = loader_module.BatchLoader.epoch_batches

    def interrupting(self, e, start=0):
        for i, item in enumerate(original(self, e, start=start), start=start):
            if (e, i) == (1, 2):
                signal.raise_signal(signal.SIGTERM)
            yield item

    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", interrupting)
    with pytest.raises(Interrupted):
        Trainer(load_config(str(config), [f"output.dir={run_dir}"]), progress=False, log=lambda *a: None).run()
    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", original)
    code, _, err = run_cli(["train", str(config), "--set", f"output.dir={run_dir}", "--resume",
                            str(run_dir / "last.npz"), "--no-progress"], capsys)
    assert code == 0, err
    ref, got = load_checkpoint(ref_dir / "last.npz"), load_checkpoint(run_dir / "last.npz")
    assert sorted(ref.model) == sorted(got.model) and "layers.4.0.shortcut.1.running_var" in ref.model
    for key in ref.model:
        assert ref.model[key].tobytes() == got.model[key].tobytes(), key
    for key in ref.optim:
        assert ref.optim[key].tobytes() == got.optim[key].tobytes(), key

    code, out, err = run_cli(["eval", str(ref_dir / "best.npz"), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["confusion_matrix"]) == 4
    x = np.random.default_rng(0).standard_normal((3, 12, 12, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(["predict", str(ref_dir / "best.npz"), str(tmp_path / "x.npy"), "--json",
                              "--no-normalize"], capsys)
    assert code == 0, err
    model = fastcnn.build_model(load_config(str(config)).model)
    model.load_state_dict(load_checkpoint(ref_dir / "best.npz").model)
    expected = model.forward(x, training=False).argmax(axis=1)
    assert [r["top"][0]["class"] for r in json.loads(out)] == expected.tolist()


THREADS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import fastcnn, yaml
    from fastcnn.config import validate
    from fastcnn.optim import build_optimizer

    cfg = validate(yaml.safe_load(open(sys.argv[1])))
    model = fastcnn.build_model(cfg.model, seed=cfg.seed)
    opt = build_optimizer(cfg.train.optimizer, model.parameters())
    rng = np.random.default_rng(0)
    for step in range(3):
        x = rng.standard_normal((32, *cfg.model.input_shape)).astype(model.dtype)
        y = rng.integers(0, cfg.model.num_classes, 32)
        model.step = step
        assert fastcnn.train_step(model, opt, x, y).ok
    np.savez(sys.argv[2], **model.state_dict())
""")


def test_weights_are_bit_identical_for_1_and_3_threads(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "unused")))
    results = {}
    for threads in (1, 3):
        out = tmp_path / f"t{threads}.npz"
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(config), str(out)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(out) as f:
            results[threads] = {k: f[k] for k in f.files}
    assert sorted(results[1]) == sorted(results[3])
    differ = [k for k in results[1] if results[1][k].tobytes() != results[3][k].tobytes()]
    assert not differ, differ


def test_resnet_mnist_config_validates():
    from conftest import REPO

    cfg = load_config(os.path.join(REPO, "configs", "resnet_mnist.yaml"))
    assert cfg.data.dataset == "mnist" and cfg.train.epochs <= 5 and cfg.data.batch_size == 128
    model = fastcnn.build_model(cfg.model)
    kinds = {m.kind for _, m in model.named_modules()}
    assert {"residual", "batchnorm", "global_avgpool"} <= kinds
    assert any(b.shortcut_specs for b in model.layers if b.kind == "residual")
    x = np.zeros((2, 28, 28, 1), np.float32)
    assert model.forward(x, training=False).shape == (2, 10)


# -- the add + ReLU kernels, fusion inside the branches, fuse=False ---------------------------------

def _run(blocks, x, training):
    for block in blocks:
        x = block.forward(x, training)
    return x


def _run_back(blocks, g):
    for k in range(len(blocks) - 1, -1, -1):
        g = blocks[k].backward(g)
    return g


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_fused_add_relu_is_bit_identical_to_the_unfused_computation(activation, shortcut, rng):
    """The block's one-pass add+ReLU forward, and its backward (the mask, and between copies the
    add and the previous copy's mask in one pass) give the bits of np.add then a ReLU / its mask."""
    body = [conv(4, padding="same", bias=False), BN, RELU, conv(4, padding="same", bias=False), BN]
    short = "identity" if shortcut == "identity" else [conv(4, 1, bias=False), BN]
    block = Residual(body=body, shortcut=short, activation=activation, repeat=3)
    block.build((6, 5, 4), np.random.default_rng(0), np.float32)
    x = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)
    dy = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)
    y = block.forward(x, True).copy()
    dx = block.backward(dy).copy()
    grads = {k: p.grad.copy() for k, p in block.named_parameters()}

    # The unfused computation, through the same (fused) branch blocks.
    relu = activation == "relu"
    outs, h = [], x
    for body_blocks, short_blocks in block._runs:
        s = h if short_blocks is None else _run(short_blocks, h, True).copy()
        z = np.add(_run(body_blocks, h, True), s)
        h = np.where(z <= 0, np.float32(0), z) if relu else z
        outs.append(h)
    assert y.tobytes() == outs[-1].tobytes()
    g = np.where(outs[-1] <= 0, np.float32(0), dy) if relu else dy
    for r in range(len(block._runs) - 1, -1, -1):
        body_blocks, short_blocks = block._runs[r]
        db = _run_back(body_blocks, g).copy()
        ds = g if short_blocks is None else _run_back(short_blocks, g)
        d = np.add(db, ds)
        g = np.where(outs[r - 1] <= 0, np.float32(0), d) if relu and r > 0 else d
    assert dx.dtype == np.float32 and dx.tobytes() == g.tobytes()
    for key, p in block.named_parameters():
        assert grads[key].tobytes() == p.grad.tobytes(), key


def _kinds(blocks):
    return [type(b).__name__ for b in blocks]


def test_branches_fuse_batchnorm_relu_inside_and_never_across_the_block_input():
    from fastcnn.fusion import Block

    cfg = model_cfg(conv(4, padding="same", bias=False), BN, RELU,
                    {"type": "residual", "body": [BN, RELU, conv(4, padding="same", bias=False), BN, RELU,
                                                  {"type": "residual", "body": [conv(4, 1), BN, RELU]}],
                     "shortcut": [RELU, {"type": "maxpool2d", "pool_size": 3, "stride": 1, "padding": 1}]},
                    *HEAD)
    model = fastcnn.build_model(cfg)
    # Top level: conv, batchnorm+relu, then the block whole: its input feeds two consumers (both branches).
    assert _kinds(model.blocks)[:2] == ["ConvBatchNorm", "Residual"]
    block = model.blocks[1]
    (body, short), = block._runs
    assert _kinds(body) == ["BatchNormReLU", "ConvBatchNorm", "Residual"]
    assert _kinds(short) == ["ActivationMaxPool2D"]
    (inner, _), = body[2]._runs
    assert _kinds(inner) == ["ConvBatchNorm"]
    # A fused block holds layers of one branch only, starting at the branch's own first layer.
    (body_layers, short_layers), = block.copies
    for blocks, layers in ((body, body_layers), (short, short_layers)):
        covered = [layer for b in blocks for layer in (b.layers if isinstance(b, Block) else (b,))]
        assert covered == layers
    # fuse=False reaches inside the blocks, nested ones included; the results stay the same (to
    # rounding: the fused batch norm may add its statistics in another order).
    plain = fastcnn.build_model(cfg, fuse=False)
    (pbody, pshort), = plain.layers[3]._runs
    assert not any(isinstance(b, Block) for b in (*plain.blocks, *pbody, *pshort, *pbody[5]._runs[0][0]))
    assert _kinds(pbody) == ["BatchNorm", "ReLU", "Conv2D", "BatchNorm", "ReLU", "Residual"]
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(plain.forward(x, training=True), model.forward(x, training=True), rtol=1e-5,
                               atol=1e-5)


def test_resnet20_cifar10_config():
    """ResNet-20 (He et al. 2016): 19 3x3 convs in 3 stages of 3 basic blocks, two stride-2
    projection shortcuts, about 0.27M parameters; it trains (two steps on random data)."""
    from conftest import REPO

    cfg = load_config(os.path.join(REPO, "configs", "resnet20_cifar10.yaml"))
    assert cfg.data.dataset == "cifar10" and cfg.data.batch_size == 128
    assert dict(cfg.data.augment) == {"crop_padding": 4, "horizontal_flip": True}
    opt = dict(cfg.train.optimizer)
    assert (opt["name"], opt["lr"], opt["momentum"]) == ("sgd", 0.1, 0.9) and opt["weight_decay"] in (1e-4, 5e-4)
    assert cfg.train.schedule["name"] == "cosine"
    model = fastcnn.build_model(cfg.model)
    assert 0.26e6 < model.num_parameters() < 0.28e6
    convs = [m for _, m in model.named_modules() if m.kind == "conv2d"]
    assert [c.kernel for c in convs].count((3, 3)) == 19 and len(convs) == 21
    assert all(not c.params.get("bias") for c in convs)
    blocks = [m for m in model.layers if m.kind == "residual"]
    assert sum(b.repeat for b in blocks) == 9 and sum(1 for b in blocks if b.shortcut_specs) == 2
    assert [b.out_shape for b in blocks] == [(32, 32, 16), (16, 16, 32), (16, 16, 32), (8, 8, 64), (8, 8, 64)]
    from fastcnn.optim import build_optimizer

    optimizer = build_optimizer(cfg.train.optimizer, model.parameters())
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
        assert fastcnn.train_step(model, optimizer, x, rng.integers(0, 10, 4)).ok


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_evaluation_forward_folds_the_add_into_the_last_convolution(dtype, activation):
    """A body ending in conv + batch norm: in evaluation that convolution (batch norm folded in) adds
    the shortcut and applies the block's ReLU as it writes its output. Equal to the unfused model to
    rounding, and so are the gradients of a backward after it (it reruns the blocks first)."""
    from fastcnn.fusion import ConvBatchNorm

    projection = [conv(6, 1, stride=2, bias=False), BN]
    cfg = {**model_cfg(conv(4, padding="same"), BN, RELU,
                       {"type": "residual", "repeat": 2, "activation": activation,
                        "body": [conv(4, padding="same", bias=False), BN, RELU, conv(4, padding="same"), BN]},
                       {"type": "residual", "activation": activation, "shortcut": projection,
                        "body": [conv(6, stride=2, padding="same", bias=False), BN, RELU,
                                 conv(6, padding="same", bias=False), BN]},
                       *HEAD, input_shape=(9, 7, 3)), "dtype": dtype}
    fused, plain = (fastcnn.build_model(cfg, seed=2, fuse=f) for f in (True, False))
    block = fused.blocks[1]
    assert isinstance(block._runs[0][0][-1], ConvBatchNorm)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 9, 7, 3)).astype(dtype)
    for model in (fused, plain):  # running statistics away from 0 and 1
        model.forward(3 * x + 1, training=True)
    out = [m.forward(x, training=False) for m in (fused, plain)]
    r = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out[0], out[1], rtol=r, atol=r * float(np.max(np.abs(out[1]))))
    dlogits = rng.standard_normal(out[1].shape).astype(dtype)
    dx = [m.backward(dlogits, input_grad=True) for m in (fused, plain)]
    scale = max(float(np.max(np.abs(q.grad))) for _, q in plain.named_parameters())
    np.testing.assert_allclose(dx[0], dx[1], rtol=r, atol=r * float(np.max(np.abs(dx[1]))))
    for (k, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=r, atol=r * scale, err_msg=k)
    # A training forward after it runs the blocks as before: the same bits as the unfused model.
    assert np.array_equal(fused.forward(x, training=True), plain.forward(x, training=True))
