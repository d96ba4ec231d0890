"""conv2d `groups` (DESIGN.md section 8): depthwise and grouped convolution at the layer level.

The forward, input gradient and parameter gradients against the PyTorch twin are in
tests/test_registry_layers.py (EXAMPLES["conv2d"]); the kernels against their NumPy references in
tests/test_kernels_depthwise.py. Here: central differences in float64 with a random upstream gradient,
the declaration (shapes, initialization, FLOPs, description), config errors, float32 against PyTorch at
MobileNet sizes, training steps, and the shipped MobileNet config.
"""
import numpy as np
import pytest

import fastcnn
from fastcnn.config import load_config, validate
from fastcnn.errors import ConfigError
from fastcnn.layers import Conv2D
from fastcnn.summary import format_summary, summarize

from conftest import REPO, numerical_grad, run_cli, sample_indices

# name -> (layer options, per-sample input shape)
LAYERS = {
    # depthwise, channel multiplier 1: the register tiles (16 channels: whole SIMD vectors) and the runs (3)
    "depthwise_c16": ({"filters": 16, "kernel_size": 3, "padding": 1, "groups": 16}, (5, 6, 16)),
    "depthwise_c16_stride2_same": ({"filters": 16, "kernel_size": 3, "stride": 2, "padding": "same",
                                    "groups": 16, "bias": False}, (7, 6, 16)),
    "depthwise_c3_dilation": ({"filters": 3, "kernel_size": [3, 2], "padding": [2, 1], "dilation": 2,
                               "groups": 3}, (6, 5, 3)),
    # depthwise with a channel multiplier
    "depthwise_m2_stride2_same": ({"filters": 6, "kernel_size": 3, "stride": 2, "padding": "same", "groups": 3},
                                  (7, 8, 3)),
    "depthwise_m3_valid": ({"filters": 12, "kernel_size": 2, "groups": 4, "bias": False}, (4, 5, 4)),
    # general groups
    "groups2": ({"filters": 6, "kernel_size": 3, "padding": 1, "groups": 2}, (5, 5, 4)),
    "groups4_stride2_nobias": ({"filters": 8, "kernel_size": 3, "stride": 2, "padding": "same", "groups": 4,
                                "bias": False}, (6, 7, 8)),
}


