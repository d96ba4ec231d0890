"""The fusion planner and fused models against the same models run layer by layer.

The blocks run the layers' kernels with other flags (fastcnn/kernels/fused.py),
so models without a batch norm + ReLU + max-pool block must agree bit for bit,
batch norm + ReLU blocks (no pool) and unfused BatchNorm layers included (the
same statistics kernel, the same correctly rounded invstd, the same chunked
reductions). After a max-pool the batch-norm gradients differ in rounding only:
the gamma/beta reductions add the winners' terms in pooled order. Those models
are compared with tight tolerances (float64 1e-12, float32 1e-5 relative). So is
the evaluation forward of a convolution + batch norm block, which folds the batch
norm into the convolution's weights; its training forward and backward are exact.
"""
import os

import numpy as np
import pytest

import fastcnn
from fastcnn import fusion
from fastcnn.layers import BatchNorm, Conv2D, Dense, LeakyReLU, MaxPool2D, ReLU

from conftest import REPO

# float64, every fused pattern plus near-misses, odd sizes.
BN_NET = {
    "input_shape": [16, 15, 3],
    "num_classes": 4,
    "dtype": "float64",
    "layers": [
        {"type": "conv2d", "filters": 6, "kernel_size": 3, "padding": "same"},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 3, "stride": 2, "padding": 1},   # bn+relu+pool, overlap, padding
        {"type": "conv2d", "filters": 5, "kernel_size": 3},
        {"type": "batchnorm"},
        {"type": "relu"},                                                  # bn+relu, no pool
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 3, "stride": 2, "padding": 1},  # relu+pool, overlap, padding
        {"type": "conv2d", "filters": 4, "kernel_size": 1},
        {"type": "leaky_relu", "negative_slope": 0.1},
        {"type": "maxpool2d", "pool_size": 2},                             # leaky+pool, a row/col left over
        {"type": "flatten"},
        {"type": "dense", "units": 8},
        {"type": "batchnorm"},
        {"type": "relu"},                                                  # bn+relu after dense
        {"type": "dense", "units": 4},
    ],
}

# No batch norm: must be bit-identical, float32 and float64.
POOL_NET = {
    "input_shape": [13, 12, 2],
    "num_classes": 3,
    "layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 3, "stride": 2, "padding": 1},  # overlap + padding
        {"type": "conv2d", "filters": 6, "kernel_size": 2},
        {"type": "leaky_relu", "negative_slope": 0.2},
        {"type": "maxpool2d", "pool_size": 2, "stride": 3, "padding": 1},  # gaps + padding
        {"type": "conv2d", "filters": 5, "kernel_size": 1},
        {"type": "leaky_relu"},
        {"type": "maxpool2d", "pool_size": 2, "stride": 1},                # overlapping: stays unfused
        {"type": "flatten"},
        {"type": "dense", "units": 7},
        {"type": "relu"},                                                  # relu -> dense: unfused
        {"type": "dense", "units": 3},
    ],
}


def config_model(name):
    return fastcnn.load_config(os.path.join(REPO, "configs", name)).model


def with_dtype(net, dtype):
    return {**net, "dtype": dtype}


def kinds(blocks):
    return [type(b).__name__ for b in blocks]


# ---------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------

def test_planner_fuses_the_seed_networks():
    model = fastcnn.build_model(config_model("mnist.yaml"), seed=0)
    assert kinds(model.blocks) == ["Conv2D", "ActivationMaxPool2D", "Conv2D", "ActivationMaxPool2D", "Flatten",
                                   "Dense", "ReLU", "Dense"]
    assert model.blocks[1].layers == (model.layers[1], model.layers[2])
    bn = fastcnn.build_model(config_model("mnist_bn.yaml"), seed=0)
    assert kinds(bn.blocks) == ["Conv2D", "BatchNormReLU", "Conv2D", "BatchNormReLU", "Flatten", "Dense", "ReLU",
                                "Dense"]
    assert bn.blocks[1].layers == tuple(bn.layers[1:4])
    # The unfused model runs the layers themselves.
    plain = fastcnn.build_model(config_model("mnist.yaml"), seed=0, fuse=False)
    assert all(b is layer for b, layer in zip(plain.blocks, plain.layers))


