"""avgpool2d: the mean of each window, no padding (PyTorch's AvgPool2d)."""
import numpy as np

from ..errors import ConfigError
from ..schema import int_or_pair, optional
from ..shapes import pair, window_output_size
from .base import Layer, hw, kernel_module, require_rank, window

pool = kernel_module("pool")


class AvgPool2D(Layer):
    """Each output is the mean of its pool_h x pool_w window; output size floor((H - pool) / stride) + 1."""

    kind = "avgpool2d"
    options = {
        "pool_size": (int_or_pair(1), 2),
        "stride": (optional(int_or_pair(1)), None),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.pool = pair(c["pool_size"])
        self.stride = pair(c["stride"]) if c["stride"] is not None else self.pool

    def output_shape(self, in_shape, path="avgpool2d"):
        require_rank(in_shape, 3, path, "avgpool2d")
        h, w, c = in_shape
        oh = window_output_size(h, self.pool[0], self.stride[0], 0, 0)
        ow = window_output_size(w, self.pool[1], self.stride[1], 0, 0)
        if oh < 1 or ow < 1:
            raise ConfigError(path, f"avgpool2d with pool {list(self.pool)}, stride {list(self.stride)} turns "
                                    f"input {tuple(in_shape)} into an output of size {oh}x{ow} (below 1)")
        return (oh, ow, c)

    def _geometry(self):
        return (self.pool[0], self.pool[1], self.stride[0], self.stride[1])

    def forward(self, x, training):
        x = np.ascontiguousarray(x)
        self._begin_forward(x, training)
        self.x_shape = x.shape
        y = self._buffer("y", (x.shape[0], *self.out_shape))
        pool.avgpool2d_forward(x, y, *self._geometry())
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self.x_shape)
        pool.avgpool2d_backward(dy, dx, *self._geometry())
        return dx

    def onnx_nodes(self, graph, x):  # no padding: every window is whole
        return graph.node("AveragePool", [x], kernel_shape=list(self.pool), strides=list(self.stride))

    def describe(self):
        return f"{self.kind} {window(self.pool)} s{hw(self.stride)}"

    def torch_module(self, torch):
        return torch.nn.AvgPool2d(self.pool, stride=self.stride, padding=0, ceil_mode=False)