def built(name, rng, dtype=np.float64):
    options, in_shape = LAYERS[name]
    layer = Conv2D(**options)
    layer.build(in_shape, np.random.default_rng(0), dtype)
    for p in layer.params.values():
        p.data[...] = rng.standard_normal(p.data.shape)
    return layer, in_shape


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradients_match_central_differences(name, rng):
    """dx, dw and db of sum(conv(x) * g) for a random g, in float64."""
    layer, in_shape = built(name, rng)
    x = rng.standard_normal((2, *in_shape))
    x_before = x.copy()
    y = layer.forward(x, True).copy()
    g = rng.standard_normal(y.shape)
    dx = layer.backward(g).copy()
    grads = {k: p.grad.copy() for k, p in layer.params.items()}
    np.testing.assert_array_equal(x, x_before)

    def loss():
        return float(np.sum(layer.forward(x, True) * g))

    idx = sample_indices(x.size, 60, rng)
    num = numerical_grad(loss, x, indices=idx).reshape(-1)[idx]
    np.testing.assert_allclose(dx.reshape(-1)[idx], num, rtol=1e-6, atol=1e-7, err_msg=f"{name} dx")
    for key, p in layer.params.items():
        idx = sample_indices(p.data.size, 20, rng)
        num = numerical_grad(loss, p.data, indices=idx).reshape(-1)[idx]
        np.testing.assert_allclose(grads[key].reshape(-1)[idx], num, rtol=1e-6, atol=1e-7, err_msg=f"{name} {key}")

    # Without the input gradient: None, and the same parameter gradients (overwritten, not accumulated).
    loss()
    assert layer.backward(g, need_input_grad=False) is None
    for key, p in layer.params.items():
        np.testing.assert_array_equal(p.grad, grads[key], err_msg=key)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_output_channel_sees_only_its_group(name, rng):
    """Output channel o depends on the input channels of group o // (filters / groups) only."""
    layer, in_shape = built(name, rng)
    groups, cin, filters = layer.groups, in_shape[2], layer.filters
    x = rng.standard_normal((1, *in_shape))
    y = layer.forward(x, False).copy()
    for c in range(cin):
        x2 = x.copy()
        x2[..., c] += 1.0
        changed = np.any(layer.forward(x2, False) != y, axis=(0, 1, 2))
        group = c // (cin // groups)
        expected = np.zeros(filters, bool)
        expected[group * (filters // groups):(group + 1) * (filters // groups)] = True
        assert not np.any(changed & ~expected), f"{name}: input channel {c} reaches another group"
        assert np.any(changed[expected]), f"{name}: input channel {c} reaches nothing"


def test_declaration():
    dw = Conv2D(filters=32, kernel_size=3, padding=1, groups=32, bias=False)
    assert dw.describe() == "conv2d 32 3x3 s1 p1 g32 nobias"
    assert Conv2D(filters=8, kernel_size=3, groups=2).describe() == "conv2d 8 3x3 s1 p0 g2"
    assert Conv2D(filters=8, kernel_size=3).describe() == "conv2d 8 3x3 s1 p0"  # groups 1 is not shown
    assert dw.parameter_shapes((16, 16, 32)) == {"weight": (3, 3, 1, 32)}
    assert Conv2D(12, 3, groups=4).parameter_shapes((8, 8, 8)) == {"weight": (3, 3, 2, 12), "bias": (12,)}
    dw.build((16, 16, 32), np.random.default_rng(0), np.float32)
    assert dw.output_shape((16, 16, 32)) == (16, 16, 32)
    # FLOPs: 2 per multiply-add, each output sees kh*kw*cin/groups inputs
    assert dw.flops(1) == 2 * 16 * 16 * 9 * 1 * 32
    g4 = Conv2D(12, 3, padding=1, groups=4)
    g4.build((8, 8, 8), np.random.default_rng(0), np.float32)
    assert g4.flops(2) == 2 * 2 * 8 * 8 * 9 * 2 * 12
    m2 = Conv2D(64, 3, stride=2, padding="same", groups=32)
    m2.build((16, 16, 32), np.random.default_rng(0), np.float32)
    assert m2.out_shape == (8, 8, 64) and m2.params["weight"].data.shape == (3, 3, 1, 64)


@pytest.mark.parametrize("scheme", ["he_uniform", "pytorch"])
def test_initialization_fan_in_is_per_group(scheme):
    """fan_in = kh*kw*cin/groups, as PyTorch: he_uniform bound sqrt(6/fan_in), pytorch 1/sqrt(fan_in)."""
    for groups, cin in ((64, 64), (4, 64), (1, 64)):
        layer = Conv2D(64, 3, groups=groups)
        layer.init = scheme
        layer.build((8, 8, cin), np.random.default_rng(1), np.float64)
        fan_in = 9 * cin // groups
        bound = np.sqrt(6.0 / fan_in) if scheme == "he_uniform" else 1.0 / np.sqrt(fan_in)
        w = layer.params["weight"].data
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound, (groups, scheme)
        bias = layer.params["bias"].data
        assert (not bias.any()) if scheme == "he_uniform" else (0 < np.abs(bias).max() <= bound)


def _raw(layers, input_shape=(8, 8, 4)):
    return {"model": {"input_shape": list(input_shape), "num_classes": 3,
                      "layers": [*layers, {"type": "global_avgpool"}, {"type": "dense", "units": 3}]},
            "data": {"dataset": "synthetic"}}


def test_config_errors_name_the_groups_key():
    conv = {"type": "conv2d", "filters": 6, "kernel_size": 3}
    with pytest.raises(ConfigError) as info:
        validate(_raw([{"type": "relu"}, {**conv, "groups": 3}]))          # 4 input channels
    assert info.value.path == "model.layers[1].groups"
    assert str(info.value) == ("model.layers[1].groups: 3 must divide both the input channels (4) and filters (6)")
    with pytest.raises(ConfigError, match=r"^model.layers\[0\].groups: 4 must divide .* filters \(6\)"):
        validate(_raw([{**conv, "groups": 4}]))                            # 6 filters
    with pytest.raises(ConfigError, match=r"^model.layers\[0\].groups: must be >= 1"):
        validate(_raw([{**conv, "groups": 0}]))
    with pytest.raises(ConfigError, match=r"^model.layers\[0\].groups: expected an integer"):
        validate(_raw([{**conv, "groups": "depthwise"}]))
    # inside a residual block, the path goes on into the body
    block = {"type": "residual", "body": [{"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same",
                                           "groups": 3}]}
    with pytest.raises(ConfigError, match=r"^model.layers\[0\].body\[0\].groups: 3 must divide"):
        validate(_raw([block]))
    # valid: depthwise with a multiplier, and groups 2
    validate(_raw([{**conv, "filters": 8, "groups": 4}, {**conv, "groups": 2}]))


@pytest.mark.parametrize("stride", [1, 2])
def test_float32_depthwise_against_torch_at_mobilenet_sizes(stride, rng):
    torch = pytest.importorskip("torch")
    layer = Conv2D(32, 3, stride=stride, padding=1, groups=32)
    layer.build((16, 16, 32), np.random.default_rng(0), np.float32)
    layer.params["bias"].data[...] = rng.standard_normal(32)
    x = rng.standard_normal((8, 16, 16, 32)).astype(np.float32)
    y = layer.forward(x, True)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(g)
    twin = layer.torch_module(torch)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = twin(xt)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.params["weight"].grad, twin.weight.grad.numpy().transpose(2, 3, 1, 0),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(layer.params["bias"].grad, twin.bias.grad.numpy(), rtol=1e-4, atol=1e-3)


def test_train_steps_on_a_depthwise_separable_model(rng):
    """A small MobileNet-style stack trains (loss goes down on a fixed batch); checkpoint keys and shapes."""
    def conv(filters, k=3, **kw):
        return {"type": "conv2d", "filters": filters, "kernel_size": k, "bias": False, **kw}

    bn, relu = {"type": "batchnorm"}, {"type": "relu"}
    cfg = {"input_shape": [8, 8, 3], "num_classes": 4, "layers": [
        conv(16, padding="same"), bn, relu,
        conv(16, padding="same", groups=16), bn, relu, conv(32, 1), bn, relu,
        conv(32, stride=2, padding="same", groups=32), bn, relu, conv(32, 1), bn, relu,
        conv(64, padding=1, groups=32), bn, relu,                              # multiplier 2
        conv(64, padding=1, groups=2), bn, relu,                               # general groups
        {"type": "global_avgpool"}, {"type": "dense", "units": 4}]}
    model = fastcnn.build_model(cfg, seed=0)
    state = model.state_dict()
    assert state["layers.3.weight"].shape == (3, 3, 1, 16)
    assert state["layers.9.weight"].shape == (3, 3, 1, 32)
    assert state["layers.15.weight"].shape == (3, 3, 1, 64)
    assert state["layers.18.weight"].shape == (3, 3, 32, 64)
    opt = fastcnn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = rng.standard_normal((8, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    losses = [float(fastcnn.train_step(model, opt, x, labels).loss) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_mobilenet_config(capsys):
    cfg = load_config(f"{REPO}/configs/mobilenet_cifar10.yaml")
    model = fastcnn.build_model(cfg.model, seed=0)
    depthwise = [layer for layer in model.layers if getattr(layer, "groups", 1) > 1]
    assert len(depthwise) >= 5
    assert all(layer.groups == layer.in_shape[2] for layer in depthwise)
    assert {layer.stride for layer in depthwise} == {(1, 1), (2, 2)}
    info = summarize(model, batch_size=128)
    assert info["layers"][-1]["output_shape"] == [10]
    assert " g32 " in format_summary(info)
    code, out, _ = run_cli(["summary", f"{REPO}/configs/mobilenet_cifar10.yaml"], capsys)
    assert code == 0 and "conv2d 64 3x3 s2 same g64 nobias" in out


def test_bench_script_worker_runs():
    """scripts/bench_depthwise.py's fastcnn worker (a tiny run): one RESULT line with every case timed."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, f"{REPO}/scripts/bench_depthwise.py", "--worker", "fastcnn", "--batch",
                           "2", "--repeat", "1", "--threads", "1", "--only", "4x4x256s2,8x8x128s1", "--multiplier",
                           "2"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line, = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert sorted(result) == sorted(f"2/{s}/{p}" for s in ("4x4x256s2", "8x8x128s1") for p in ("forward", "backward"))
    assert all(t > 0 for t in result.values())
