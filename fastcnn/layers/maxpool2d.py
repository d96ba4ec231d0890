"""maxpool2d: max over each window; padding counts as -inf (PyTorch's MaxPool2d)."""
import numpy as np

from ..errors import ConfigError
from ..shapes import pair
from .base import Layer, hw, kernel_module, pool_window_options, pooled_shape, require_rank, window

pool = kernel_module("pool")


class MaxPool2D(Layer):
    kind = "maxpool2d"
    options = pool_window_options(padding=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.pool = pair(c["pool_size"])
        self.stride = pair(c["stride"]) if c["stride"] is not None else self.pool
        self.pad = pair(c["padding"])

    def output_shape(self, in_shape, path="maxpool2d"):
        require_rank(in_shape, 3, path, self.kind)
        for axis in (0, 1):
            if self.pad[axis] > self.pool[axis] // 2:
                raise ConfigError(f"{path}.padding", f"must be at most half the pool size "
                                                     f"({self.pool[axis] // 2}), got {self.pad[axis]}")
        return pooled_shape(self, in_shape, path, self.pad)

    def window_args(self):
        """(pool_h, pool_w, stride_h, stride_w, pad_top, pad_left): the kernels' geometry arguments."""
        return (self.pool[0], self.pool[1], self.stride[0], self.stride[1], self.pad[0], self.pad[1])

    def forward(self, x, training):
        self._begin_forward(x, training)
        y = self._buffer("y", (x.shape[0], *self.out_shape))
        self.argmax = self._buffer("argmax", y.shape, np.int32)
        pool.maxpool2d_forward(x, y, self.argmax, *self.window_args())
        return y

    def backward(self, dy, need_input_grad=True):
        dy, dx = self._begin_backward(dy, need_input_grad)
        if dx is None:
            return None
        pool.maxpool2d_backward(dy, self.argmax, dx)
        return dx

    def onnx_nodes(self, graph, x):  # ONNX's MaxPool pads with -inf too
        ph, pw = self.pad
        return graph.node("MaxPool", [x], kernel_shape=list(self.pool), strides=list(self.stride),
                          pads=[ph, pw, ph, pw])

    def describe(self):
        text = f"{self.kind} {window(self.pool)} s{hw(self.stride)}"
        if tuple(self.pad) != (0, 0):
            text += f" p{hw(self.pad)}"
        return text

    def torch_module(self, torch):
        return torch.nn.MaxPool2d(self.pool, stride=self.stride, padding=self.pad)
