"""avgpool2d: the mean of each window, no padding (PyTorch's AvgPool2d)."""
import numpy as np

from ..shapes import pair
from .base import Layer, hw, kernel_module, pool_window_options, pooled_shape, window

pool = kernel_module("pool")


class AvgPool2D(Layer):
    """Each output is the mean of its pool_h x pool_w window; output size floor((H - pool) / stride) + 1."""

    kind = "avgpool2d"
    options = pool_window_options(padding=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.pool = pair(c["pool_size"])
        self.stride = pair(c["stride"]) if c["stride"] is not None else self.pool

    def output_shape(self, in_shape, path="avgpool2d"):
        return pooled_shape(self, in_shape, path)

    def _geometry(self):
        return (self.pool[0], self.pool[1], self.stride[0], self.stride[1])

    def forward(self, x, training):
        x = np.ascontiguousarray(x)
        self._begin_forward(x, training)
        y = self._buffer("y", (x.shape[0], *self.out_shape))
        pool.avgpool2d_forward(x, y, *self._geometry())
        return y

    def backward(self, dy, need_input_grad=True):
        dy, dx = self._begin_backward(dy, need_input_grad)
        if dx is None:
            return None
        pool.avgpool2d_backward(dy, dx, *self._geometry())
        return dx

    def onnx_nodes(self, graph, x):  # no padding: every window is whole
        return graph.node("AveragePool", [x], kernel_shape=list(self.pool), strides=list(self.stride))

    def describe(self):
        return f"{self.kind} {window(self.pool)} s{hw(self.stride)}"

    def torch_module(self, torch):
        return torch.nn.AvgPool2d(self.pool, stride=self.stride, padding=0, ceil_mode=False)