def test_planner_patterns_and_near_misses():
    model = fastcnn.build_model(BN_NET, seed=0)
    blocks = model.blocks
    # conv -> bn -> relu -> pool: the convolution alone, then batchnorm+relu+maxpool2d.
    assert kinds(blocks) == ["Conv2D", "BatchNormReLU", "ConvBatchNorm", "Conv2D", "ActivationMaxPool2D", "Conv2D",
                             "ActivationMaxPool2D", "Flatten", "Dense", "BatchNormReLU", "Dense"]
    assert blocks[1].pool is model.layers[3] and blocks[9].pool is None
    assert isinstance(blocks[2].norm, fusion.BatchNormReLU) and blocks[2].norm.pool is None and blocks[2].relu
    assert isinstance(blocks[6].act, LeakyReLU)
    # Every layer appears exactly once, in order.
    flat = [layer for b in blocks for layer in getattr(b, "layers", (b,))]
    assert flat == model.layers

    pool_model = fastcnn.build_model(POOL_NET, seed=0)
    assert kinds(pool_model.blocks) == ["Conv2D", "ActivationMaxPool2D", "Conv2D", "ActivationMaxPool2D", "Conv2D",
                                        "LeakyReLU", "MaxPool2D", "Flatten", "Dense", "ReLU", "Dense"]


def test_planner_on_bare_layer_lists():
    relu, pool, bn, dense, leaky = ReLU(), MaxPool2D(2), BatchNorm(), Dense(3), LeakyReLU()
    assert fusion.plan_blocks([]) == []
    assert fusion.plan_blocks([relu, dense]) == [relu, dense]            # relu -> dense: nothing to fuse
    assert fusion.plan_blocks([pool, relu]) == [pool, relu]              # wrong order
    assert fusion.plan_blocks([bn, leaky]) == [bn, leaky]                # batchnorm -> leaky ReLU: not fused
    assert fusion.plan_blocks([bn]) == [bn]
    blocks = fusion.plan_blocks([relu, pool, relu])
    assert kinds(blocks) == ["ActivationMaxPool2D", "ReLU"] and blocks[1] is relu
    blocks = fusion.plan_blocks([bn, relu, pool, relu, pool])
    assert kinds(blocks) == ["BatchNormReLU", "ActivationMaxPool2D"]
    assert kinds(fusion.plan_blocks([leaky, MaxPool2D(3, stride=2)])) == ["LeakyReLU", "MaxPool2D"]
    assert kinds(fusion.plan_blocks([leaky, MaxPool2D(2, stride=3)])) == ["ActivationMaxPool2D"]
    conv, grouped = Conv2D(4, 3), Conv2D(4, 3, groups=2)
    assert kinds(fusion.plan_blocks([conv, relu, dense])) == ["ConvReLU", "Dense"]
    assert kinds(fusion.plan_blocks([conv, relu, pool])) == ["Conv2D", "ActivationMaxPool2D"]  # relu + pool instead
    assert kinds(fusion.plan_blocks([conv, bn, relu, pool, relu])) == ["Conv2D", "BatchNormReLU", "ReLU"]
    assert kinds(fusion.plan_blocks([conv, bn, relu, dense])) == ["ConvBatchNorm", "Dense"]
    assert kinds(fusion.plan_blocks([conv, bn, pool])) == ["ConvBatchNorm", "MaxPool2D"]
    blocks = fusion.plan_blocks([conv, bn, leaky])
    assert kinds(blocks) == ["ConvBatchNorm", "LeakyReLU"] and blocks[0].norm is bn and not blocks[0].relu
    assert fusion.plan_blocks([grouped, bn]) == [grouped, bn]          # groups > 1: other kernels, no epilogue
    assert kinds(fusion.plan_blocks([grouped, relu])) == ["Conv2D", "ReLU"]
    assert kinds(fusion.plan_blocks([conv, leaky])) == ["Conv2D", "LeakyReLU"]


def test_blocks_hold_no_parameters_of_their_own():
    fused = fastcnn.build_model(config_model("mnist_bn.yaml"), seed=0)
    plain = fastcnn.build_model(config_model("mnist_bn.yaml"), seed=0, fuse=False)
    assert [k for k, _ in fused.named_parameters()] == [k for k, _ in plain.named_parameters()]
    assert fused.state_dict().keys() == plain.state_dict().keys()
    block = fused.blocks[1]
    assert block.bn is fused.layers[1]
    assert not hasattr(block, "params") and not hasattr(block, "buffers")


# ---------------------------------------------------------------------------
# Fused model == unfused model
# ---------------------------------------------------------------------------

def training_step(model, x, labels, input_grad=True):
    logits = model.forward(x, training=True)
    loss, dlogits = fastcnn.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits, input_grad=input_grad)
    grads = {k: p.grad.copy() for k, p in model.named_parameters()}
    return {"logits": logits, "loss": np.asarray(loss), "dx": dx, "grads": grads,
            "buffers": {k: b.copy() for k, b in model.named_buffers()},
            "eval": model.forward(x, training=False)}


