"""Layer classes: parameters, cached activations, forward/backward via kernels.

A layer is built for a per-sample input shape (H, W, C) or (F,), owns its
parameters (``Parameter``: ``.data`` and ``.grad``) and buffers (running
statistics), and keeps what its backward pass needs from the last forward.

Outputs are written into buffers the layer allocates once per batch shape and
reuses: an array returned by ``forward``/``backward`` stays valid until the
layer's next call of the same method. Sequential copies what it hands back to
the user.

``backward`` differentiates the LAST ``forward``, in the mode it ran in: after
``forward(x, training=False)`` batch norm backpropagates through its evaluation
affine transform (running statistics), dropout is the identity, max-pool routes
through that forward's argmax. Both methods check shapes before any kernel runs
(a wrong shape raises ValueError, backward before forward RuntimeError): the
kernels index without bounds checks.
"""
import numpy as np

from .errors import ConfigError
from .kernels import activation, conv, dense, norm, pool
from .kernels import dropout as dropout_kernels
from .shapes import pair, same_padding, window_output_size


class Parameter:
    """A trainable array and its gradient (same shape and dtype)."""

    def __init__(self, data):
        self.data = data
        self.grad = np.zeros_like(data)

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def checked_gradient(owner, dy, expected, dtype):
    """dy as a contiguous array of ``dtype``, after checking it has the shape of the owner's last
    forward output ``expected`` (RuntimeError when there was no forward). Kernels index without
    bounds checks: this is what stands between a wrong shape and memory corruption."""
    if expected is None:
        raise RuntimeError(f"{type(owner).__name__}.backward() needs a forward() first")
    dy = np.asarray(dy)
    if dy.shape != expected:
        raise ValueError(f"{type(owner).__name__}.backward: the gradient must have the shape of the "
                         f"last forward's output {expected}, got {dy.shape}")
    return np.ascontiguousarray(dy, dtype=dtype)


class Layer:
    """Base class. Subclasses set ``params`` and ``buffers`` (name -> array) in build()."""

    kind = "layer"

    def __init__(self):
        self.params = {}
        self.buffers = {}
        self._scratch = {}
        self.dtype = np.dtype(np.float32)

    def output_shape(self, in_shape, path="layer"):
        """Per-sample output shape; ConfigError (naming ``path``) if impossible."""
        return in_shape

    init = "he_uniform"  # weight initialization scheme (see init_weight_and_bias); set by build_model

    def build(self, in_shape, rng, dtype):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(self.output_shape(in_shape))
        self.dtype = np.dtype(dtype)

    def _buffer(self, name, shape, dtype=None):
        """A scratch array reused across calls while the shape stays the same."""
        dtype = np.dtype(dtype or self.dtype)
        buf = self._scratch.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = np.empty(shape, dtype=dtype)
            self._scratch[name] = buf
        return buf

    def forward(self, x, training):
        raise NotImplementedError

    def backward(self, dy, need_input_grad=True):
        raise NotImplementedError

    # -- shape checks: the kernels do no bounds checking -------------------
    _dy_shape = None  # the shape backward expects: that of the last forward's output

    def _begin_forward(self, x, training):
        """Check x against the built input shape; remember the output shape and the mode."""
        self._dy_shape = None
        in_shape = getattr(self, "in_shape", None)
        if in_shape is not None and (x.ndim != 1 + len(in_shape) or tuple(x.shape[1:]) != in_shape):
            raise ValueError(f"{type(self).__name__}.forward: input must have shape (batch, "
                             f"{', '.join(map(str, in_shape))}), got {x.shape}")
        self.training = bool(training)
        self._dy_shape = (x.shape[0], *self.out_shape) if in_shape is not None else None

    def _check_dy(self, dy):
        return checked_gradient(self, dy, self._dy_shape, self.dtype)

    def flops(self, batch):
        """Forward multiply-add FLOPs (2 per MAC) for a batch; 0 for cheap layers."""
        return 0

    def __repr__(self):
        return f"{type(self).__name__}()"


