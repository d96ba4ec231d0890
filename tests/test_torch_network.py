"""Whole networks against PyTorch, number for number.

The same weights are copied into an equivalent ``torch.nn`` network (NCHW),
then logits, loss, every parameter gradient, dL/dx, batch-norm running
statistics, evaluation-mode outputs and a whole Adam step are compared, in
float64 (relative error <= 1e-6) and float32 (<= 1e-4).

Relative error here is ``max|fastcnn - torch| / max|torch|`` over the whole
array: a scale-aware measure that does not blow up on entries that are close
to zero.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: PyTorch network comparison skipped")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastcnn  # noqa: E402
from fastcnn.layers import BatchNorm, Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, ReLU  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # torch's padding='same' with an even kernel pads a copy of the input; that is what we ask of it.
    "ignore:Using padding='same' with even kernel lengths:UserWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"float64": 1e-6, "float32": 1e-4}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}

# Largest relative error seen per comparison, (comparison, dtype) -> error; printed with `pytest -s`.
OBSERVED = {}


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if b.size else 0.0
    if scale == 0.0:
        return float(diff)
    return float(diff / scale)


def check(what, kind, a, b, dtype):
    err = rel_err(a, b)
    key = (kind, dtype)
    OBSERVED[key] = max(OBSERVED.get(key, 0.0), err)
    assert err <= TOL[dtype], f"{what} ({dtype}): relative error {err:.3g} > {TOL[dtype]:g}"


class NHWCFlatten(nn.Module):
    """fastcnn flattens NHWC (feature index (h*W + w)*C + c); torch.nn.Flatten on NCHW would give
    c*H*W + h*W + w. We permute the torch activation to NHWC before flattening, so the first dense
    layer's weight can be copied unchanged (just transposed to torch's (out, in))."""

    def forward(self, x):
        if x.ndim == 4:
            x = x.permute(0, 2, 3, 1)
        return x.flatten(1)


def torch_twin(model):
    """An nn.ModuleList, one module per fastcnn layer (same indices), holding the same weights."""
    tdtype = TORCH_DTYPE[model.dtype.name]
    modules = []
    for layer in model.layers:
        if isinstance(layer, Conv2D):
            cin = layer.in_shape[2]
            # Torch's own 'same' (extra pixel at the bottom/right): an independent check of fastcnn's choice.
            padding = "same" if layer.padding == "same" else (0 if layer.padding == "valid" else layer.padding)
            if isinstance(padding, list):
                padding = tuple(padding)
            m = nn.Conv2d(cin, layer.filters, layer.kernel, stride=layer.stride, padding=padding,
                          dilation=layer.dilation, bias=layer.use_bias, dtype=tdtype)
            with torch.no_grad():
                # HWIO (KH, KW, Cin, Cout) -> OIHW
                m.weight.copy_(torch.from_numpy(layer.params["weight"].data.transpose(3, 2, 0, 1).copy()))
                if layer.use_bias:
                    m.bias.copy_(torch.from_numpy(layer.params["bias"].data))
        elif isinstance(layer, MaxPool2D):
            m = nn.MaxPool2d(layer.pool, stride=layer.stride, padding=layer.pad)
        elif isinstance(layer, ReLU):
            m = nn.ReLU()
        elif isinstance(layer, LeakyReLU):
            m = nn.LeakyReLU(layer.negative_slope)
        elif isinstance(layer, BatchNorm):
            c = layer.in_shape[-1]
            cls = nn.BatchNorm2d if len(layer.in_shape) == 3 else nn.BatchNorm1d
            m = cls(c, eps=1e-5, momentum=0.1, dtype=tdtype)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.params["gamma"].data))
                m.bias.copy_(torch.from_numpy(layer.params["beta"].data))
                m.running_mean.copy_(torch.from_numpy(layer.buffers["running_mean"]))
                m.running_var.copy_(torch.from_numpy(layer.buffers["running_var"]))
        elif isinstance(layer, Flatten):
            m = NHWCFlatten()
        elif isinstance(layer, Dense):
            m = nn.Linear(layer.in_shape[0], layer.units, bias=layer.use_bias, dtype=tdtype)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.params["weight"].data.T.copy()))  # (in, out) -> (out, in)
                if layer.use_bias:
                    m.bias.copy_(torch.from_numpy(layer.params["bias"].data))
        else:  # pragma: no cover - a new layer type needs a twin here
            raise NotImplementedError(type(layer).__name__)
        modules.append(m)
    # Modules are created in the model's dtype, so the copies are exact (checked in compare_training_step).
    return nn.ModuleList(modules)


def torch_forward(net, x_nchw):
    for m in net:
        x_nchw = m(x_nchw)
    return x_nchw


def torch_param(net, key):
    """The torch tensor matching a fastcnn state-dict key, in fastcnn's layout (a function to map back)."""
    _, i, name = key.split(".")
    m = net[int(i)]
    if name == "weight":
        t = m.weight
        if isinstance(m, nn.Conv2d):
            return t, lambda a: a.permute(2, 3, 1, 0)  # OIHW -> HWIO
        return t, lambda a: a.T  # (out, in) -> (in, out)
    t = {"bias": m.bias if name == "bias" else None, "gamma": m.weight, "beta": m.bias}[name]
    return t, lambda a: a


