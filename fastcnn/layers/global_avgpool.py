"""global_avgpool: (H, W, C) -> (C,), the mean over height and width."""
import numpy as np

from .base import Layer, kernel_module, require_rank

pool = kernel_module("pool")


class GlobalAvgPool(Layer):
    """The output is flat: a dense layer can follow directly."""

    kind = "global_avgpool"

    def output_shape(self, in_shape, path="global_avgpool"):
        require_rank(in_shape, 3, path, "global_avgpool")
        return (in_shape[2],)

    def forward(self, x, training):
        x = np.ascontiguousarray(x)
        self._begin_forward(x, training)
        n, h, w, c = x.shape
        y = self._buffer("y", (n, c))
        pool.avgpool2d_forward(x, y.reshape(n, 1, 1, c), h, w, h, w)  # average pooling, one window
        return y

    def backward(self, dy, need_input_grad=True):
        dy, dx = self._begin_backward(dy, need_input_grad)
        if dx is None:
            return None
        n, h, w, c = self.x_shape
        pool.avgpool2d_backward(dy.reshape(n, 1, 1, c), dx, h, w, h, w)
        return dx

    def onnx_nodes(self, graph, x):
        return graph.node("Flatten", [graph.node("GlobalAveragePool", [x])], axis=1)  # (N, C, 1, 1) -> (N, C)

    def torch_module(self, torch):
        class GlobalAvgPool(torch.nn.Module):
            """Mean over H and W -> (N, C)."""

            def forward(self, x):
                return x.mean(dim=(2, 3))

        return GlobalAvgPool()