def _require_rank(in_shape, rank, path, what):
    if len(in_shape) != rank:
        shape = tuple(in_shape)
        hint = " (add a flatten layer before it)" if rank == 1 else ""
        raise ConfigError(path, f"{what} expects a {'(height, width, channels)' if rank == 3 else 'flat'} "
                                f"input{hint}; got shape {shape}")


INIT_SCHEMES = ("he_uniform", "pytorch")


def init_weight_and_bias(rng, weight_shape, bias_size, fan_in, dtype, scheme="he_uniform"):
    """Initial (weight, bias) of a conv or dense layer; bias is None when bias_size is 0.

    he_uniform: weights U(-b, b) with b = sqrt(6 / fan_in) (Kaiming uniform,
      ReLU gain), zero biases. The default.
    pytorch: what torch.nn.Conv2d / Linear do by default (kaiming_uniform_ with
      a = sqrt(5)): weights and biases U(-b, b) with b = 1 / sqrt(fan_in).
    """
    if scheme == "he_uniform":
        bound = np.sqrt(6.0 / fan_in)
        weight = rng.uniform(-bound, bound, size=weight_shape).astype(dtype)
        bias = np.zeros(bias_size, dtype) if bias_size else None
    elif scheme == "pytorch":
        bound = 1.0 / np.sqrt(fan_in)
        weight = rng.uniform(-bound, bound, size=weight_shape).astype(dtype)
        bias = rng.uniform(-bound, bound, size=bias_size).astype(dtype) if bias_size else None
    else:
        raise ValueError(f"unknown init scheme {scheme!r}; known: {', '.join(INIT_SCHEMES)}")
    return weight, bias


class Conv2D(Layer):
    kind = "conv2d"

    def __init__(self, filters, kernel_size, stride=1, padding=0, dilation=1, bias=True):
        super().__init__()
        self.filters = int(filters)
        self.kernel = pair(kernel_size)
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        self.padding = padding
        self.use_bias = bool(bias)

    def _pads(self, path):
        """(top, bottom, left, right)."""
        if self.padding == "same":
            if self.stride != (1, 1):
                raise ConfigError(f"{path}.padding", f"'same' needs stride 1, got stride {list(self.stride)}")
            top, bottom = same_padding(self.kernel[0], self.dilation[0])
            left, right = same_padding(self.kernel[1], self.dilation[1])
            return top, bottom, left, right
        if self.padding == "valid":
            return 0, 0, 0, 0
        ph, pw = pair(self.padding)
        return ph, ph, pw, pw

    def output_shape(self, in_shape, path="conv2d"):
        _require_rank(in_shape, 3, path, "conv2d")
        h, w, _ = in_shape
        top, bottom, left, right = self._pads(path)
        oh = window_output_size(h, self.kernel[0], self.stride[0], top, bottom, self.dilation[0])
        ow = window_output_size(w, self.kernel[1], self.stride[1], left, right, self.dilation[1])
        if oh < 1 or ow < 1:
            raise ConfigError(path, f"conv2d with kernel {list(self.kernel)}, stride {list(self.stride)}, "
                                    f"padding {self.padding!r}, dilation {list(self.dilation)} turns input "
                                    f"{tuple(in_shape)} into an output of size {oh}x{ow} (below 1)")
        return (oh, ow, self.filters)

    def build(self, in_shape, rng, dtype):
        super().build(in_shape, rng, dtype)
        self.pads = self._pads("conv2d")
        kh, kw = self.kernel
        cin = in_shape[2]
        weight, bias = init_weight_and_bias(rng, (kh, kw, cin, self.filters), self.filters if self.use_bias else 0,
                                            kh * kw * cin, self.dtype, self.init)
        self.params["weight"] = Parameter(weight)
        if self.use_bias:
            self.params["bias"] = Parameter(bias)
        else:
            self._zero_bias = np.zeros(self.filters, self.dtype)

    def _bias(self):
        return self.params["bias"].data if self.use_bias else self._zero_bias

    def _geometry(self):
        return (self.stride[0], self.stride[1], self.pads[0], self.pads[2], self.dilation[0], self.dilation[1])

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x = x
        y = self._buffer("y", (x.shape[0], *self.out_shape))
        conv.conv2d_forward(x, self.params["weight"].data, self._bias(), y, *self._geometry())
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        w = self.params["weight"]
        db = self.params["bias"].grad if self.use_bias else self._buffer("db", (self.filters,))
        conv.conv2d_backward_weight(self.x, dy, w.grad, db, *self._geometry())
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self.x.shape)
        conv.conv2d_backward_input(dy, w.data, dx, *self._geometry())
        return dx

    def flops(self, batch):
        oh, ow, f = self.out_shape
        return 2 * batch * oh * ow * self.kernel[0] * self.kernel[1] * self.in_shape[2] * f

    def __repr__(self):
        return (f"Conv2D(filters={self.filters}, kernel_size={list(self.kernel)}, stride={list(self.stride)}, "
                f"padding={self.padding!r}, dilation={list(self.dilation)}, bias={self.use_bias})")


