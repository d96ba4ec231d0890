"""Every layer: central-difference gradient check in float64 with a random upstream gradient."""
import numpy as np
import pytest

from fastcnn.config import validate
from fastcnn.errors import ConfigError
from fastcnn.layers import (
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    MaxPool2D,
    ReLU,
)

from conftest import numerical_grad, sample_indices

LAYERS = [
    ("conv 3x3", lambda: Conv2D(4, 3), (7, 6, 3)),
    ("conv stride 2 pad 1", lambda: Conv2D(3, 3, stride=2, padding=1), (7, 8, 2)),
    ("conv same even kernel", lambda: Conv2D(2, (2, 4), padding="same"), (5, 6, 2)),
    ("conv dilation, no bias", lambda: Conv2D(3, 3, dilation=2, bias=False), (7, 7, 2)),
    ("conv stride (1,2) pad (0,2)", lambda: Conv2D(2, (3, 2), stride=(1, 2), padding=(0, 2)), (6, 5, 3)),
    ("maxpool 2", lambda: MaxPool2D(2), (6, 7, 3)),
    ("maxpool 3 stride 2 (overlap)", lambda: MaxPool2D(3, stride=2), (7, 7, 2)),
    ("maxpool padded", lambda: MaxPool2D(3, stride=2, padding=1), (6, 5, 2)),
    ("relu", lambda: ReLU(), (4, 5, 3)),
    ("leaky relu", lambda: LeakyReLU(0.1), (4, 5, 3)),
    ("batchnorm conv", lambda: BatchNorm(), (4, 3, 5)),
    ("batchnorm dense", lambda: BatchNorm(), (6,)),
    ("flatten", lambda: Flatten(), (3, 4, 2)),
    ("dense", lambda: Dense(5), (7,)),
    ("dense no bias", lambda: Dense(3, bias=False), (4,)),
    ("avgpool 2", lambda: AvgPool2D(2), (6, 7, 3)),
    ("avgpool 3 stride 2 (overlap)", lambda: AvgPool2D(3, stride=2), (7, 7, 2)),
    ("avgpool (2,3) stride (1,2)", lambda: AvgPool2D((2, 3), stride=(1, 2)), (5, 8, 2)),
    ("global avgpool", lambda: GlobalAvgPool(), (5, 4, 3)),
    # step stays 0 outside a model: the same mask on every forward of the check
    ("dropout conv", lambda: Dropout(0.4, seed=3, index=2), (4, 5, 3)),
    ("dropout dense", lambda: Dropout(0.5, seed=1, index=7), (9,)),
]


def _well_separated(rng, shape):
    # Distinct values far from 0 and from each other: max-pool and ReLU are
    # smooth there, so central differences are exact up to rounding.
    n = int(np.prod(shape))
    values = (rng.permutation(n) - n / 2 + 0.5) * 0.05
    return values.reshape(shape)


