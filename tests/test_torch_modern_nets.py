"""Networks that use every feature of DESIGN.md section 8 against their PyTorch twin, number for number.

The twin is built automatically from the config (``fastcnn.torch_reference.torch_model``: each layer
type's own ``torch_module``) in float64 with the same weights; fastcnn runs in float32 (tolerance
1e-4 relative) and in float64 (1e-9). Compared: logits, the label-smoothed loss, dL/dx, every
parameter gradient (by state-dict key), the batch-norm running statistics after the training
forward, and the evaluation-mode logits.

Relative error is ``max|fastcnn - torch| / max|torch|`` over the array.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: PyTorch comparison skipped")
import torch.nn.functional as F  # noqa: E402

import fastcnn  # noqa: E402
from fastcnn.torch_reference import to_torch_input, torch_model  # noqa: E402


def conv(filters, k=3, **kw):
    return {"type": "conv2d", "filters": filters, "kernel_size": k, **kw}


BN, RELU = {"type": "batchnorm"}, {"type": "relu"}

# Every new feature: strided `same` with odd sizes (and with dilation), depthwise with a channel
# multiplier, grouped (not depthwise) convolution, identity and projection shortcuts, `repeat`,
# a nested block, `activation: none`, batch norm after a dense layer; the loss with label smoothing.
# (No bias right before a batch norm: its gradient is zero up to rounding, so a relative error means
# nothing there.)
NETS = {
    "modern_mix": {
        "input_shape": [9, 11, 4],
        "num_classes": 5,
        "layers": [
            conv(8, stride=2, padding="same", bias=False), BN, RELU,                                  # 9x11 -> 5x6
            {"type": "residual", "repeat": 2, "body": [
                conv(8, groups=8, padding="same", dilation=2, bias=False), BN, RELU,  # depthwise, dilated
                conv(8, 1, groups=2, bias=False), BN]},
            {"type": "residual", "activation": "none",
             "body": [conv(16, stride=2, padding="same", groups=8, bias=False), BN, RELU,  # multiplier 2
                      {"type": "residual", "activation": "none",
                       "body": [conv(16, groups=4, padding="same"), {"type": "leaky_relu"}]}],
             "shortcut": [conv(16, 1, stride=2, bias=False), BN]},                       # -> 3x3x16
            RELU,  # (without it, the batch norm after the dense layer would cancel any shift of the block)
            {"type": "global_avgpool"},
            {"type": "dense", "units": 12, "bias": False}, BN, RELU,
            {"type": "dense", "units": 5},
        ],
    },
    "strided_same_odd": {
        "input_shape": [13, 7, 3],
        "num_classes": 4,
        "layers": [
            conv(6, [4, 3], stride=[3, 2], padding="same", dilation=[1, 2], bias=False), BN, RELU,    # 13x7 -> 5x4
            {"type": "residual", "body": [conv(6, [2, 3], stride=2, padding="same", groups=3, bias=False), BN],
             "shortcut": [conv(6, 1, stride=2)]},                                        # -> 3x2
            {"type": "maxpool2d", "pool_size": 2, "stride": 1, "padding": 1},             # -> 4x3
            {"type": "flatten"},
            {"type": "dense", "units": 4},
        ],
    },
}

TOL = {np.float32: 1e-4, np.float64: 1e-9}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    return diff / scale if scale else diff


def to_fastcnn_layout(key, grad):
    """A torch gradient in fastcnn's layout: OIHW -> HWIO, (out, in) -> (in, out)."""
    if grad.ndim == 4:
        return grad.permute(2, 3, 1, 0).numpy()
    if grad.ndim == 2:
        return grad.T.numpy()
    return grad.numpy()


def torch_key(key):
    """fastcnn state-dict key -> the twin's (``layers.`` dropped; batch norm's gamma/beta are weight/bias)."""
    path, name = key[len("layers."):].rsplit(".", 1)
    return f"{path}.{ {'gamma': 'weight', 'beta': 'bias'}.get(name, name) }"


def build_pair(spec, dtype, rng):
    """The fastcnn model in ``dtype`` and a float64 copy with the same weights and statistics."""
    model = fastcnn.build_model({**spec, "dtype": np.dtype(dtype).name}, seed=0)
    for key, p in model.named_parameters():  # batch norm's 1 and 0 would hide mistakes
        if key.endswith(("gamma", "beta")):
            p.data[...] = rng.uniform(0.5, 1.5, p.data.shape) * rng.choice([-1, 1], p.data.shape)
    for key, b in model.named_buffers():
        b[...] = rng.uniform(0.1, 0.5, b.shape) if key.endswith("running_var") else rng.uniform(-.2, .2, b.shape)
    reference = fastcnn.build_model({**spec, "dtype": "float64"}, seed=0)
    reference.load_state_dict({k: np.asarray(v, np.float64) for k, v in model.state_dict().items()})
    return model, reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(NETS))
def test_network_matches_the_torch_twin(name, dtype, rng):
    spec, tol, smoothing = NETS[name], TOL[dtype], 0.1
    model, reference = build_pair(spec, dtype, rng)
    net = torch_model(reference, torch, channels_last=False).train()
    batch = 7
    x = rng.standard_normal((batch, *spec["input_shape"]))
    labels = rng.integers(0, spec["num_classes"], size=batch)

    logits = model.forward(x.astype(dtype), training=True)
    loss, dlogits = fastcnn.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    dx = model.backward(dlogits)
    assert logits.dtype == dx.dtype == dtype

    xt = to_torch_input(x, torch, channels_last=False).clone().requires_grad_(True)
    logits_t = net(xt)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(labels), label_smoothing=smoothing)
    loss_t.backward()

    assert rel_err(logits, logits_t.detach().numpy()) <= tol, "logits"
    assert abs(float(loss) - loss_t.item()) <= tol * abs(loss_t.item()), "loss"
    assert rel_err(dx, xt.grad.permute(0, 2, 3, 1).numpy()) <= tol, "dL/dx"
    twin_params = dict(net.named_parameters())
    keys = [key for key, _ in model.named_parameters()]
    assert {torch_key(k) for k in keys} == set(twin_params)  # the twin holds exactly these parameters
    for key, p in model.named_parameters():
        assert p.grad.dtype == dtype
        assert rel_err(p.grad, to_fastcnn_layout(key, twin_params[torch_key(key)].grad)) <= tol, key
    twin_buffers = dict(net.named_buffers())
    for key, b in model.named_buffers():
        assert rel_err(b, twin_buffers[torch_key(key)].numpy()) <= tol, key

    net.eval()
    with torch.no_grad():
        eval_t = net(to_torch_input(x, torch, channels_last=False)).numpy()
    assert rel_err(model.forward(x.astype(dtype), training=False), eval_t) <= tol, "evaluation-mode logits"
