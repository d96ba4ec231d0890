"""dense: y = x @ weight + bias, weight (in_features, units)."""
import numpy as np

from ..schema import REQUIRED, boolean, integer
from .base import Layer, Parameter, init_weight_and_bias, kernel_module, require_rank, torch_dtype

dense = kernel_module("dense")


class Dense(Layer):
    kind = "dense"
    options = {
        "units": (integer(1), REQUIRED),
        "bias": (boolean, True),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.units = self.config["units"]
        self.use_bias = self.config["bias"]

    def output_shape(self, in_shape, path="dense"):
        require_rank(in_shape, 1, path, "dense")
        return (self.units,)

    def parameter_shapes(self, in_shape):
        shapes = {"weight": (in_shape[0], self.units)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def build(self, in_shape, rng, dtype):
        super().build(in_shape, rng, dtype)
        fan_in = in_shape[0]
        weight, bias = init_weight_and_bias(rng, (fan_in, self.units), self.units if self.use_bias else 0, fan_in,
                                            self.dtype, self.init)
        self.params["weight"] = Parameter(weight)
        if self.use_bias:
            self.params["bias"] = Parameter(bias)
        else:
            self._zero_bias = np.zeros(self.units, self.dtype)

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x = x
        y = self._buffer("y", (x.shape[0], self.units))
        dense.dense_forward(x, self.params["weight"].data, self.params["bias"].data if self.use_bias
                            else self._zero_bias, y)
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        w = self.params["weight"]
        db = self.params["bias"].grad if self.use_bias else self._buffer("db", (self.units,))
        x = self.x
        shard = self.batch_shard(x.shape[0])
        if shard.distributed:  # each chunk's sums, gathered and added in chunk order
            shard.sum_chunks(self._buffer, lambda s, dw, db: dense.dense_backward_weight(x[s], dy[s], dw, db),
                             w.grad, db)
        else:  # the same sums, added inside the kernel (dw written once)
            dense.dense_backward_weight(x, dy, w.grad, db, shard.local_bounds)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self.x.shape)
        dense.dense_backward_input(dy, w.data, dx)
        return dx

    def onnx_nodes(self, graph, x):  # Gemm: x @ weight (in_features, units) + bias
        inputs = [x, graph.constant("weight", self.params["weight"].data)]
        if self.use_bias:
            inputs.append(graph.constant("bias", self.params["bias"].data))
        return graph.node("Gemm", inputs)

    def flops(self, batch):
        return 2 * batch * self.in_shape[0] * self.units

    def describe(self):
        return f"dense {self.units}" + ("" if self.use_bias else " nobias")

    def torch_module(self, torch):
        mod = torch.nn.Linear(self.in_shape[0], self.units, bias=self.use_bias, dtype=torch_dtype(self, torch))
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(self.params["weight"].data.T.copy()))
            if self.use_bias:
                mod.bias.copy_(torch.from_numpy(self.params["bias"].data))
        return mod