def compare(a, b, exact, dtype, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype, what
    if exact:
        assert np.array_equal(a, b), what
    else:
        r = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
        np.testing.assert_allclose(a, b, rtol=r, atol=r * max(float(np.max(np.abs(b))), 1e-30), err_msg=what)


def compare_runs(model_cfg, exact, batches, seed=0, input_grad=True):
    """Training steps (and an evaluation forward after each) of the fused and the unfused model. With
    ``exact``, equal bit for bit, except the evaluation outputs of a model with a convolution + batch
    norm block, which folds the batch norm into the convolution's weights: those within rounding."""
    fused = fastcnn.build_model(model_cfg, seed=seed, fuse=True)
    plain = fastcnn.build_model(model_cfg, seed=seed, fuse=False)
    assert len(fused.blocks) < len(fused.layers)  # something is fused
    folded = any(isinstance(b, fusion.ConvBatchNorm) for b in fused.blocks)
    dtype = fused.dtype
    rng = np.random.default_rng(seed)
    opts = [fastcnn.Adam(m.parameters(), lr=1e-2) for m in (fused, plain)]
    for step, batch in enumerate(batches):
        x = rng.normal(size=(batch, *fused.input_shape)).astype(dtype)
        labels = rng.integers(0, fused.num_classes, size=batch)
        a = training_step(fused, x, labels, input_grad)
        b = training_step(plain, x, labels, input_grad)
        assert a["logits"].dtype == dtype
        for key in ("logits", "loss", "dx", "eval"):
            compare(a[key], b[key], exact and not (key == "eval" and folded), dtype, f"step {step}: {key}")
        # Gradients: with batch norm the conv bias before it has a true gradient of 0,
        # so rounding is judged against the scale of all gradients.
        scale = max(float(np.max(np.abs(g))) for g in b["grads"].values())
        for k in b["grads"]:
            if exact:
                assert np.array_equal(a["grads"][k], b["grads"][k]), f"step {step}: grad {k}"
            else:
                r = 1e-5 if dtype == np.float32 else 1e-12
                np.testing.assert_allclose(a["grads"][k], b["grads"][k], rtol=r, atol=r * scale,
                                           err_msg=f"step {step}: grad {k}")
        for k in b["buffers"]:
            compare(a["buffers"][k], b["buffers"][k], exact, dtype, f"step {step}: buffer {k}")
        for opt in opts:
            opt.step()
        if not exact:  # keep rounding from compounding through the optimizer
            plain.load_state_dict(fused.state_dict())


def test_seed_network_fused_equals_unfused_exactly():
    compare_runs(config_model("mnist.yaml"), exact=True, batches=[64, 64, 7])


def test_seed_network_without_input_gradient():
    compare_runs(config_model("mnist.yaml"), exact=True, batches=[16], input_grad=False)


def test_batchnorm_seed_network_fused_equals_unfused():
    # float32 tolerances: correctly rounded invstd, pooled-order reductions (module docstring).
    compare_runs(config_model("mnist_bn.yaml"), exact=False, batches=[64, 64, 5])


def test_batchnorm_seed_network_without_input_gradient():
    compare_runs(config_model("mnist_bn.yaml"), exact=False, batches=[8], input_grad=False)


def test_first_layer_block_without_input_gradient(rng):
    net = {"input_shape": [6, 6, 3], "num_classes": 2, "dtype": "float64",
           "layers": [{"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool2d", "pool_size": 2},
                      {"type": "relu"}, {"type": "maxpool2d", "pool_size": 3},
                      {"type": "flatten"}, {"type": "dense", "units": 2}]}
    compare_runs(net, exact=False, batches=[4, 3], input_grad=False)
    compare_runs(net, exact=False, batches=[4], input_grad=True)


def test_float64_network_with_every_pattern():
    compare_runs(BN_NET, exact=False, batches=[5, 5, 2])


# Batch norm without a max-pool after it: exact. conv -> bn -> relu and dense -> bn -> relu are fused
# (BatchNormReLU without pool), bn -> leaky_relu stays unfused; a batch of 300 gives
# 300 * 9 * 8 = 21600 rows: many reduction chunks.
BN_NO_POOL_NET = {
    "input_shape": [9, 8, 3],
    "num_classes": 4,
    "layers": [
        {"type": "conv2d", "filters": 6, "kernel_size": 3, "padding": "same"},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "conv2d", "filters": 5, "kernel_size": 3},
        {"type": "batchnorm"},
        {"type": "leaky_relu"},
        {"type": "flatten"},
        {"type": "dense", "units": 8},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "dense", "units": 4},
    ],
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batchnorm_network_without_pool_fused_equals_unfused_exactly(dtype):
    model = fastcnn.build_model(with_dtype(BN_NO_POOL_NET, dtype), seed=0)
    assert kinds(model.blocks) == ["ConvBatchNorm", "ConvBatchNorm", "LeakyReLU", "Flatten", "Dense",
                                   "BatchNormReLU", "Dense"]
    compare_runs(with_dtype(BN_NO_POOL_NET, dtype), exact=True, batches=[300, 5, 2])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pool_network_fused_equals_unfused_exactly(dtype):
    compare_runs(with_dtype(POOL_NET, dtype), exact=True, batches=[6, 6, 1])