def to_nchw(x, dtype):
    return torch.tensor(x.transpose(0, 3, 1, 2).copy(), dtype=TORCH_DTYPE[dtype], requires_grad=True)


def null_gradient_keys(model):
    """Biases of layers directly followed by batch norm: the batch mean removes them, so their true gradient
    is exactly zero and both frameworks return rounding noise. A relative error between two noises means
    nothing; these are checked against the layer's weight-gradient scale instead."""
    keys = set()
    for i, layer in enumerate(model.layers[:-1]):
        if "bias" in layer.params and isinstance(model.layers[i + 1], BatchNorm):
            keys.add(f"layers.{i}.bias")
    return keys


def build(model_cfg, dtype):
    cfg = dict(model_cfg)
    cfg["dtype"] = dtype
    model = fastcnn.build_model(cfg, seed=0)
    assert model.dtype == np.dtype(dtype)
    for p in model.parameters():
        assert p.data.dtype == np.dtype(dtype)
    return model


def compare_training_step(model, net, dtype, rng, batch=8, adam=True):
    """Forward (training), loss, backward, grads, dL/dx, BN running stats, and optionally one Adam step."""
    h, w, c = model.input_shape
    k = model.num_classes
    x = rng.normal(size=(batch, h, w, c)).astype(dtype)
    labels = rng.integers(0, k, size=batch).astype(np.int64)

    # Weights were copied exactly.
    for key, p in model.named_parameters():
        t, back = torch_param(net, key)
        np.testing.assert_array_equal(back(t.detach()).numpy(), p.data, err_msg=key)

    logits = model.forward(x, training=True)
    assert logits.dtype == np.dtype(dtype)
    loss, dlogits = fastcnn.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits)

    net.train()
    xt = to_nchw(x, dtype)
    logits_t = torch_forward(net, xt)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(labels))
    loss_t.backward()

    check("logits", "logits", logits, logits_t.detach().numpy(), dtype)
    check("loss", "loss", loss, loss_t.item(), dtype)
    check("dL/dx", "dL/dx", dx, xt.grad.permute(0, 2, 3, 1).numpy(), dtype)
    null = null_gradient_keys(model)
    for key, p in model.named_parameters():
        t, back = torch_param(net, key)
        assert p.grad.dtype == np.dtype(dtype)
        if key in null:
            weight_scale = np.max(np.abs(dict(model.named_parameters())[
                key.replace(".bias", ".weight")].grad))
            err = float(np.max(np.abs(p.grad))) / weight_scale
            OBSERVED[("null bias grads", dtype)] = max(OBSERVED.get(("null bias grads", dtype), 0.0), err)
            assert err <= TOL[dtype], f"grad {key} should be ~0, got {p.grad} (weight grads up to {weight_scale})"
            continue
        check(f"grad {key}", "param grads", p.grad, back(t.grad).numpy(), dtype)

    state = model.state_dict()
    for i, m in enumerate(net):
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            check(f"layers.{i}.running_mean", "running_mean", state[f"layers.{i}.running_mean"],
                  m.running_mean.numpy(), dtype)
            check(f"layers.{i}.running_var", "running_var", state[f"layers.{i}.running_var"],
                  m.running_var.numpy(), dtype)

    if adam:
        opt = fastcnn.Adam(model.parameters(), lr=1e-3)
        opt_t = torch.optim.Adam(net.parameters(), lr=1e-3)
        if dtype == "float32":
            # Adam's first step is lr * g / (|g| + eps): about lr * sign(g). Where the true gradient is ~0
            # (a weight row fed only by ReLU zeros), float32 rounding decides the sign, so each framework's
            # own gradients can move such a weight by up to 2*lr in opposite directions. The gradients
            # were compared above; here both optimizers step from the same (torch's) gradients.
            for key, p in model.named_parameters():
                t, back = torch_param(net, key)
                p.grad[...] = back(t.grad.detach()).numpy()
        opt.step()
        opt_t.step()
        for key, p in model.named_parameters():
            t, back = torch_param(net, key)
            assert p.data.dtype == np.dtype(dtype)
            if key in null:
                # Adam normalizes the gradient: a noise gradient moves these biases by a noise-determined
                # amount (up to lr) in each framework, so there is nothing to compare. Training-mode outputs
                # do not depend on them (batch norm follows), evaluation-mode outputs do: give torch
                # fastcnn's values so that the evaluation comparison below compares like with like.
                with torch.no_grad():
                    t.copy_(torch.from_numpy(p.data))
                continue
            check(f"after Adam {key}", "Adam step weights", p.data, back(t.detach()).numpy(), dtype)