class MaxPool2D(Layer):
    kind = "maxpool2d"

    def __init__(self, pool_size=2, stride=None, padding=0):
        super().__init__()
        self.pool = pair(pool_size)
        self.stride = pair(stride) if stride is not None else self.pool
        self.pad = pair(padding)

    def output_shape(self, in_shape, path="maxpool2d"):
        _require_rank(in_shape, 3, path, "maxpool2d")
        h, w, c = in_shape
        for axis in (0, 1):
            if self.pad[axis] > self.pool[axis] // 2:
                raise ConfigError(f"{path}.padding", f"must be at most half the pool size "
                                                     f"({self.pool[axis] // 2}), got {self.pad[axis]}")
        oh = window_output_size(h, self.pool[0], self.stride[0], self.pad[0], self.pad[0])
        ow = window_output_size(w, self.pool[1], self.stride[1], self.pad[1], self.pad[1])
        if oh < 1 or ow < 1:
            raise ConfigError(path, f"maxpool2d with pool {list(self.pool)}, stride {list(self.stride)} turns "
                                    f"input {tuple(in_shape)} into an output of size {oh}x{ow} (below 1)")
        return (oh, ow, c)

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x_shape = x.shape
        y = self._buffer("y", (x.shape[0], *self.out_shape))
        self.argmax = self._buffer("argmax", y.shape, np.int32)
        pool.maxpool2d_forward(x, y, self.argmax, self.pool[0], self.pool[1], self.stride[0], self.stride[1],
                               self.pad[0], self.pad[1])
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self.x_shape)
        pool.maxpool2d_backward(dy, self.argmax, dx)
        return dx

    def __repr__(self):
        return f"MaxPool2D(pool_size={list(self.pool)}, stride={list(self.stride)}, padding={list(self.pad)})"


class AvgPool2D(Layer):
    """Average pooling, no padding (PyTorch's AvgPool2d): each output is the mean of its
    pool_h x pool_w window; output size floor((H - pool) / stride) + 1."""

    kind = "avgpool2d"

    def __init__(self, pool_size=2, stride=None):
        super().__init__()
        self.pool = pair(pool_size)
        self.stride = pair(stride) if stride is not None else self.pool

    def output_shape(self, in_shape, path="avgpool2d"):
        _require_rank(in_shape, 3, path, "avgpool2d")
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

    def __repr__(self):
        return f"AvgPool2D(pool_size={list(self.pool)}, stride={list(self.stride)})"


class GlobalAvgPool(Layer):
    """(H, W, C) -> (C,): the mean over height and width. The output is flat: a dense layer
    can follow directly."""

    kind = "global_avgpool"

    def output_shape(self, in_shape, path="global_avgpool"):
        _require_rank(in_shape, 3, path, "global_avgpool")
        return (in_shape[2],)

    def forward(self, x, training):
        x = np.ascontiguousarray(x)
        self._begin_forward(x, training)
        self.x_shape = x.shape
        y = self._buffer("y", (x.shape[0], x.shape[3]))
        pool.global_avgpool_forward(x, y)
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self.x_shape)
        pool.global_avgpool_backward(dy, dx)
        return dx


