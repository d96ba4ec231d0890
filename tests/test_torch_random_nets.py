"""Random networks against their PyTorch twin: geometry nobody chose by hand.

Each seed draws a network (convolutions with random kernel sizes, strides, paddings, dilations,
groups and filter counts, from 1 to 70 channels, on random rectangular inputs; batch norm, ReLU and
leaky ReLU, max and average pooling, residual blocks with identity or projection shortcuts and nested
ones, global pooling or flatten, dense layers) and a random batch of 2 to 19 images. The twin is built
from a float64 copy of the weights (``fastcnn.torch_reference.torch_model``). Compared in float64 and
float32: logits, dL/dx, every parameter gradient, evaluation-mode logits.

Two things make a plain relative error meaningless, and are allowed for:
- a gradient that is zero in exact arithmetic (a bias right before a batch norm, the scale of a
  one-weight filter before a batch norm, ...): both frameworks return rounding noise. Each gradient's
  error is measured against the larger of its own scale and 1e-3 of the largest gradient in the net.
- an ill-conditioned draw (a pre-activation near zero flips a ReLU's mask under float32 rounding):
  PyTorch's own float32 gradients then differ from its float64 ones too. A float32 error passes when it
  is within 3x PyTorch's own float32 error.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: PyTorch comparison skipped")
import torch.nn.functional as F  # noqa: E402
from test_torch_modern_nets import build_pair, to_fastcnn_layout, torch_key  # noqa: E402

import fastcnn  # noqa: E402
from fastcnn.errors import ConfigError  # noqa: E402
from fastcnn.torch_reference import to_torch_input, torch_model  # noqa: E402

TOL = {np.float64: 1e-8, np.float32: 2e-4}
SEEDS = range(16)
WIDE_FILTERS = [1, 2, 3, 5, 8, 10, 13, 16, 24, 32, 37, 48, 64, 70]


def _conv(r, cin, wide):
    filters = int(r.choice(WIDE_FILTERS)) if wide else int(r.integers(1, 12))
    k = int(r.choice([1, 2, 3, 3, 3, 5, 7])) if r.random() < 0.8 else [int(r.integers(1, 6)), int(r.integers(1, 6))]
    layer = {"type": "conv2d", "filters": filters, "kernel_size": k}
    if r.random() < 0.4:
        layer["stride"] = int(r.choice([2, 3])) if r.random() < 0.8 else [int(r.integers(1, 4)), int(r.integers(1, 4))]
    u = r.random()
    if u < 0.35:
        layer["padding"] = "same"
    elif u < 0.65:
        layer["padding"] = int(r.integers(0, 4))
    elif u < 0.75:
        layer["padding"] = [int(r.integers(0, 3)), int(r.integers(0, 3))]
    if r.random() < 0.15:
        pair = [int(r.integers(1, 4)), int(r.integers(1, 4))]
        layer["dilation"] = int(r.choice([2, 3])) if r.random() < 0.7 else pair
    divisors = [g for g in range(2, cin + 1) if cin % g == 0]
    if divisors and r.random() < 0.25:
        layer["groups"] = int(r.choice(divisors))
        layer["filters"] = layer["groups"] * int(r.integers(1, 4))
    if r.random() < 0.3:
        layer["bias"] = False
    return layer


def _layers(r, depth, cin, wide, nested=0):
    """``depth`` random units from ``cin`` channels: (layers, channels out)."""
    layers = []
    for _ in range(depth):
        u = r.random()
        if u < 0.45:
            conv = _conv(r, cin, wide)
            layers.append(conv)
            cin = conv["filters"]
            if r.random() < 0.4:
                layers.append({"type": "batchnorm"})
                conv["bias"] = False  # its gradient would be zero up to rounding
            if r.random() < 0.7:
                layers.append({"type": "relu"} if r.random() < 0.8 else {"type": "leaky_relu", "negative_slope": 0.1})
        elif u < 0.55:
            pool = {"type": "maxpool2d", "pool_size": int(r.choice([2, 3]))}
            if r.random() < 0.3:
                pool.update(stride=1, padding=1)
            layers.append(pool)
        elif u < 0.6:
            layers.append({"type": "avgpool2d", "pool_size": 2})
        elif u < 0.8 and nested < 2:
            first = {**_conv(r, cin, wide), "padding": "same"}
            body = [first]
            if r.random() < 0.5:
                body.append({"type": "batchnorm"})
                first["bias"] = False
            if r.random() < 0.5:
                inner, _ = _layers(r, 1, first["filters"], wide, nested + 1)
                body += [{"type": "relu"}, *inner, {"type": "conv2d", "filters": first["filters"],
                                                   "kernel_size": int(r.choice([1, 3])), "padding": "same"}]
            block = {"type": "residual", "body": body}
            stride = first.get("stride", 1)
            if first["filters"] != cin or stride != 1:
                block["shortcut"] = [{"type": "conv2d", "filters": first["filters"], "kernel_size": 1,
                                      "stride": stride, "padding": "same"}]
            if r.random() < 0.3:
                block["activation"] = "none"
            if "shortcut" not in block and r.random() < 0.3:
                block["repeat"] = 2
            layers.append(block)
            cin = first["filters"]
        else:
            layers.append({"type": "relu"})
    return layers, cin


def random_net(seed):
    """A random model config (``model:`` section), valid or not (the caller builds it to find out)."""
    r = np.random.default_rng(seed)
    wide = r.random() < 0.5
    h, w = int(r.integers(4, 34)), int(r.integers(4, 34))
    c = int(r.choice([1, 3, 4, 8, 16, 24])) if wide else int(r.integers(1, 6))
    layers, _ = _layers(r, int(r.integers(1, 5)), c, wide)
    layers.append({"type": "global_avgpool"} if r.random() < 0.5 else {"type": "flatten"})
    if r.random() < 0.3:
        layers += [{"type": "dense", "units": int(r.integers(2, 20))}, {"type": "relu"}]
    classes = int(r.integers(2, 11))
    return {"input_shape": [h, w, c], "num_classes": classes, "layers": layers + [{"type": "dense", "units": classes}]}


def valid_net(seed):
    """The first buildable random net from ``seed`` on (a draw can collapse an image to nothing)."""
    for s in range(seed * 1000, seed * 1000 + 1000):
        spec = random_net(s)
        try:
            fastcnn.build_model(spec, seed=0)
        except ConfigError:
            continue
        return s, spec
    raise AssertionError(f"no valid network drawn from seed {seed}")  # pragma: no cover


def _twin_gradients(reference, x, labels, dtype):
    """The twin's dL/dx (NHWC) and parameter gradients (fastcnn layout, by twin key), in float64 NumPy."""
    net = torch_model(reference, torch, channels_last=False).train().to(dtype)
    xt = to_torch_input(x, torch, channels_last=False).to(dtype).clone().requires_grad_(True)
    logits = net(xt)
    F.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {k: to_fastcnn_layout(k, p.grad.detach().double()) for k, p in net.named_parameters()}
    grads["dx"] = xt.grad.detach().double().permute(0, 2, 3, 1).numpy()
    return net, logits.detach().double().numpy(), grads


