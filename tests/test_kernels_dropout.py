"""Dropout: counter-based mask (pure function of seed, layer index, step), kernels, layer, model step."""
import numba
import numpy as np
import pytest

import fastcnn
from fastcnn.kernels import dropout as K
from fastcnn.kernels import reference as R
from fastcnn.layers import Dropout


def run_forward(x, seed, index, step, rate):
    x = np.ascontiguousarray(x)
    x3 = x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3]) if x.ndim == 4 else x.reshape(x.shape[0], 1, -1)
    y = np.full(x.shape, 123.0, x.dtype)
    mask = np.full(x.shape, 7, np.uint8)
    scale = x.dtype.type(1.0 / (1.0 - rate))
    K.dropout_forward(x3, K.dropout_key(seed, index, step), K.dropout_threshold(rate), scale, y.reshape(x3.shape),
                      mask.reshape(x3.shape))
    return y, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 1, 1), (4, 13), (3, 2, 9, 16)])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_kernel_matches_reference(dtype, shape, rate):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    y, mask = run_forward(x, 11, 4, 17, rate)
    keep = R.dropout_mask(shape, 11, 4, 17, rate)
    assert y.dtype == dtype and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, keep.astype(np.uint8))
    np.testing.assert_array_equal(y, R.dropout_forward(x, keep, rate))
    dy = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    dx = np.full(shape, 123.0, dtype)
    K.dropout_backward(*(a.reshape(y.shape[0], 1, -1) for a in (dy, mask)), dtype(1 / (1 - rate)),
                       dx.reshape(y.shape[0], 1, -1))
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, R.dropout_backward(dy, keep, rate))


def test_key_and_threshold_definition():
    # key = mix(mix(mix(seed) + index) + step); keep <=> (h >> 40) >= ceil(rate * 2**24)
    assert int(K.dropout_key(0, 0, 0)) == K.mix64(K.mix64(K.mix64(0)))
    assert K.mix64(0x9E3779B97F4A7C15) == 16294208416658607535  # splitmix64 seeded 0: first output
    assert int(K.dropout_threshold(0.0)) == 0 and int(K.dropout_threshold(0.5)) == 1 << 23
    with pytest.raises(ValueError):
        K.dropout_threshold(1.0)
    with pytest.raises(ValueError):
        Dropout(rate=-0.1)


def layer(rate=0.5, seed=3, index=2, shape=(6, 5, 4), dtype=np.float32):
    d = Dropout(rate, seed=seed, index=index)
    d.build(shape, np.random.default_rng(0), dtype)
    return d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_mode_and_rate_zero_are_identity(dtype, rng):
    x = rng.standard_normal((3, 6, 5, 4)).astype(dtype)
    d = layer(0.5, dtype=dtype)
    np.testing.assert_array_equal(d.forward(x, training=False), x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(d.backward(dy), dy)
    d0 = layer(0.0, dtype=dtype)
    y = d0.forward(x, training=True)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(d0.backward(dy), dy)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_mask_mean_and_exact_scale(rate, rng):
    shape = (8, 32, 32, 16)  # 131072 elements
    x = rng.standard_normal(shape).astype(np.float32)
    d = layer(rate, shape=shape[1:])
    y = d.forward(x, training=True)
    assert y.dtype == np.float32
    keep = d.mask.astype(bool)
    n = keep.size
    assert abs(keep.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    scale = np.float32(1.0 / (1.0 - rate))
    np.testing.assert_array_equal(y[keep], x[keep] * scale)
    assert not y[~keep].any()


def test_gradient_only_through_kept_elements(rng):
    x = rng.standard_normal((4, 20)).astype(np.float64)
    d = layer(0.3, shape=(20,), dtype=np.float64)
    y = d.forward(x, training=True).copy()  # the layer reuses its output buffer
    keep = d.mask.astype(bool)
    dy = rng.standard_normal(y.shape)
    dx = d.backward(dy)
    np.testing.assert_array_equal(dx[keep], dy[keep] * (1.0 / (1.0 - 0.3)))  # exactly the forward scale
    assert not dx[~keep].any()
    # Linear in x for a fixed mask: the Jacobian is diag(keep / (1 - rate)).
    np.testing.assert_allclose(d.forward(2 * x, training=True), 2 * y, rtol=0, atol=0)


def test_mask_is_a_function_of_seed_index_step(rng):
    x = rng.standard_normal((4, 6, 5, 4)).astype(np.float32)

    def mask(seed, index, step):
        d = layer(0.5, seed=seed, index=index)
        d.step = step
        d.forward(x, training=True)
        return d.mask.copy()

    a = mask(3, 2, 10)
    np.testing.assert_array_equal(a, mask(3, 2, 10))
    for other in (mask(3, 2, 11), mask(4, 2, 10), mask(3, 5, 10)):
        assert (a != other).mean() > 0.3


def test_bit_exact_across_thread_counts(rng):
    x = rng.standard_normal((16, 12, 12, 8)).astype(np.float32)
    before = numba.get_num_threads()
    out = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            d = layer(0.4, shape=x.shape[1:])
            y = d.forward(x, training=True).copy()
            dx = d.backward(np.ones_like(y)).copy()
            out.append((y, d.mask.copy(), dx))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


NET = {
    "input_shape": [6, 6, 2],
    "num_classes": 3,
    "layers": [
        {"type": "conv2d", "filters": 4, "kernel_size": 3},
        {"type": "relu"},
        {"type": "dropout", "rate": 0.3},
        {"type": "flatten"},
        {"type": "dense", "units": 8},
        {"type": "relu"},
        {"type": "dropout"},
        {"type": "dense", "units": 3},
    ],
}


def test_model_step_counter_and_resume(rng):
    x = rng.standard_normal((5, 6, 6, 2)).astype(np.float32)
    model = fastcnn.build_model(NET, seed=7)
    drops = [model.layers[2], model.layers[6]]
    assert [(d.seed, d.index, d.rate) for d in drops] == [(7, 2, 0.3), (7, 6, 0.5)]
    assert model.step == 0
    outs = [model.forward(x, training=True) for _ in range(3)]
    assert model.step == 3
    assert not np.array_equal(outs[0], outs[1])
    # Evaluation neither uses nor advances the step, and is deterministic.
    e1 = model.forward(x, training=False)
    np.testing.assert_array_equal(e1, model.forward(x, training=False))
    assert model.step == 3
    # A fresh model (a resumed run) set to step 2 reproduces the third forward bit for bit.
    resumed = fastcnn.build_model(NET, seed=7)
    resumed.step = 2
    np.testing.assert_array_equal(resumed.forward(x, training=True), outs[2])
    assert resumed.step == 3
    # The trainer setting model.step before each forward gives the same as letting it count.
    model.step = 1
    np.testing.assert_array_equal(model.forward(x, training=True), outs[1])
    # Another model seed, other masks.
    other = fastcnn.build_model(NET, seed=8)
    other.load_state_dict(model.state_dict())
    other.step = 0
    assert not np.array_equal(other.forward(x, training=True), outs[0])
    # Backward goes through the masks of the last forward.
    model.step = 0
    logits = model.forward(x, training=True)
    dx = model.backward(np.ones_like(logits))
    assert dx.shape == x.shape and dx.dtype == np.float32
