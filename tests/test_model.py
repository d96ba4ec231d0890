"""Sequential: whole-model gradient check, state_dict round trip, key names."""
import numpy as np
import pytest

import fastcnn
from fastcnn.errors import CheckpointError

from conftest import numerical_grad, sample_indices

SMALL_NET = {
    "input_shape": [9, 8, 2],
    "num_classes": 3,
    "dtype": "float64",
    "layers": [
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same"},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 3, "stride": 2},
        {"type": "conv2d", "filters": 3, "kernel_size": [2, 3], "stride": 2, "padding": 1},
        {"type": "leaky_relu", "negative_slope": 0.2},
        {"type": "flatten"},
        {"type": "dense", "units": 6},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "dense", "units": 3},
    ],
}


def test_whole_model_gradients_match_central_differences(rng):
    model = fastcnn.build_model(SMALL_NET, seed=3)
    x = rng.normal(size=(4, 9, 8, 2))
    labels = np.array([0, 2, 1, 2])
    upstream = rng.normal(size=(4, 3))

    def loss():
        logits = model.forward(x, training=True)
        value, _ = fastcnn.softmax_cross_entropy(logits, labels)
        return value + float(np.sum(logits * upstream))

    logits = model.forward(x, training=True)
    _, dlogits = fastcnn.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits + upstream)
    grads = {k: p.grad.copy() for k, p in model.named_parameters()}
    assert set(grads) == {"layers.0.weight", "layers.0.bias", "layers.1.gamma", "layers.1.beta", "layers.4.weight",
                          "layers.4.bias", "layers.7.weight", "layers.7.bias", "layers.8.gamma", "layers.8.beta",
                          "layers.10.weight", "layers.10.bias"}
    idx = sample_indices(x.size, 50, rng)
    np.testing.assert_allclose(dx.reshape(-1)[idx], numerical_grad(loss, x, indices=idx).reshape(-1)[idx],
                               rtol=1e-5, atol=1e-8)
    for key, p in model.named_parameters():
        pidx = sample_indices(p.data.size, 25, rng)
        expected = numerical_grad(loss, p.data, indices=pidx).reshape(-1)[pidx]
        np.testing.assert_allclose(grads[key].reshape(-1)[pidx], expected, rtol=1e-5, atol=1e-8, err_msg=key)


def test_state_dict_round_trip_and_keys():
    cfg = fastcnn.load_config("configs/mnist_bn.yaml")
    a = fastcnn.build_model(cfg.model, seed=0)
    b = fastcnn.build_model(cfg.model, seed=1)
    state = a.state_dict()
    assert "layers.0.weight" in state and "layers.1.running_var" in state and "layers.11.bias" in state
    assert state["layers.0.weight"].shape == (3, 3, 1, 32)
    b.load_state_dict(state)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(a.forward(x, training=False), b.forward(x, training=False))
    # state_dict returns copies: changing them leaves the model alone.
    state["layers.0.weight"][...] = 0
    assert a.parameters()[0].data.any()


def test_seed_network_keys_as_documented():
    model = fastcnn.build_model(fastcnn.load_config("configs/mnist.yaml").model, seed=0)
    assert list(model.state_dict()) == ["layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias",
                                        "layers.7.weight", "layers.7.bias", "layers.9.weight", "layers.9.bias"]
    assert model.num_parameters() == 225034


def test_load_state_dict_names_the_first_mismatch():
    model = fastcnn.build_model(fastcnn.load_config("configs/mnist.yaml").model, seed=0)
    state = model.state_dict()
    state["layers.3.weight"] = np.zeros((3, 3, 32, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"layers.3.weight: shape \(3, 3, 32, 16\).*\(3, 3, 32, 64\)"):
        model.load_state_dict(state)
    del state["layers.3.weight"]
    with pytest.raises(CheckpointError, match="missing key 'layers.3.weight'"):
        model.load_state_dict(state)


def test_parameters_are_the_arrays_the_optimizer_updates():
    model = fastcnn.build_model(fastcnn.load_config("configs/synthetic_small.yaml").model, seed=0)
    named = dict(model.named_parameters())
    assert [id(p) for p in named.values()] == [id(p) for p in model.parameters()]
    x = np.random.default_rng(1).normal(size=(5, 12, 12, 1)).astype(np.float32)
    logits = model.forward(x)
    _, d = fastcnn.softmax_cross_entropy(logits, np.array([0, 1, 2, 3, 0]))
    model.backward(d)
    before = named["layers.0.weight"].data.copy()
    opt = fastcnn.SGD(model.parameters(), lr=0.1)
    opt.step()
    np.testing.assert_allclose(named["layers.0.weight"].data, before - 0.1 * named["layers.0.weight"].grad,
                               rtol=1e-6)


def test_forward_rejects_wrong_input_shape():
    model = fastcnn.build_model(fastcnn.load_config("configs/mnist.yaml").model, seed=0)
    with pytest.raises(ValueError, match=r"\(batch, 28, 28, 1\)"):
        model.forward(np.zeros((2, 28, 28, 3), np.float32))


def test_build_model_validates_a_plain_dict():
    from fastcnn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.layers\[0\].filters"):
        fastcnn.build_model({"layers": [{"type": "conv2d", "filters": -1, "kernel_size": 3}]})
