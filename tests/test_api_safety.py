"""API safety: backward checks its gradient, evaluation-mode backward matches torch's
model.eval(), NaN propagates through ReLU/max-pool as in torch, load_state_dict refuses
bad states."""
import numba
import numpy as np
import pytest

import fastcnn
from fastcnn.errors import CheckpointError
from fastcnn.kernels import activation, fused, pool
from fastcnn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, LeakyReLU, MaxPool2D, ReLU

SMALL = {"input_shape": [4, 4, 1], "num_classes": 3, "layers": [{"type": "flatten"}, {"type": "dense", "units": 3}]}


def _bn_cfg(dtype="float64", relu=True, pool=True, dropout=False):
    layers = [{"type": "conv2d", "filters": 4, "kernel_size": 3}, {"type": "batchnorm"}]
    layers += [{"type": "relu"}] if relu else []
    layers += [{"type": "maxpool2d", "pool_size": 2}] if pool else []
    layers += [{"type": "conv2d", "filters": 5, "kernel_size": 2}, {"type": "batchnorm"}, {"type": "relu"},
               {"type": "flatten"}, {"type": "dense", "units": 6}, {"type": "batchnorm"}, {"type": "relu"}]
    layers += [{"type": "dropout", "rate": 0.3}] if dropout else []
    layers += [{"type": "dense", "units": 3}]
    return {"input_shape": [10, 10, 2], "num_classes": 3, "dtype": dtype, "init": "pytorch", "layers": layers}


