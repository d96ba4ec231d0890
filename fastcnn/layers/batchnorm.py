"""batchnorm: per channel (after a conv: over N, H, W) or per feature (after a dense: over N)."""
import numpy as np

from ..errors import ConfigError
from ..schema import number
from .base import Layer, Parameter, kernel_module, torch_dtype

norm = kernel_module("norm")


class BatchNorm(Layer):
    """Training: the batch mean and biased variance; running statistics updated with the
    unbiased variance (PyTorch's rule); evaluation: the running statistics.

    y = (x - mean) * scale + beta with scale = gamma * invstd, invstd = 1 / sqrt(var + eps)
    correctly rounded (invstd_and_scale), as the fused blocks compute it."""

    kind = "batchnorm"
    options = {
        "momentum": (number(0.0, 1.0), 0.1),
        "eps": (number(0.0, min_exclusive=True), 1e-5),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.momentum = self.config["momentum"]
        self.eps = self.config["eps"]

    def output_shape(self, in_shape, path="batchnorm"):
        if len(in_shape) not in (1, 3):
            raise ConfigError(path, f"batchnorm expects (height, width, channels) or (features,), got {in_shape}")
        return in_shape

    def parameter_shapes(self, in_shape):
        c = (in_shape[-1],)
        return {"gamma": c, "beta": c, "running_mean": c, "running_var": c}

    def build(self, in_shape, rng, dtype):
        super().build(in_shape, rng, dtype)
        c = in_shape[-1]
        self.params["gamma"] = Parameter(np.ones(c, self.dtype))
        self.params["beta"] = Parameter(np.zeros(c, self.dtype))
        self.buffers["running_mean"] = np.zeros(c, self.dtype)
        self.buffers["running_var"] = np.ones(c, self.dtype)

    def forward(self, x, training):
        check_batch_values(self, x, training)  # before any state changes
        self._begin_forward(x, training)
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        y = self._buffer("y", x.shape)
        self.x = x  # a reference, for the backward (training or evaluation)
        mean, scale = self.normalization(x2, training, self.batch_shard(x.shape[0]))
        norm.batchnorm_forward(x2, mean, scale, self.params["beta"].data, y.reshape(-1, c))
        return y

    def normalization(self, x2, training, shard):
        """(mean, scale = gamma * invstd) of the normalize pass over x2 (M, C), in buffers of the layer.

        Training: the batch statistics over the whole batch ``shard`` describes (fastcnn/shard.py: per
        sample chunk, added in chunk order over every process; self.mean, self.var, self.invstd kept
        for the backward, with the shard as self.stat_shard), and the running statistics updated;
        evaluation: the running statistics. The fused batch norm + ReLU (+ max-pool) block
        (fastcnn/fusion.py) calls this too: one home for the statistics."""
        gamma = self.params["gamma"].data
        c = gamma.shape[0]
        eps = self.dtype.type(self.eps)
        if not training:  # x2 unused (may be None); buffers of its own: a training forward's statistics stay for
            #               its backward
            scale = self._buffer("eval_scale", (c,))
            invstd_and_scale(gamma, self.buffers["running_var"], eps, self._buffer("eval_invstd", (c,)), scale)
            return self.buffers["running_mean"], scale
        self.mean, self.var, self.invstd, self.scale = (self._buffer(k, (c,))
                                                        for k in ("mean", "var", "invstd", "scale"))
        rows = x2.shape[0] // shard.local
        count = shard.total * rows  # values per channel in the whole batch
        bounds = shard.row_bounds(rows)
        part = self._buffer("stat_chunks", (len(bounds) - 1, c))
        inv_count = self.dtype.type(1) / self.dtype.type(count)
        norm.chunk_sums(x2, bounds, part)
        np.multiply(shard.fold(part, self.mean), inv_count, out=self.mean)
        norm.chunk_squared_deviations(x2, self.mean, bounds, part)
        np.multiply(shard.fold(part, self.var), inv_count, out=self.var)
        invstd_and_scale(gamma, self.var, eps, self.invstd, self.scale)
        self.update_running_stats(self.mean, self.var, count)
        self.stat_shard, self.stat_count = shard, count  # for the backward (this layer's or a fused block's)
        return self.mean, self.scale

    def backward_coefficients(self, part_b, part_g):
        """From the backward sums per sample chunk of this process (part_b[g] = sum of g, part_g[g] =
        sum of g * (x - mean); g the gradient reaching the batch norm's output): beta.grad = sum g and
        gamma.grad = invstd * sum g * (x - mean) over the whole batch (the chunks added in order over
        every process), and the coefficients (k1, k2, k3) of dx = k1 * g - k2 - k3 * (x - mean)."""
        gamma, beta = self.params["gamma"], self.params["beta"]
        self.stat_shard.fold(part_b, beta.grad)
        np.multiply(self.stat_shard.fold(part_g, gamma.grad), self.invstd, out=gamma.grad)
        return norm.dx_coefficients(gamma.data, self.invstd, gamma.grad, beta.grad, self.stat_count)

    def backward_parts(self, rows):
        """Buffers (part_b, part_g) for the backward sums of the held chunks and their row bounds in
        a view with ``rows`` rows per sample."""
        shard = self.stat_shard
        c = self.in_shape[-1]
        return (self._buffer("sum_chunks_b", (len(shard.local_bounds) - 1, c)),
                self._buffer("sum_chunks_g", (len(shard.local_bounds) - 1, c)), shard.row_bounds(rows))

    def update_running_stats(self, mean, var, count):
        """running = (1 - momentum) * running + momentum * batch statistic; the variance unbiased
        (times count / (count - 1)), as PyTorch."""
        mom = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - mom
        rm += mom * mean
        rv *= 1 - mom
        rv += (mom * count / (count - 1)) * var

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not self.training:
            return batchnorm_eval_backward(self, self.x, dy, self._buffer("dx", dy.shape) if need_input_grad else None)
        c = dy.shape[-1]
        x2, dy2 = self.x.reshape(-1, c), dy.reshape(-1, c)
        part_b, part_g, bounds = self.backward_parts(x2.shape[0] // self.stat_shard.local)
        norm.batchnorm_backward_reduce(x2, dy2, self.mean, bounds, part_b, part_g)
        k1, k2, k3 = self.backward_coefficients(part_b, part_g)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", dy.shape)
        norm.batchnorm_backward_dx(x2, dy2, self.mean, k1, k2, k3, dx.reshape(-1, c))
        return dx

    def onnx_nodes(self, graph, x):
        """Evaluation mode: the running statistics; (N, C, H, W) after a conv, (N, C) after a dense layer."""
        inputs = [graph.constant(name, self.params[name].data) for name in ("gamma", "beta")]
        inputs += [graph.constant(name, self.buffers[name]) for name in ("running_mean", "running_var")]
        return graph.node("BatchNormalization", [x, *inputs], epsilon=float(self.eps))

    def torch_module(self, torch):
        nn = torch.nn
        cls = nn.BatchNorm2d if len(self.in_shape) == 3 else nn.BatchNorm1d
        mod = cls(self.in_shape[-1], eps=self.eps, momentum=self.momentum, dtype=torch_dtype(self, torch))
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(self.params["gamma"].data))
            mod.bias.copy_(torch.from_numpy(self.params["beta"].data))
            mod.running_mean.copy_(torch.from_numpy(self.buffers["running_mean"]))
            mod.running_var.copy_(torch.from_numpy(self.buffers["running_var"]))
        return mod


def check_batch_values(bn, x, training):
    """ValueError when a training batch gives a channel fewer than 2 values (over every process)."""
    if not training or x.ndim < 1 or not x.shape[-1]:
        return
    n = x.shape[0]
    if (bn.batch_shard(n).total * (x.size // x.shape[-1] // n) if n else 0) < 2:
        raise ValueError(f"batchnorm in training needs more than 1 value per channel, got input shape {x.shape}")


def invstd_and_scale(gamma, var, eps, invstd, scale):
    """invstd = 1 / sqrt(var + eps), scale = gamma * invstd, in place, correctly rounded.

    In NumPy on purpose, not in a fastmath kernel: there LLVM may turn a float32
    1/sqrt into an estimate plus a Newton step, different in the last bit from one
    compiled kernel to another. The one home of invstd: the layer's training and
    evaluation forward, its evaluation backward and the fused blocks.
    """
    np.add(var, eps, out=invstd)
    np.sqrt(invstd, out=invstd)
    np.divide(invstd.dtype.type(1), invstd, out=invstd)
    np.multiply(gamma, invstd, out=scale)


def batchnorm_eval_backward(bn, x, dy, dx):
    """Backward of the evaluation-mode batch norm y = (x - running_mean) * gamma / sqrt(running_var + eps)
    + beta (as PyTorch's in model.eval()): a per-channel affine map, the statistics constants.

    Writes gamma.grad = sum dy * (x - running_mean) * invstd, beta.grad = sum dy and, when ``dx`` is
    given, dx = dy * gamma * invstd; returns dx. Plain NumPy: evaluation backward is rare.
    """
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    dy2 = dy.reshape(-1, c)
    dt = bn.dtype
    gamma = bn.params["gamma"]
    invstd, scale = np.empty(c, dt), np.empty(c, dt)
    invstd_and_scale(gamma.data, bn.buffers["running_var"], dt.type(bn.eps), invstd, scale)
    bn.params["beta"].grad[...] = dy2.sum(axis=0, dtype=dt)
    gamma.grad[...] = (dy2 * (x2 - bn.buffers["running_mean"])).sum(axis=0, dtype=dt) * invstd
    if dx is None:
        return None
    np.multiply(dy, scale, out=dx)
    return dx
