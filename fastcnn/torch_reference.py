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


def torch_layer(layer, torch):
    """The torch.nn module equivalent to one built fastcnn layer, weights copied (declared by the
    layer type: ``Layer.torch_module``)."""
    return layer.torch_module(torch)


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