@pytest.mark.parametrize("name, make, in_shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_gradients_match_central_differences(name, make, in_shape, rng):
    layer = make()
    layer.build(in_shape, np.random.default_rng(0), np.float64)
    batch = 3
    x = _well_separated(rng, (batch, *in_shape))
    for p in layer.params.values():  # non-trivial parameters (batch-norm gamma/beta start at 1/0)
        p.data[...] = rng.normal(size=p.data.shape)
    upstream = rng.normal(size=(batch, *layer.out_shape))

    def loss():
        return float(np.sum(layer.forward(x, training=True) * upstream))

    loss()
    dx = layer.backward(upstream).copy()
    grads = {k: p.grad.copy() for k, p in layer.params.items()}
    idx = sample_indices(x.size, 60, rng)
    expected = numerical_grad(loss, x, indices=idx)
    np.testing.assert_allclose(dx.reshape(-1)[idx], expected.reshape(-1)[idx], rtol=1e-6, atol=1e-6)
    for key, p in layer.params.items():
        pidx = sample_indices(p.data.size, 40, rng)
        expected = numerical_grad(loss, p.data, indices=pidx)
        np.testing.assert_allclose(grads[key].reshape(-1)[pidx], expected.reshape(-1)[pidx], rtol=1e-6, atol=1e-6,
                                   err_msg=f"{name}: d/d{key}")


@pytest.mark.parametrize("name, make, in_shape", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_keeps_dtype(name, make, in_shape, dtype, rng):
    layer = make()
    layer.build(in_shape, np.random.default_rng(0), dtype)
    x = rng.normal(size=(2, *in_shape)).astype(dtype)
    y = layer.forward(x, training=True)
    assert y.dtype == dtype and y.shape == (2, *layer.out_shape)
    dx = layer.backward(np.ones_like(y))
    assert dx.dtype == dtype and dx.shape == x.shape
    for p in layer.params.values():
        assert p.data.dtype == dtype and p.grad.dtype == dtype


def test_batchnorm_running_statistics_and_eval_mode(rng):
    layer = BatchNorm(momentum=0.1)
    layer.build((3, 3, 2), rng, np.float64)
    x = rng.normal(2.0, 3.0, size=(4, 3, 3, 2))
    layer.forward(x, training=True)
    flat = x.reshape(-1, 2)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-12)
    y = layer.forward(x, training=False)
    expected = (x - layer.buffers["running_mean"]) / np.sqrt(layer.buffers["running_var"] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-10)


def test_he_uniform_init_is_seeded_and_bounded():
    a, b = Conv2D(8, 3), Conv2D(8, 3)
    a.build((5, 5, 4), np.random.default_rng(7), np.float32)
    b.build((5, 5, 4), np.random.default_rng(7), np.float32)
    np.testing.assert_array_equal(a.params["weight"].data, b.params["weight"].data)
    bound = np.sqrt(6 / (3 * 3 * 4))
    w = a.params["weight"].data
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    assert not a.params["bias"].data.any()


def test_pytorch_init_scheme_matches_torch_default_bounds():
    from fastcnn.layers import Dense

    conv, dense = Conv2D(16, 3), Dense(20)
    conv.init = dense.init = "pytorch"
    conv.build((6, 6, 8), np.random.default_rng(0), np.float32)
    dense.build((50,), np.random.default_rng(0), np.float32)
    for layer, fan_in in ((conv, 3 * 3 * 8), (dense, 50)):
        bound = 1 / np.sqrt(fan_in)
        for name in ("weight", "bias"):
            values = layer.params[name].data
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.7 * bound, name


def test_new_layers_kind_shapes_and_flops():
    a, g, d = AvgPool2D(3, stride=2), GlobalAvgPool(), Dropout(0.2)
    assert (a.kind, g.kind, d.kind) == ("avgpool2d", "global_avgpool", "dropout")
    assert a.output_shape((7, 9, 4)) == (3, 4, 4)       # floor((7-3)/2)+1, floor((9-3)/2)+1
    assert AvgPool2D(2).output_shape((5, 5, 1)) == (2, 2, 1)  # left-over pixels dropped
    assert g.output_shape((5, 4, 3)) == (3,)
    assert d.output_shape((5, 4, 3)) == (5, 4, 3) and d.output_shape((7,)) == (7,)
    for layer, shape in ((a, (7, 9, 4)), (g, (5, 4, 3)), (d, (7,))):
        layer.build(shape, np.random.default_rng(0), np.float32)
        assert layer.flops(8) == 0 and not layer.params and not layer.buffers


def _cfg(layers, input_shape=(8, 8, 2), num_classes=3):
    return {"model": {"input_shape": list(input_shape), "num_classes": num_classes, "layers": layers},
            "data": {"dataset": "synthetic"}}


def test_new_layers_config_defaults():
    cfg = validate(_cfg([{"type": "avgpool2d"}, {"type": "dropout"}, {"type": "global_avgpool"},
                         {"type": "dense", "units": 3}]))
    assert cfg.model.layers[0] == {"type": "avgpool2d", "pool_size": 2, "stride": None}
    assert cfg.model.layers[1] == {"type": "dropout", "rate": 0.5}
    assert cfg.model.layers[2] == {"type": "global_avgpool"}


@pytest.mark.parametrize("layers, path, words", [
    ([{"type": "dropout", "rate": 1.0}], "model.layers[0].rate", "< 1"),
    ([{"type": "dropout", "rate": -0.1}], "model.layers[0].rate", ">= 0"),
    ([{"type": "dropout", "rate": "half"}], "model.layers[0].rate", "expected a number"),
    ([{"type": "dropout", "p": 0.5}], "model.layers[0].p", "unknown key"),
    ([{"type": "avgpool2d", "pool_size": 0}], "model.layers[0].pool_size", ">= 1"),
    ([{"type": "avgpool2d", "pool_size": [2, 2, 2]}], "model.layers[0].pool_size", "pair"),
    ([{"type": "avgpool2d", "stride": 0}], "model.layers[0].stride", ">= 1"),
    ([{"type": "avgpool2d", "padding": 1}], "model.layers[0].padding", "unknown key"),
    ([{"type": "global_avgpool", "keepdims": True}], "model.layers[0].keepdims", "unknown key"),
    # window bigger than the input
    ([{"type": "avgpool2d", "pool_size": 9}, {"type": "flatten"}, {"type": "dense", "units": 3}],
     "model.layers[0]", "below 1"),
    # global pool on a flat input
    ([{"type": "flatten"}, {"type": "global_avgpool"}, {"type": "dense", "units": 3}],
     "model.layers[1]", "global_avgpool expects a (height, width, channels) input"),
    # global pool output is flat: a pooling layer cannot follow
    ([{"type": "global_avgpool"}, {"type": "avgpool2d"}, {"type": "dense", "units": 3}],
     "model.layers[1]", "avgpool2d expects"),
])
def test_new_layers_config_errors(layers, path, words):
    with pytest.raises(ConfigError) as info:
        validate(_cfg(layers))
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert words in message, message