def test_batchnorm_block_rejects_a_single_value_per_channel():
    net = {"input_shape": [1, 1, 4], "num_classes": 2,
           "layers": [{"type": "batchnorm"}, {"type": "relu"}, {"type": "flatten"}, {"type": "dense", "units": 2}]}
    model = fastcnn.build_model(net, seed=0)
    assert kinds(model.blocks)[0] == "BatchNormReLU"
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.forward(np.ones((1, 1, 1, 4), np.float32), training=True)
    assert model.forward(np.ones((1, 1, 1, 4), np.float32), training=False).shape == (1, 2)


def test_fused_block_outputs_keep_the_dtype_and_reuse_buffers():
    model = fastcnn.build_model(config_model("mnist_bn.yaml"), seed=0)
    x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    block = model.blocks[1]
    h = model.blocks[0].forward(x, True)
    y1 = block.forward(h, True)
    y2 = block.forward(h, True)
    assert y1 is y2 and y1.dtype == np.float32 and y1.shape == (4, 13, 13, 32)
    dx = block.backward(np.ones_like(y1), True)
    assert dx.dtype == np.float32 and dx.shape == h.shape
    assert block.backward(np.ones_like(y1), False) is None
    folded = fastcnn.build_model(with_dtype(EPILOGUE_NET, "float32"), seed=0).blocks[0]
    x1 = np.random.default_rng(1).normal(size=(3, 11, 9, 1)).astype(np.float32)
    e1 = folded.forward(x1, False)
    assert e1 is folded.forward(x1, False) and e1.dtype == np.float32 and e1.shape == (3, 11, 9, 5)


# The convolution's epilogue (ReLU) in models, on several of the forward's paths: one input channel
# and few filters (transposed products), every kernel column inside the image (in place: 16
# filters), padding (zero-padded rows), dilated columns (im2col); odd filter counts (written through
# a padded row). (Every path of the kernel, one product per kernel column included:
# tests/test_kernels_conv.py.) Bit-identical to the layers in training; the evaluation forward folds
# the batch norm (within rounding).
EPILOGUE_NET = {
    "input_shape": [11, 9, 1],
    "num_classes": 3,
    "layers": [
        {"type": "conv2d", "filters": 5, "kernel_size": 3, "padding": 1},                  # transposed
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "conv2d", "filters": 16, "kernel_size": 3},                               # in place
        {"type": "relu"},
        {"type": "conv2d", "filters": 128, "kernel_size": 3, "padding": 1, "bias": False},  # zero-padded rows
        {"type": "batchnorm"},
        {"type": "conv2d", "filters": 7, "kernel_size": 3, "padding": 1, "stride": 2},     # padded columns
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "conv2d", "filters": 6, "kernel_size": 2, "dilation": [1, 2], "padding": 1},  # im2col
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "dense", "units": 3},
    ],
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_convolution_epilogue_blocks_equal_the_layers(dtype):
    model = fastcnn.build_model(with_dtype(EPILOGUE_NET, dtype), seed=0)
    assert kinds(model.blocks) == ["ConvBatchNorm", "ConvReLU", "ConvBatchNorm", "ConvBatchNorm", "ConvReLU",
                                   "Flatten", "Dense"]
    compare_runs(with_dtype(EPILOGUE_NET, dtype), exact=True, batches=[9, 4, 1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_convolution_batchnorm_backward_after_evaluation_forward(dtype):
    """A backward after forward(training=False) runs through the layers' evaluation forward. The
    gradients equal the unfused model's to rounding (the folded forward's outputs, equal to rounding,
    are the later layers' inputs)."""
    cfg = with_dtype(EPILOGUE_NET, dtype)
    fused, plain = (fastcnn.build_model(cfg, seed=1, fuse=f) for f in (True, False))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 11, 9, 1)).astype(dtype)
    for model in (fused, plain):  # running statistics away from their initial values
        model.forward(x * 3 + 1, training=True)
    out = [m.forward(x, training=False) for m in (fused, plain)]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5 if dtype == "float32" else 1e-12,
                               atol=1e-5 * float(np.max(np.abs(out[1]))))
    dlogits = rng.normal(size=out[1].shape).astype(dtype)
    dx = [m.backward(dlogits, input_grad=True) for m in (fused, plain)]
    compare(dx[0], dx[1], False, dtype, "dx")
    for (k, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        compare(p.grad, q.grad, False, dtype, k)
