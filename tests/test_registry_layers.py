"""Every registered layer type is complete: documented, described, consistent, and twinned in PyTorch.

Walks ``fastcnn.layers.LAYER_TYPES``: a new layer type is checked here without touching this
file, except for one entry in EXAMPLES (options and an input shape to build it with).
"""
import re

import numpy as np
import pytest

from fastcnn.layers import LAYER_TYPES
from fastcnn.schema import REQUIRED

from conftest import REPO

# A small configuration of each layer type and the per-sample input shape to build it for.
EXAMPLES = {
    "conv2d": [({"filters": 5, "kernel_size": 3, "stride": 2, "padding": 1}, (7, 6, 3)),
               ({"filters": 4, "kernel_size": [2, 3], "padding": "same", "dilation": 2, "bias": False}, (6, 7, 2)),
               ({"filters": 3, "kernel_size": [4, 3], "padding": "same", "stride": [2, 3]}, (7, 8, 2)),
               # groups: depthwise (groups = input channels), channel multiplier 1 and 2, and general groups
               ({"filters": 16, "kernel_size": 3, "padding": 1, "groups": 16}, (5, 6, 16)),
               ({"filters": 6, "kernel_size": 3, "stride": 2, "padding": "same", "groups": 3, "bias": False},
                (7, 8, 3)),
               ({"filters": 6, "kernel_size": [3, 2], "padding": 1, "dilation": [1, 2], "groups": 2}, (6, 7, 4))],
    "maxpool2d": [({"pool_size": 3, "stride": 2, "padding": 1}, (7, 6, 3)), ({}, (6, 6, 2))],
    "avgpool2d": [({"pool_size": [2, 3], "stride": [1, 2]}, (5, 8, 2))],
    "global_avgpool": [({}, (4, 5, 3))],
    "relu": [({}, (4, 5, 3)), ({}, (7,))],
    "leaky_relu": [({"negative_slope": 0.2}, (4, 5, 3))],
    "batchnorm": [({}, (4, 3, 5)), ({"momentum": 0.3, "eps": 1e-3}, (6,))],
    "flatten": [({}, (3, 4, 2))],
    "dense": [({"units": 5}, (7,)), ({"units": 3, "bias": False}, (4,))],
    "dropout": [({"rate": 0.3}, (4, 5, 3))],
    "residual": [
        ({"body": [{"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": "same"}, {"type": "batchnorm"},
                   {"type": "relu"}, {"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": 1}]}, (5, 4, 3)),
        ({"body": [{"type": "conv2d", "filters": 4, "kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
                   {"type": "batchnorm"}, {"type": "relu"}, {"type": "conv2d", "filters": 4, "kernel_size": 3,
                                                             "padding": "same"}],
          "shortcut": [{"type": "conv2d", "filters": 4, "kernel_size": 1, "stride": 2, "bias": False},
                       {"type": "batchnorm"}]}, (6, 5, 2)),
        ({"repeat": 2, "activation": "none",
          "body": [{"type": "residual", "body": [{"type": "conv2d", "filters": 2, "kernel_size": 1},
                                                 {"type": "relu"}, {"type": "maxpool2d", "pool_size": 3,
                                                                    "stride": 1, "padding": 1}]},
                   {"type": "batchnorm"}]}, (4, 4, 2)),
    ],
}


def _readme_rows():
    """{kind: row text} from the README's layer table (rows starting with | `kind` |)."""
    with open(f"{REPO}/README.md", encoding="utf-8") as f:
        text = f.read()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `([a-z0-9_]+)` \|(.*)$", line)
        if m and m.group(1) in LAYER_TYPES:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_layer_type_has_examples():
    assert sorted(EXAMPLES) == sorted(LAYER_TYPES), "add the new layer type to EXAMPLES"


@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
def test_documented_in_readme(kind):
    rows = _readme_rows()
    assert kind in rows, f"README's layer table has no row for `{kind}`"
    for option in LAYER_TYPES[kind].options:
        assert f"`{option}`" in rows[kind], f"README row of `{kind}` does not document option `{option}`"


@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
def test_declaration_is_consistent(kind):
    cls = LAYER_TYPES[kind]
    assert cls.__module__ == f"fastcnn.layers.{kind}", "one module per layer type, named after it"
    for name, (checker, default) in cls.options.items():
        assert callable(checker), f"{kind}.{name}: no checker"
        if default is not REQUIRED:
            assert checker(default, name) == default or default is None, f"{kind}.{name}: default fails its check"
    for options, in_shape in EXAMPLES[kind]:
        layer = cls(**options)
        text = layer.describe()
        assert isinstance(text, str) and text.startswith(kind)
        out_shape = layer.output_shape(in_shape, "x")
        layer.build(in_shape, np.random.default_rng(0), np.float64)
        assert layer.out_shape == tuple(out_shape)
        built = {name: p.data.shape for name, p in layer.named_parameters()}  # a container's: its sub-layers'
        built.update({name: b.shape for name, b in layer.named_buffers()})
        assert built == {k: tuple(v) for k, v in layer.parameter_shapes(in_shape).items()}
        assert layer.flops(3) == 3 * layer.flops(1) >= 0
        if layer.params.get("weight") is not None:
            assert layer.flops(1) > 0


def test_constructor_uses_the_declared_checks():
    conv = LAYER_TYPES["conv2d"]
    assert conv(4, 3).config == conv(filters=4, kernel_size=3).config  # positional in declaration order
    with pytest.raises(ValueError, match="conv2d.filters: must be >= 1"):
        conv(0, 3)
    with pytest.raises(ValueError, match="did you mean 'stride'"):
        conv(4, 3, strides=2)
    with pytest.raises(TypeError):
        LAYER_TYPES["relu"](1)


def _torch_loss(layer, torch, x, g, training):
    """sum(twin(x) * g) in float64, with the twin built from the layer's current weights."""
    from fastcnn.torch_reference import to_torch_input

    mod = layer.torch_module(torch).train(training)
    four_d = x.ndim == 4
    xt = to_torch_input(x, torch, channels_last=False).clone().requires_grad_(True) if four_d else \
        torch.tensor(x, requires_grad=True)
    yt = mod(xt)
    gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy() if g.ndim == 4 else g.copy())
    loss = (yt * gt).sum()
    return loss, xt, yt