# ---------------------------------------------------------------- 1. backward checks
def test_backward_before_forward_is_a_runtime_error():
    m = fastcnn.build_model(SMALL, seed=0)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) first"):
        m.backward(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("shape", [(2, 500), (50, 3), (6,), (2, 3, 1), ()])
def test_backward_wrong_shape_is_a_value_error_naming_both(shape):
    m = fastcnn.build_model(SMALL, seed=0)
    m.forward(np.ones((2, 4, 4, 1), np.float32), training=True)
    with pytest.raises(ValueError) as e:
        m.backward(np.ones(shape, np.float32))
    assert "(2, 3)" in str(e.value) and str(tuple(shape)) in str(e.value)
    dx = m.backward(np.ones((2, 3), np.float64))  # a right shape still works, dtype cast
    assert dx.shape == (2, 4, 4, 1) and dx.dtype == np.float32


def test_failed_forward_forgets_the_last_one():
    m = fastcnn.build_model(SMALL, seed=0)
    m.forward(np.ones((2, 4, 4, 1), np.float32))
    with pytest.raises(ValueError):
        m.forward(np.ones((2, 5, 4, 1), np.float32))
    with pytest.raises(RuntimeError):
        m.backward(np.ones((2, 3), np.float32))


def _built(layer, shape, dtype=np.float32):
    layer.build(shape, np.random.default_rng(0), dtype)
    return layer


@pytest.mark.parametrize("make,shape", [
    (lambda: Conv2D(3, 3), (6, 6, 2)), (lambda: MaxPool2D(2), (6, 6, 2)), (lambda: ReLU(), (6, 6, 2)),
    (lambda: LeakyReLU(0.1), (5,)), (lambda: BatchNorm(), (6, 6, 2)), (lambda: Flatten(), (6, 6, 2)),
    (lambda: Dense(4), (7,)), (lambda: Dropout(0.5), (7,)),
])
def test_layer_backward_checks_shape(make, shape):
    layer = _built(make(), shape)
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(np.zeros((2, *layer.out_shape), np.float32))
    x = np.random.default_rng(1).standard_normal((3, *shape)).astype(np.float32)
    with pytest.raises(ValueError):
        layer.forward(np.zeros((3, *shape, 1), np.float32), True)
    layer.forward(x, True)
    for bad in ((2, *layer.out_shape), (30, *layer.out_shape), (3, *layer.out_shape[:-1], layer.out_shape[-1] + 5),
                (3 * int(np.prod(layer.out_shape)),)):
        with pytest.raises(ValueError, match="shape"):
            layer.backward(np.ones(bad, np.float32))
    dx = layer.backward(np.ones((3, *layer.out_shape), np.float32))
    assert dx.shape == x.shape


def test_block_backward_checks_shape():
    m = fastcnn.build_model(_bn_cfg("float32"), seed=0)
    blocks = [b for b in m.blocks if type(b).__name__ == "BatchNormReLU"]
    assert blocks
    with pytest.raises(RuntimeError):
        blocks[0].backward(np.zeros((2, 4, 4, 4), np.float32))
    m.forward(np.zeros((2, 10, 10, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        blocks[0].backward(np.zeros((2, 4, 4, 9), np.float32))


# ---------------------------------------------------------------- 2. evaluation-mode backward
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("relu,pool,dropout", [(True, True, True), (True, False, False), (False, True, False),
                                               (False, False, True)])
def test_eval_backward_matches_torch(fuse, relu, pool, dropout):
    torch = pytest.importorskip("torch")
    from fastcnn.torch_reference import to_torch_input, torch_model

    model = fastcnn.build_model(_bn_cfg("float64", relu, pool, dropout), seed=1, fuse=fuse)
    rng = np.random.default_rng(0)
    for _ in range(3):  # running statistics away from (0, 1), and stale training caches
        model.forward(rng.standard_normal((4, 10, 10, 2)) * 2 + 0.5, training=True)
    tm = torch_model(model, torch, channels_last=False).double().eval()
    x = rng.standard_normal((3, 10, 10, 2))
    y = np.array([0, 1, 2])
    logits = model.forward(x, training=False)
    _, dl = fastcnn.softmax_cross_entropy(logits, y)
    dx = model.backward(dl)
    xt = to_torch_input(x, torch, channels_last=False).clone().requires_grad_(True)
    lt = tm(xt)
    torch.nn.functional.cross_entropy(lt, torch.from_numpy(y)).backward()
    np.testing.assert_allclose(logits, lt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-9, atol=1e-12)
    for i, layer in enumerate(model.layers):
        mod = tm[i]
        for name, p in layer.params.items():
            tname = {"gamma": "weight", "beta": "bias"}.get(name, name)
            g = getattr(mod, tname).grad.numpy()
            if layer.kind == "conv2d" and name == "weight":
                g = g.transpose(2, 3, 1, 0)
            elif layer.kind == "dense" and name == "weight":
                g = g.T
            np.testing.assert_allclose(p.grad, g, rtol=1e-9, atol=1e-12, err_msg=f"layers.{i}.{name}")


def test_eval_backward_then_training_backward_still_right():
    m = fastcnn.build_model(_bn_cfg("float64"), seed=0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 10, 10, 2))
    dl = rng.standard_normal((4, 3))
    m.forward(x, training=True)
    dx1 = m.backward(dl)
    m.forward(x[:2], training=False)
    m.backward(dl[:2])
    m.step = 0
    m.forward(x, training=True)
    np.testing.assert_array_equal(m.backward(dl), dx1)


def test_batchnorm_layer_eval_backward_without_training_forward():
    bn = _built(BatchNorm(), (3, 3, 2), np.float64)
    bn.buffers["running_mean"][:] = [0.5, -1.0]
    bn.buffers["running_var"][:] = [4.0, 0.25]
    bn.params["gamma"].data[:] = [2.0, -3.0]
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 2))
    bn.forward(x, training=False)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    dx = bn.backward(dy)
    invstd = 1 / np.sqrt(bn.buffers["running_var"] + 1e-5)
    np.testing.assert_allclose(dx, dy * bn.params["gamma"].data * invstd)
    np.testing.assert_allclose(bn.params["beta"].grad, dy.sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(bn.params["gamma"].grad,
                               (dy * (x - bn.buffers["running_mean"]) * invstd).sum(axis=(0, 1, 2)))


# ---------------------------------------------------------------- 3. NaN propagation
@pytest.fixture(params=[1, 2])
def threads(request):
    old = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_leaky_relu_propagate_nan(dtype, threads):
    x = np.tile(np.array([np.nan, 1, -1, 2, -0.0, np.inf, -np.inf], dtype), 37)
    y = np.empty_like(x)
    activation.relu_forward(x, y)
    np.testing.assert_array_equal(y[:7], np.array([np.nan, 1, 0, 2, 0, np.inf, 0], dtype))
    assert np.isnan(y).sum() == 37
    activation.leaky_relu_forward(x, dtype(0.1), y)
    assert np.isnan(y).sum() == 37 and y[2] == dtype(-0.1)
    dx = np.empty_like(x)
    activation.relu_backward(x, np.ones_like(x), dx)  # torch: the gradient passes at NaN
    np.testing.assert_array_equal(dx[:7], np.array([1, 1, 0, 1, 0, 1, 0], dtype))


def _nan_input(dtype):
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 5)).astype(dtype)
    x[0, 0, 1, 2] = np.nan
    x[1, 3, 3, 0] = x[1, 2, 3, 0] = np.nan  # two NaNs in a window: the last wins (torch)
    x[2, 5, 5, 4] = np.nan
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool_size,stride", [(2, 2), (3, 2)])
def test_maxpool_and_fused_relu_maxpool_propagate_nan_like_torch(dtype, pool_size, stride, threads):
    torch = pytest.importorskip("torch")
    x = _nan_input(dtype)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for relu in (False, True):
        ref, idx = torch.nn.functional.max_pool2d(torch.relu(t) if relu else t, pool_size, stride,
                                                  return_indices=True)
        ref = ref.permute(0, 2, 3, 1).numpy()
        idx = idx.permute(0, 2, 3, 1).numpy()
        y = np.empty(ref.shape, dtype)
        am = np.empty(ref.shape, np.int32)
        if relu:
            fused.relu_maxpool2d_forward(x, y, am, pool_size, pool_size, stride, stride, 0, 0)
            sel = ~(y <= 0)  # winners routed: positive or NaN
        else:
            pool.maxpool2d_forward(x, y, am, pool_size, pool_size, stride, stride, 0, 0)
            sel = np.ones(y.shape, bool)
        np.testing.assert_array_equal(y, ref)
        assert np.isnan(y).sum() == np.isnan(ref).sum() > 0
        np.testing.assert_array_equal(am[sel], idx[sel])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leaky_relu_maxpool_propagates_nan(dtype, threads):
    x = _nan_input(dtype)
    y = np.empty((3, 4, 4, 5), dtype)
    am = np.empty(y.shape, np.int32)
    fused.leaky_relu_maxpool2d_forward(x, dtype(0.01), y, am, 2, 2, 2, 2, 0, 0)
    assert np.isnan(y[0, 0, 0, 2]) and np.isnan(y[1, 1, 1, 0]) and np.isnan(y[2, 2, 2, 4])
    assert np.isnan(y).sum() == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fuse", [True, False])
