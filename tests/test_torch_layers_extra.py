"""avgpool2d, global_avgpool (and dropout's torch stand-in) against PyTorch autograd."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: PyTorch comparison skipped")
import torch.nn.functional as F  # noqa: E402

import fastcnn  # noqa: E402
from fastcnn.layers import AvgPool2D, Dropout, GlobalAvgPool  # noqa: E402
from fastcnn.torch_reference import to_torch_input, torch_layer, torch_model  # noqa: E402


def nchw(x):
    return torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale else float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("pool, stride, shape", [
    (2, None, (2, 6, 7, 3)),
    (3, 2, (1, 7, 9, 2)),           # overlapping, odd sizes
    ((2, 3), (3, 1), (3, 8, 7, 4)),  # rectangular, stride != pool
])
def test_avgpool_layer_vs_torch(pool, stride, shape, dtype, tol, rng):
    layer = AvgPool2D(pool, stride=stride)
    layer.build(shape[1:], rng, dtype)
    x = rng.standard_normal(shape).astype(dtype)
    y = layer.forward(x, training=True)
    G = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(G)
    xt = nchw(x)
    yt = torch_layer(layer, torch)(xt)
    (yt * torch.from_numpy(G.transpose(0, 3, 1, 2).copy())).sum().backward()
    assert rel_err(y, yt.detach().numpy().transpose(0, 2, 3, 1)) <= tol
    assert rel_err(dx, xt.grad.numpy().transpose(0, 2, 3, 1)) <= tol


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_global_avgpool_layer_vs_torch(dtype, tol, rng):
    shape = (3, 5, 7, 4)
    layer = GlobalAvgPool()
    layer.build(shape[1:], rng, dtype)
    x = rng.standard_normal(shape).astype(dtype)
    y = layer.forward(x, training=True)
    G = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(G)
    xt = nchw(x)
    yt = torch_layer(layer, torch)(xt)
    assert tuple(yt.shape) == (3, 4)
    (yt * torch.from_numpy(G)).sum().backward()
    assert rel_err(y, yt.detach().numpy()) <= tol
    assert rel_err(dx, xt.grad.numpy().transpose(0, 2, 3, 1)) <= tol
    # the plain functional form as well
    np.testing.assert_allclose(y, F.adaptive_avg_pool2d(xt, 1).flatten(1).detach().numpy(), rtol=tol * 10)


def test_dropout_torch_stand_in():
    layer = Dropout(0.3)
    layer.build((5,), np.random.default_rng(0), np.float32)
    mod = torch_layer(layer, torch)
    assert isinstance(mod, torch.nn.Dropout) and mod.p == 0.3
    mod.eval()
    x = torch.randn(4, 5)
    assert torch.equal(mod(x), x)  # only evaluation mode matches: torch draws its own masks


NET = {
    "input_shape": [11, 10, 3],
    "num_classes": 5,
    "dtype": "float64",
    "layers": [
        {"type": "conv2d", "filters": 6, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "avgpool2d", "pool_size": 3, "stride": 2},   # overlapping, left-over pixels
        {"type": "conv2d", "filters": 7, "kernel_size": [2, 3]},
        {"type": "global_avgpool"},
        {"type": "dense", "units": 5},
    ],
}


@pytest.mark.parametrize("with_dropout", [False, True])
def test_small_network_vs_torch(with_dropout, rng):
    cfg = dict(NET)
    if with_dropout:  # rate 0 and evaluation-equivalent: checks dropout's plumbing, not torch's masks
        cfg["layers"] = NET["layers"][:5] + [{"type": "dropout", "rate": 0.0}] + NET["layers"][5:]
    model = fastcnn.build_model(cfg, seed=0)
    net = torch_model(model, torch, channels_last=False)
    net.train()
    x = rng.standard_normal((6, 11, 10, 3))
    labels = rng.integers(0, 5, size=6)

    logits = model.forward(x, training=True)
    loss, dlogits = fastcnn.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits)

    xt = to_torch_input(x, torch, channels_last=False).requires_grad_(True)
    logits_t = net(xt)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(labels))
    loss_t.backward()

    tol = 1e-10
    assert rel_err(logits, logits_t.detach().numpy()) <= tol
    assert abs(loss - loss_t.item()) <= tol * abs(loss_t.item())
    assert rel_err(dx, xt.grad.permute(0, 2, 3, 1).numpy()) <= tol
    keys = []
    for key, p in model.named_parameters():
        _, i, name = key.split(".")
        t = getattr(net[int(i)], name)
        if name == "weight":
            ref = t.grad.permute(2, 3, 1, 0).numpy() if t.grad.dim() == 4 else t.grad.T.numpy()
        else:
            ref = t.grad.numpy()
        assert rel_err(p.grad, ref) <= tol, key
        keys.append(key)
    last = len(cfg["layers"]) - 1
    assert keys == ["layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias",
                    f"layers.{last}.weight", f"layers.{last}.bias"]