def _relative(a, b):
    """max|a - b| / max|b| (the plain difference where b is all zeros)."""
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
    scale = float(np.max(np.abs(b)))
    return diff / scale if scale else diff


def _errors(ours, exact, keys):
    """Per key, max|ours - exact| over max(|exact|, 1e-3 of the largest parameter gradient)."""
    floor = 1e-3 * max(float(np.max(np.abs(exact[torch_key(k)]))) for k in keys if k != "dx")
    out = {}
    for key in ["dx", *keys]:
        ref = exact["dx" if key == "dx" else torch_key(key)]
        scale = float(np.max(np.abs(ref)))
        if key == "dx" and scale < 1e-12:
            out[key] = 0.0  # nothing reaches x (batch norm over one image, then global pooling)
            continue
        out[key] = float(np.max(np.abs(np.asarray(ours[key], np.float64) - ref))) / max(scale, floor if key != "dx"
                                                                                        else scale)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_network_matches_the_torch_twin(seed, dtype):
    drawn, spec = valid_net(seed)
    r = np.random.default_rng(drawn)
    model, reference = build_pair(spec, dtype, r)
    batch = int(r.integers(2, 20))  # (batch norm over one image, then global pooling: nothing upstream counts)
    x = r.standard_normal((batch, *spec["input_shape"]))
    labels = r.integers(0, spec["num_classes"], size=batch)

    logits = model.forward(x.astype(dtype), training=True)
    _, dlogits = fastcnn.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits)
    assert logits.dtype == dx.dtype == dtype
    net, logits_t, exact = _twin_gradients(reference, x, labels, torch.float64)
    keys = [k for k, _ in model.named_parameters()]
    assert {torch_key(k) for k in keys} == set(exact) - {"dx"}  # the twin holds exactly these parameters
    ours = {"dx": dx, **{k: p.grad for k, p in model.named_parameters()}}
    errors = _errors(ours, exact, keys)
    if dtype == np.float32:
        # The draw's conditioning: PyTorch's own float32 gradients against its float64 ones.
        _, _, torch32 = _twin_gradients(reference, x, labels, torch.float32)
        own = _errors({"dx": torch32["dx"], **{k: torch32[torch_key(k)] for k in keys}}, exact, keys)
        errors = {k: e / max(1.0, 3 * own[k] / TOL[dtype]) for k, e in errors.items()}
    errors["logits"] = _relative(logits, logits_t)
    net.eval()
    with torch.no_grad():
        evaluated = net(to_torch_input(x, torch, channels_last=False)).numpy()
    out = model.forward(x.astype(dtype), training=False)
    errors["evaluation logits"] = _relative(out, evaluated)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL[dtype], f"net {drawn} {spec}: {worst} relative error {errors[worst]:.3g}"


def test_the_draws_cover_the_geometry():
    """The seeds above really draw what the module docstring says (else the test proves less)."""
    convs, blocks = [], 0

    def walk(layers):
        nonlocal blocks
        for layer in layers:
            if layer["type"] == "conv2d":
                convs.append(layer)
            elif layer["type"] == "residual":
                blocks += 1
                walk(layer["body"])
                walk(layer.get("shortcut", []))

    for seed in SEEDS:
        walk(valid_net(seed)[1]["layers"])
    assert blocks >= 3
    assert any(c.get("groups", 1) > 1 for c in convs)
    assert any(c.get("dilation", 1) != 1 for c in convs)
    assert any(c.get("stride", 1) != 1 for c in convs)
    assert any(c.get("padding") == "same" for c in convs) and any(isinstance(c.get("padding"), int) for c in convs)
    assert any(c["filters"] >= 32 for c in convs) and any(c["filters"] < 8 for c in convs)
    assert any(isinstance(c["kernel_size"], list) or c["kernel_size"] >= 5 for c in convs)
