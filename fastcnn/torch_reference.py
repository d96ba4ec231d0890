"""The same network in PyTorch, for benchmarks and reference comparisons.

PyTorch is never a runtime dependency: this module imports it lazily and is
used only by ``fastcnn bench --compare torch``, ``scripts/`` and the tests.
Tensors are NCHW in PyTorch (optionally stored channels_last); weights copied
from fastcnn are transposed HWIO -> OIHW, and the first dense layer after a
flatten sees NHWC order because the flatten permutes to NHWC first.
"""
import numpy as np


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _nhwc_flatten(torch):
    class NHWCFlatten(torch.nn.Module):
        """Flatten in fastcnn's NHWC order: feature = (h*W + w)*C + c."""

        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x

    return NHWCFlatten()


def _global_avgpool(torch):
    class GlobalAvgPool(torch.nn.Module):
        """fastcnn's global_avgpool: mean over H and W -> (N, C); no NHWC flatten issue."""

        def forward(self, x):
            return x.mean(dim=(2, 3))

    return GlobalAvgPool()


def torch_layer(layer, torch):
    """The torch.nn module equivalent to one built fastcnn layer (weights copied)."""
    from . import layers as L

    nn = torch.nn
    dtype = torch.float64 if layer.dtype == np.float64 else torch.float32
    if isinstance(layer, L.Conv2D):
        cin = layer.in_shape[2]
        top, bottom, left, right = layer.pads
        mod = nn.Conv2d(cin, layer.filters, layer.kernel, stride=layer.stride, dilation=layer.dilation,
                        bias=layer.use_bias, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(layer.params["weight"].data.transpose(3, 2, 0, 1).copy()))
            if layer.use_bias:
                mod.bias.copy_(torch.from_numpy(layer.params["bias"].data))
        if top == bottom and left == right:
            mod.padding = (top, left)
            return mod
        return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), mod)
    if isinstance(layer, L.MaxPool2D):
        return nn.MaxPool2d(layer.pool, stride=layer.stride, padding=layer.pad)
    if isinstance(layer, L.AvgPool2D):
        return nn.AvgPool2d(layer.pool, stride=layer.stride, padding=0, ceil_mode=False)
    if isinstance(layer, L.GlobalAvgPool):
        return _global_avgpool(torch)
    if isinstance(layer, L.Dropout):
        # For timing only: torch draws its own masks, so training-mode outputs differ from fastcnn's
        # (evaluation mode, and rate 0, are the identity in both).
        return nn.Dropout(layer.rate)
    if isinstance(layer, L.ReLU):
        return nn.ReLU()
    if isinstance(layer, L.LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    if isinstance(layer, L.BatchNorm):
        cls = nn.BatchNorm2d if len(layer.in_shape) == 3 else nn.BatchNorm1d
        mod = cls(layer.in_shape[-1], eps=layer.eps, momentum=layer.momentum, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(layer.params["gamma"].data))
            mod.bias.copy_(torch.from_numpy(layer.params["beta"].data))
            mod.running_mean.copy_(torch.from_numpy(layer.buffers["running_mean"]))
            mod.running_var.copy_(torch.from_numpy(layer.buffers["running_var"]))
        return mod
    if isinstance(layer, L.Flatten):
        return _nhwc_flatten(torch)
    if isinstance(layer, L.Dense):
        mod = nn.Linear(layer.in_shape[0], layer.units, bias=layer.use_bias, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(layer.params["weight"].data.T.copy()))
            if layer.use_bias:
                mod.bias.copy_(torch.from_numpy(layer.params["bias"].data))
        return mod
    raise NotImplementedError(f"no torch equivalent for {layer!r}")


def torch_model(model, torch, channels_last=True):
    """A torch.nn.Sequential with the fastcnn model's layers and weights."""
    net = torch.nn.Sequential(*[torch_layer(layer, torch) for layer in model.layers])
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def to_torch_input(x, torch, channels_last=True):
    """NHWC ndarray -> NCHW tensor (channels_last storage keeps the NHWC bytes)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return t if channels_last else t.contiguous()