@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
def test_forward_and_backward_match_the_torch_twin(kind, rng):
    """Output, input gradient and every parameter gradient against PyTorch autograd (float64).

    Parameter gradients are compared as directional derivatives (sum(grad * V) for a random V
    against central differences of the twin's loss), so no layout mapping is needed here."""
    torch = pytest.importorskip("torch")
    cls = LAYER_TYPES[kind]
    for options, in_shape in EXAMPLES[kind]:
        layer = cls(**options)
        layer.build(in_shape, np.random.default_rng(1), np.float64)
        params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())  # nested ones too
        for p in params.values():  # non-trivial parameters (batch norm starts at 1 and 0)
            p.data[...] = rng.uniform(0.5, 1.5, p.data.shape) * rng.choice([-1, 1], p.data.shape)
        # Dropout draws its own masks in torch: compare evaluation mode (the identity) there.
        training = not getattr(layer, "uses_step", False)
        x = rng.standard_normal((4, *in_shape))
        saved = {k: v.copy() for k, v in buffers.items()}
        y = layer.forward(x, training=training).copy()
        g = rng.standard_normal(y.shape)
        dx = layer.backward(g).copy()
        grads = {name: p.grad.copy() for name, p in params.items()}
        for k, v in saved.items():  # the twin starts from the same running statistics
            buffers[k][...] = v
        loss, xt, yt = _torch_loss(layer, torch, x, g, training)
        loss.backward()
        y_t = yt.detach().numpy()
        y_t = y_t.transpose(0, 2, 3, 1) if y_t.ndim == 4 else y_t
        np.testing.assert_allclose(y, y_t, rtol=1e-10, atol=1e-10, err_msg=f"{kind} forward")
        dx_t = xt.grad.numpy()
        dx_t = dx_t.transpose(0, 2, 3, 1) if dx_t.ndim == 4 else dx_t
        np.testing.assert_allclose(dx, dx_t, rtol=1e-9, atol=1e-9, err_msg=f"{kind} input gradient")
        eps = 1e-6
        for name, p in params.items():
            v = rng.standard_normal(p.data.shape)
            base = p.data.copy()
            losses = []
            for sign in (1, -1):
                p.data[...] = base + sign * eps * v
                for k, b in saved.items():
                    buffers[k][...] = b
                losses.append(float(_torch_loss(layer, torch, x, g, training)[0].detach()))
            p.data[...] = base
            expected = (losses[0] - losses[1]) / (2 * eps)
            got = float(np.sum(grads[name] * v))
            assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), f"{kind}.{name} gradient"
