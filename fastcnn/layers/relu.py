"""relu: max(x, 0); gradient 0 at exactly 0; NaN propagates (as torch)."""
from .base import Layer, kernel_module

activation = kernel_module("activation")


class ReLU(Layer):
    kind = "relu"

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x = x
        y = self._buffer("y", x.shape)
        activation.relu_forward(x.reshape(-1), y.reshape(-1))
        return y

    def backward(self, dy, need_input_grad=True):
        dy, dx = self._begin_backward(dy, need_input_grad)
        if dx is None:
            return None
        activation.relu_backward(self.x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        return dx

    def onnx_nodes(self, graph, x):
        return graph.node("Relu", [x])

    def torch_module(self, torch):
        return torch.nn.ReLU()
