"""flatten: (H, W, C) -> (H*W*C,) in NHWC order: feature index = (h*W + w)*C + c."""
import numpy as np

from .base import Layer


class Flatten(Layer):
    kind = "flatten"

    def output_shape(self, in_shape, path="flatten"):
        return (int(np.prod(in_shape)),)

    def forward(self, x, training):
        self._begin_forward(x, training)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        return dy.reshape(self.x_shape) if need_input_grad else None

    def onnx_nodes(self, graph, x):
        if len(self.in_shape) != 3:
            return x
        # Back to NHWC first: fastcnn's feature order (h*W + w)*C + c.
        return graph.node("Flatten", [graph.node("Transpose", [x], perm=[0, 2, 3, 1])], axis=1)

    def torch_module(self, torch):
        class NHWCFlatten(torch.nn.Module):
            """Flatten in fastcnn's NHWC order (torch tensors are NCHW)."""

            def forward(self, x):
                return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x

        return NHWCFlatten()