def _rows(a):
    """A contiguous activation as (batch x rows, W, C): (N*H, W, C) for NHWC, (N, 1, F) for flat."""
    if a.ndim == 4:
        n, h, w, c = a.shape
        return a.reshape(n * h, w, c)
    return a.reshape(a.shape[0], 1, -1)


class Dropout(Layer):
    """Inverted dropout: in training each element is kept with probability 1 - rate and scaled
    by 1 / (1 - rate), else set to 0; identity in evaluation mode and for rate 0.

    The mask is a pure function of (seed, index, step, element index), computed in the kernel
    by a counter-based hash (splitmix64; the exact definition is in fastcnn/kernels/dropout.py):
    no random state, the same with any thread count, and a resumed run draws the same masks.
    ``seed`` is the model seed and ``index`` the layer's position in ``model.layers`` (both set
    by build_model; Sequential fills in ``index`` when it is None); ``step`` is set by
    Sequential.forward from ``model.step`` before each training forward. Used on its own, the
    layer keeps ``step`` as it is (0 unless set): the same mask on every call.
    """

    kind = "dropout"
    uses_step = True  # Sequential sets .step before each training forward

    def __init__(self, rate=0.5, seed=0, index=None):
        super().__init__()
        self.rate = float(rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.seed = 0 if seed is None else int(seed)
        self.index = index
        self.step = 0
        self._threshold = dropout_kernels.dropout_threshold(self.rate)
        self._active = False

    def mask_key(self, step=None):
        """The np.uint64 key of the mask at ``step`` (default: the current step)."""
        return dropout_kernels.dropout_key(self.seed, self.index or 0, self.step if step is None else step)

    def forward(self, x, training):
        self._begin_forward(x, training)
        self._active = bool(training) and self.rate > 0.0
        if not self._active:
            return x
        x = np.ascontiguousarray(x)
        y = self._buffer("y", x.shape)
        self.mask = self._buffer("mask", x.shape, np.uint8)
        self._scale = x.dtype.type(1.0 / (1.0 - self.rate))
        dropout_kernels.dropout_forward(_rows(x), self.mask_key(), self._threshold, self._scale, _rows(y),
                                        _rows(self.mask))
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not need_input_grad:
            return None
        if not self._active:  # evaluation (or rate 0): the identity
            return dy
        dx = self._buffer("dx", dy.shape)
        dropout_kernels.dropout_backward(_rows(dy), _rows(self.mask), dy.dtype.type(self._scale), _rows(dx))
        return dx

    def __repr__(self):
        return f"Dropout(rate={self.rate})"


class ReLU(Layer):
    kind = "relu"

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x = x
        y = self._buffer("y", x.shape)
        activation.relu_forward(x.reshape(-1), y.reshape(-1))
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", dy.shape)
        activation.relu_backward(self.x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        return dx


class LeakyReLU(Layer):
    kind = "leaky_relu"

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x = x
        y = self._buffer("y", x.shape)
        activation.leaky_relu_forward(x.reshape(-1), self.dtype.type(self.negative_slope), y.reshape(-1))
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", dy.shape)
        activation.leaky_relu_backward(self.x.reshape(-1), dy.reshape(-1), self.dtype.type(self.negative_slope),
                                       dx.reshape(-1))
        return dx

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class BatchNorm(Layer):
    """Batch norm per channel (after a conv: over N, H, W) or per feature (after a dense: over N)."""

    kind = "batchnorm"

    def __init__(self, momentum=0.1, eps=1e-5):
        super().__init__()
        self.momentum = float(momentum)
        self.eps = float(eps)

    def output_shape(self, in_shape, path="batchnorm"):
        if len(in_shape) not in (1, 3):
            raise ConfigError(path, f"batchnorm expects (height, width, channels) or (features,), got {in_shape}")
        return in_shape

    def build(self, in_shape, rng, dtype):
        super().build(in_shape, rng, dtype)
        c = in_shape[-1]
        self.params["gamma"] = Parameter(np.ones(c, self.dtype))
        self.params["beta"] = Parameter(np.zeros(c, self.dtype))
        self.buffers["running_mean"] = np.zeros(c, self.dtype)
        self.buffers["running_var"] = np.ones(c, self.dtype)

    def forward(self, x, training):
        if training and x.ndim >= 1 and x.shape[-1] and x.size // x.shape[-1] < 2:  # before any state changes
            raise ValueError(f"batchnorm in training needs more than 1 value per channel, got input shape {x.shape}")
        self._begin_forward(x, training)
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        y = self._buffer("y", x.shape)
        eps = self.dtype.type(self.eps)
        gamma, beta = self.params["gamma"].data, self.params["beta"].data
        if not training:
            norm.batchnorm_forward_eval(x2, gamma, beta, self.buffers["running_mean"], self.buffers["running_var"],
                                        eps, y.reshape(-1, c))
            self.x = x  # a reference, for a backward in evaluation mode
            return y
        m = x2.shape[0]
        self.x = x
        self.mean = self._buffer("mean", (c,))
        self.var = self._buffer("var", (c,))
        self.invstd = self._buffer("invstd", (c,))
        norm.batchnorm_forward_train(x2, gamma, beta, eps, y.reshape(-1, c), self.mean, self.var, self.invstd)
        # Running statistics, as PyTorch: the unbiased batch variance.
        mom = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - mom
        rm += mom * self.mean
        rv *= 1 - mom
        rv += (mom * m / (m - 1)) * self.var
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not self.training:
            return batchnorm_eval_backward(self, self.x, dy, self._buffer("dx", dy.shape) if need_input_grad else None)
        c = dy.shape[-1]
        dx = self._buffer("dx", dy.shape)
        norm.batchnorm_backward(self.x.reshape(-1, c), dy.reshape(-1, c), self.params["gamma"].data, self.mean,
                                self.invstd, dx.reshape(-1, c), self.params["gamma"].grad, self.params["beta"].grad)
        return dx if need_input_grad else None

    def __repr__(self):
        return f"BatchNorm(momentum={self.momentum}, eps={self.eps})"


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
    rv = bn.buffers["running_var"]
    invstd = (np.ones((), dt) / np.sqrt(rv + dt.type(bn.eps))).astype(dt, copy=False)
    gamma = bn.params["gamma"]
    bn.params["beta"].grad[...] = dy2.sum(axis=0, dtype=dt)
    gamma.grad[...] = (dy2 * (x2 - bn.buffers["running_mean"])).sum(axis=0, dtype=dt) * invstd
    if dx is None:
        return None
    np.multiply(dy, (gamma.data * invstd).astype(dt, copy=False), out=dx)
    return dx


class Flatten(Layer):
    """(H, W, C) -> (H*W*C,), NHWC order: feature index = (h*W + w)*C + c."""

    kind = "flatten"

    def output_shape(self, in_shape, path="flatten"):
        return (int(np.prod(in_shape)),)

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        return dy.reshape(self.x_shape) if need_input_grad else None


class Dense(Layer):
    kind = "dense"

    def __init__(self, units, bias=True):
        super().__init__()
        self.units = int(units)
        self.use_bias = bool(bias)

    def output_shape(self, in_shape, path="dense"):
        _require_rank(in_shape, 1, path, "dense")
        return (self.units,)

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
        dense.dense_backward_weight(self.x, dy, w.grad, db)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self.x.shape)
        dense.dense_backward_input(dy, w.data, dx)
        return dx

    def flops(self, batch):
        return 2 * batch * self.in_shape[0] * self.units

    def __repr__(self):
        return f"Dense(units={self.units}, bias={self.use_bias})"


LAYER_TYPES = {
    "conv2d": Conv2D,
    "maxpool2d": MaxPool2D,
    "avgpool2d": AvgPool2D,
    "global_avgpool": GlobalAvgPool,
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "batchnorm": BatchNorm,
    "flatten": Flatten,
    "dense": Dense,
    "dropout": Dropout,
}


def layer_from_config(spec):
    """A layer object from a validated config entry {type: ..., **options}."""
    options = {k: v for k, v in spec.items() if k != "type"}
    return LAYER_TYPES[spec["type"]](**options)