def compare_eval(model, net, dtype, rng, batch=8):
    h, w, c = model.input_shape
    x = rng.normal(size=(batch, h, w, c)).astype(dtype)
    before = model.state_dict()
    out = model.forward(x, training=False)
    net.eval()
    with torch.no_grad():
        out_t = torch_forward(net, to_nchw(x, dtype).detach())
    check("eval logits", "eval logits", out, out_t.numpy(), dtype)
    # Evaluation leaves the running statistics alone.
    after = model.state_dict()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", ["mnist.yaml", "mnist_bn.yaml"])
def test_seed_networks_match_torch(config, dtype):
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    cfg = fastcnn.load_config(os.path.join(REPO, "configs", config))
    model = build(cfg.model, dtype)
    net = torch_twin(model)
    compare_training_step(model, net, dtype, rng)
    compare_eval(model, net, dtype, rng)


UNSEEN_NET = {
    "input_shape": [13, 11, 3],
    "num_classes": 5,
    "layers": [
        # even kernel, 'same': total padding 3 per axis, the odd pixel at the bottom/right
        {"type": "conv2d", "filters": 6, "kernel_size": 4, "padding": "same"},
        {"type": "batchnorm"},
        {"type": "leaky_relu", "negative_slope": 0.1},
        # overlapping windows with -inf padding
        {"type": "maxpool2d", "pool_size": 3, "stride": 2, "padding": 1},
        # rectangular kernel, stride 2, dilation 2, explicit padding, no bias
        {"type": "conv2d", "filters": 5, "kernel_size": [3, 2], "stride": 2, "padding": [2, 1], "dilation": 2,
         "bias": False},
        {"type": "relu"},
        # 'same' with dilation and an odd total padding in one axis only (2*(2-1) = 2 -> 1/1; 2*(3-1) = 4)
        {"type": "conv2d", "filters": 4, "kernel_size": [2, 3], "dilation": [3, 2], "padding": "same"},
        {"type": "leaky_relu"},
        {"type": "flatten"},
        {"type": "dense", "units": 7, "bias": False},
        {"type": "batchnorm"},
        {"type": "leaky_relu", "negative_slope": 0.2},
        {"type": "dense", "units": 5},
    ],
}


def test_unseen_network_matches_torch():
    torch.manual_seed(0)
    rng = np.random.default_rng(11)
    model = build(UNSEEN_NET, "float64")
    # The geometry really exercises what it claims to.
    conv0, conv4, conv6 = model.layers[0], model.layers[4], model.layers[6]
    assert conv0.pads == (1, 2, 1, 2)
    assert conv6.pads == (1, 2, 2, 2)
    assert model.layers[3].out_shape == (7, 6, 6)
    assert conv4.out_shape == (4, 3, 5) and "bias" not in conv4.params
    assert "bias" not in model.layers[9].params
    net = torch_twin(model)
    compare_training_step(model, net, "float64", rng, batch=8, adam=True)
    compare_eval(model, net, "float64", rng)


def test_report_observed_errors():
    """Not a check: prints the largest relative error per comparison (run with -s)."""
    for (kind, dtype), err in sorted(OBSERVED.items()):
        print(f"{kind:20s} {dtype}: {err:.3g}")
