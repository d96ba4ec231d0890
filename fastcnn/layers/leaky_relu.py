"""leaky_relu: x where x > 0, else negative_slope * x."""
from ..schema import number
from .base import Layer, kernel_module

activation = kernel_module("activation")


class LeakyReLU(Layer):
    kind = "leaky_relu"
    options = {"negative_slope": (number(0.0), 0.01)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.negative_slope = self.config["negative_slope"]

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x = x
        y = self._buffer("y", x.shape)
        activation.leaky_relu_forward(x.reshape(-1), self.dtype.type(self.negative_slope), y.reshape(-1))
        return y

    def backward(self, dy, need_input_grad=True):
        dy, dx = self._begin_backward(dy, need_input_grad)
        if dx is None:
            return None
        activation.leaky_relu_backward(self.x.reshape(-1), dy.reshape(-1), self.dtype.type(self.negative_slope),
                                       dx.reshape(-1))
        return dx

    def onnx_nodes(self, graph, x):
        return graph.node("LeakyRelu", [x], alpha=float(self.negative_slope))

    def describe(self):
        return f"leaky_relu {self.negative_slope:g}"

    def torch_module(self, torch):
        return torch.nn.LeakyReLU(self.negative_slope)