def test_network_propagates_nan(dtype, fuse, threads):
    m = fastcnn.build_model(_bn_cfg(np.dtype(dtype).name), seed=0, fuse=fuse)
    x = np.random.default_rng(0).standard_normal((2, 10, 10, 2)).astype(dtype)
    m.forward(x, training=True)
    x[1, 4, 4, 1] = np.nan
    out = m.forward(x, training=False)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_batchnorm_relu_propagates_nan(dtype, threads):
    c = 4
    x = np.random.default_rng(0).standard_normal((2, 4, 4, c)).astype(dtype)
    x[0, 1, 1, 2] = np.nan
    mean = np.zeros(c, dtype)
    scale = np.ones(c, dtype)
    beta = np.zeros(c, dtype)
    y = np.empty_like(x)
    fused.batchnorm_relu_forward(x.reshape(-1, c), mean, scale, beta, y.reshape(-1, c))
    assert np.isnan(y[0, 1, 1, 2]) and np.isnan(y).sum() == 1
    yp = np.empty((2, 2, 2, c), dtype)
    am = np.empty(yp.shape, np.int32)
    xs = np.empty(yp.shape, dtype)
    for store in (True, False):
        yp[...] = 0
        fused.batchnorm_relu_maxpool2d_forward(x, mean, scale, beta, yp, am, xs, store, 2, 2, 2, 2, 0, 0)
        assert np.isnan(yp[0, 0, 0, 2]) and np.isnan(yp).sum() == 1
        if store:
            assert am[0, 0, 0, 2] == 1 * 4 + 1


# ---------------------------------------------------------------- 4. load_state_dict
def test_load_state_dict_rejects_non_mappings_and_non_str_keys():
    m = fastcnn.build_model(SMALL, seed=0)
    with pytest.raises(TypeError, match="mapping of str -> ndarray"):
        m.load_state_dict(None)
    with pytest.raises(TypeError, match="mapping of str -> ndarray"):
        m.load_state_dict([("layers.1.weight", np.zeros((16, 3)))])
    sd = m.state_dict()
    sd[5] = np.zeros(3)
    with pytest.raises(TypeError, match="mapping of str -> ndarray"):
        m.load_state_dict(sd)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("key", ["layers.0.weight", "layers.1.gamma", "layers.1.running_var"])
def test_load_state_dict_rejects_non_finite(bad, key):
    cfg = {"input_shape": [4, 4, 1], "num_classes": 3,
           "layers": [{"type": "conv2d", "filters": 2, "kernel_size": 3}, {"type": "batchnorm"},
                      {"type": "flatten"}, {"type": "dense", "units": 3}]}
    m = fastcnn.build_model(cfg, seed=0)
    before = m.state_dict()
    sd = m.state_dict()
    sd[key] = sd[key].copy()
    sd[key].flat[0] = bad
    sd["layers.3.bias"] = sd["layers.3.bias"] + 1  # would be copied first if not all checked up front
    with pytest.raises(CheckpointError, match=f"{key} holds NaN or Inf"):
        m.load_state_dict(sd)
    after = m.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_load_state_dict_bad_value_names_the_key():
    m = fastcnn.build_model(SMALL, seed=0)
    sd = m.state_dict()
    sd["layers.1.bias"] = np.array(["a", "b", "c"])
    with pytest.raises(CheckpointError, match="layers.1.bias"):
        m.load_state_dict(sd)
    sd["layers.1.bias"] = [[1.0], [2.0, 3.0]]  # ragged
    with pytest.raises(CheckpointError, match="layers.1.bias"):
        m.load_state_dict(sd)
