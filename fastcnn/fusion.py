"""Plan fused blocks from a layer list.

A block runs one or more consecutive layers in fewer passes over memory
(e.g. ReLU + max-pool in one kernel). Blocks hold no parameters of their own:
they use the layers' Parameter objects and buffers, so state-dict keys,
gradients and results equal those of the unfused layers.

Fused runs, first match wins at each position:

* ``conv2d (groups 1) -> batchnorm [-> relu]``, no max-pool after it -> ConvBatchNorm
  (holding the BatchNorm layer, or the BatchNormReLU block of the two)
* ``conv2d (groups 1) -> relu``, no max-pool after it -> ConvReLU

(Before a max-pool the convolution stays alone: the batch norm + ReLU + max-pool or ReLU + max-pool
block after it reads its output once, and a fused evaluation forward would still need the max-pool's
own pass; measured 4-12% slower on mnist_bn's first layer.)
* ``batchnorm -> relu -> maxpool2d``  -> BatchNormReLU (with pool)
* ``batchnorm -> relu``               -> BatchNormReLU
* ``relu -> maxpool2d``               -> ActivationMaxPool2D
* ``leaky_relu -> maxpool2d`` whose windows do not overlap -> ActivationMaxPool2D

Every other layer is its own block. A block runs the kernels of its layers'
operations with other flags (fastcnn/kernels/fused.py; the convolution's
epilogue in fastcnn/kernels/conv.py): the same max-pool scan and scatter,
activation, batch-norm statistics (BatchNorm.normalization, which also updates
the running statistics), reductions and input gradient. Results equal the
unfused layers exactly, except after a max-pool the batch-norm gradients
(gamma, beta and the input gradient), whose reductions add the winners' terms
in pooled order, and the evaluation forward of ConvBatchNorm, which folds the
batch norm into the convolution's weights (within the unfused computation's own
rounding error).
"""
import numpy as np

from .layers.base import checked_gradient, kernel_module
from .layers.batchnorm import BatchNorm, batchnorm_eval_backward, check_batch_values
from .layers.conv2d import Conv2D
from .layers.leaky_relu import LeakyReLU
from .layers.maxpool2d import MaxPool2D
from .layers.relu import ReLU

fused = kernel_module("fused")
pooling = kernel_module("pool")
activation = kernel_module("activation")

class Block:
    """Base of fused blocks: the layers it runs and reusable scratch arrays."""

    def __init__(self, layers):
        self.layers = tuple(layers)
        self.kind = "+".join(layer.kind for layer in self.layers)
        self._scratch = {}

    def _buffer(self, name, shape, dtype):
        """A scratch array reused across calls while its shape and dtype stay the same."""
        dtype = np.dtype(dtype)
        buf = self._scratch.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = np.empty(shape, dtype=dtype)
            self._scratch[name] = buf
        return buf

    def flops(self, batch):
        return sum(layer.flops(batch) for layer in self.layers)

    # -- shape checks, as Layer's: the kernels do no bounds checking -------
    _dy_shape = None

    def _begin_forward(self, x, training):
        self._dy_shape = None
        in_shape = self.layers[0].in_shape
        if x.ndim != 1 + len(in_shape) or tuple(x.shape[1:]) != in_shape:
            raise ValueError(f"{type(self).__name__}.forward: input must have shape (batch, "
                             f"{', '.join(map(str, in_shape))}), got {x.shape}")
        self.training = bool(training)
        self._dy_shape = (x.shape[0], *self.layers[-1].out_shape)

    def _check_dy(self, dy):
        return checked_gradient(self, dy, self._dy_shape, self.layers[0].dtype)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(repr(layer) for layer in self.layers)})"


class ActivationMaxPool2D(Block):
    """ReLU (or leaky ReLU) then max-pool: one pass forward, one pass backward."""

    def __init__(self, act, pool):
        super().__init__((act, pool))
        self.act = act
        self.pool = pool
        self.slope = act.negative_slope if isinstance(act, LeakyReLU) else None

    def forward(self, x, training):
        x = np.ascontiguousarray(x)
        self._begin_forward(x, training)
        self.x_shape = x.shape
        y = self._buffer("y", (x.shape[0], *self.pool.out_shape), x.dtype)
        self.argmax = self._buffer("argmax", y.shape, np.int32)
        if self.slope is None:
            fused.relu_maxpool2d_forward(x, y, self.argmax, *self.pool.window_args())
        else:
            fused.leaky_relu_maxpool2d_forward(x, x.dtype.type(self.slope), y, self.argmax, *self.pool.window_args())
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)  # the argmax of the last forward (training or not) routes it
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self.x_shape, dy.dtype)
        if self.slope is None:  # the MaxPool2D layer's backward: the argmax codes route or not
            pooling.maxpool2d_backward(dy, self.argmax, dx)
        else:
            fused.leaky_relu_maxpool2d_backward(dy, self.argmax, dy.dtype.type(self.slope), dx)
        return dx


class BatchNormReLU(Block):
    """Batch norm then ReLU, optionally then max-pool.

    Forward: the BatchNorm layer's statistics (BatchNorm.normalization: two reads
    of x, invstd, the running statistics), then one normalize + ReLU (+ pool)
    pass. Backward: one pass for both reductions (over the pooled tensor when
    pooling) and one pass writing dx; gamma.grad and beta.grad of the BatchNorm
    layer are overwritten as the layer does.
    """

    def __init__(self, bn, relu, pool=None):
        super().__init__((bn, relu) if pool is None else (bn, relu, pool))
        self.bn = bn
        self.relu = relu
        self.pool = pool

    def forward(self, x, training):
        bn = self.bn
        x = np.ascontiguousarray(x)
        check_batch_values(bn, x, training)  # before any state changes
        self._begin_forward(x, training)
        dt = x.dtype
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        beta = bn.params["beta"].data
        mean, scale = bn.normalization(x2, training, bn.batch_shard(x.shape[0]))  # the layer's statistics
        if training:
            self.x = x
            self.beta = self._buffer("beta", (c,), dt)
            self.beta[...] = beta  # the backward recomputes z with the forward's beta
        else:
            self.eval_x = x  # references only, for a backward in evaluation mode (rare: nothing is recomputed
            #                  here; the backward rebuilds what it needs)
        if self.pool is None:
            y = self._buffer("y", x.shape, dt)
            fused.batchnorm_relu_forward(x2, mean, scale, beta, y.reshape(-1, c))
            self.eval_y = None if training else y
            return y
        y = self._buffer("y", (x.shape[0], *self.pool.out_shape), dt)
        if training:
            self.argmax = self._buffer("argmax", y.shape, np.int32)
            self.xsel = self._buffer("xsel", y.shape, dt)
            argmax, xsel = self.argmax, self.xsel
        else:  # not written in evaluation: the training forward's stay for its backward
            argmax = self._buffer("eval_argmax", (1, 1, 1, 1), np.int32)
            xsel = self._buffer("eval_xsel", (1, 1, 1, 1), dt)
        fused.batchnorm_relu_maxpool2d_forward(x, mean, scale, beta, y, argmax, xsel, training,
                                               *self.pool.window_args())
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not self.training:
            return self._eval_backward(dy, need_input_grad)
        bn = self.bn
        x = self.x
        c = x.shape[-1]
        n = x.shape[0]
        x2, dy2 = x.reshape(-1, c), dy.reshape(-1, c)
        if self.pool is None:
            part_b, part_g, bounds = bn.backward_parts(x2.shape[0] // n)
            fused.batchnorm_relu_backward_reduce(x2, dy2, bn.mean, bn.scale, self.beta, bounds, part_b, part_g)
        else:  # the sums over the pooled tensors
            part_b, part_g, bounds = bn.backward_parts(dy2.shape[0] // n)
            fused.pooled_batchnorm_reduce(dy2, self.argmax.reshape(-1, c), self.xsel.reshape(-1, c), bounds,
                                          part_b, part_g)
        k1, k2, k3 = bn.backward_coefficients(part_b, part_g)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", x.shape, x.dtype)
        if self.pool is None:
            fused.batchnorm_relu_backward_dx(x2, dy2, bn.mean, bn.scale, self.beta, k1, k2, k3, dx.reshape(-1, c))
        else:
            fused.batchnorm_relu_maxpool2d_backward_dx(x, dy, self.argmax, bn.mean, k1, k2, k3, dx)
        return dx

    def _eval_backward(self, dy, need_input_grad):
        """Backward after forward(training=False): through the pool's argmax and the ReLU mask
        of that forward, then the evaluation batch norm (an affine map; see
        layers.batchnorm_eval_backward). Unfused and partly NumPy: evaluation backward is rare,
        so the evaluation forward records nothing but references."""
        bn = self.bn
        x = self.eval_x
        dt = x.dtype
        c = x.shape[-1]
        if self.pool is None:
            # relu'(z) from the forward's own output: y <= 0 exactly where z <= 0 (NaN passes, as torch).
            g = self._buffer("eval_g", x.shape, dt)
            np.copyto(g, dy)
            g[self.eval_y <= 0] = 0
        else:
            # The winners of that forward: the training kernel (same arithmetic) rerun on the same
            # x, running mean and scale, into buffers of its own (the training caches stay).
            mean, scale = bn.normalization(x.reshape(-1, c), False, None)
            y = self._buffer("eval_y2", dy.shape, dt)
            argmax = self._buffer("eval_argmax2", dy.shape, np.int32)
            xsel = self._buffer("eval_xsel2", dy.shape, dt)
            fused.batchnorm_relu_maxpool2d_forward(x, mean, scale, bn.params["beta"].data, y, argmax, xsel, True,
                                                   *self.pool.window_args())
            g = self._buffer("eval_g", x.shape, dt)
            pooling.maxpool2d_backward(dy, argmax, g)
        dx = self._buffer("dx", x.shape, dt) if need_input_grad else None
        return batchnorm_eval_backward(bn, x, g, dx)


class ConvReLU(Block):
    """Convolution (groups 1) then ReLU: the ReLU applied to each output row as the convolution writes
    it (kernels/conv.py, the epilogue), so the ReLU's pass over memory is gone. Backward: the ReLU's
    gradient masked by the block's output (<= 0 exactly where the convolution's output was; NaN
    passes, as torch), then the convolution's backward. Bit-identical to the two layers."""

    def __init__(self, conv, relu):
        super().__init__((conv, relu))
        self.conv = conv
        self.parts = (conv, relu)  # what a compile helper runs (fastcnn/runtime.py): the same kernels

    def forward(self, x, training):
        self._begin_forward(x, training)
        self.y = self.conv.forward(x, training, relu=True)
        return self.y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        g = self._buffer("g", dy.shape, dy.dtype)
        # Flat views, as the ReLU layer passes them: the kernel the compile helpers ran for it.
        activation.relu_backward(self.y.reshape(-1), dy.reshape(-1), g.reshape(-1))
        return self.conv.backward(g, need_input_grad)


class ConvBatchNorm(Block):
    """Convolution (groups 1) then batch norm, optionally then ReLU: ``norm`` is the BatchNorm layer or
    a BatchNormReLU block (without max-pool: fastcnn.fusion.plan_blocks).

    Training: the convolution, then ``norm`` (the batch statistics need the whole output first).

    Evaluation: the batch norm (running statistics: a per-channel affine map) folded into the
    convolution, weights times scale = gamma / sqrt(running_var + eps) and bias (bias - running_mean)
    * scale + beta, with the ReLU in its epilogue: one pass where the layers take two. Not
    bit-identical to the layers: the weights are rounded after scaling and conv * scale - mean * scale
    replaces (conv - mean) * scale, so the outputs differ within the unfused computation's own rounding
    error (1e-7 to 1e-6 relative in float32 when the batch norm's input has a moderate mean; both
    errors grow with |running_mean| / std). A backward after an evaluation forward (rare) runs the
    layers' evaluation forward again, then their backward.
    """

    def __init__(self, conv, norm):
        super().__init__((conv, *getattr(norm, "layers", (norm,))))
        self.conv = conv
        self.norm = norm
        self.bn = norm if isinstance(norm, BatchNorm) else norm.bn
        self.relu = not isinstance(norm, BatchNorm)
        assert getattr(norm, "pool", None) is None, "a max-pool after the batch norm stays in its own block"
        self.parts = (conv, norm)  # what a compile helper runs (fastcnn/runtime.py): the same kernels

    def forward(self, x, training):
        if not training:
            return self.folded_forward(x, self._buffer("y", (x.shape[0], *self.conv.out_shape), x.dtype))
        self._begin_forward(x, True)
        return self.norm.forward(self.conv.forward(x, True), True)

    def folded_forward(self, x, y, residual=None, relu=None):
        """The evaluation forward into y: the convolution with the batch norm folded in, then ``residual``
        added (a residual block's other branch) and ReLU (``relu``: None for the block's own), each
        output row as it is written; returns y."""
        self._begin_forward(x, False)
        self.eval_x = x
        bn = self.bn
        mean, scale = bn.normalization(None, False, None)  # the running statistics
        shift = self._buffer("shift", scale.shape, scale.dtype)
        np.multiply(mean, scale, out=shift)
        np.subtract(bn.params["beta"].data, shift, out=shift)
        return self.conv.folded_forward(x, scale, shift, y, relu=self.relu if relu is None else relu,
                                        residual=residual)

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not self.training:  # the layers' evaluation forward, for their backward
            self.norm.forward(self.conv.forward(self.eval_x, False), False)
        return self.conv.backward(self.norm.backward(dy), need_input_grad)


def _leaky_pool_fusable(pool):
    # Overlapping windows would add slope*dy1 + slope*dy2 where the layers compute
    # slope*(dy1 + dy2): not bit-identical, so those stay unfused.
    return pool.stride[0] >= pool.pool[0] and pool.stride[1] >= pool.pool[1]


def plan_blocks(layers):
    """[block, ...] covering ``layers`` in order; a block has forward(x, training) and
    backward(dy, need_input_grad)."""
    layers = list(layers)
    blocks = []
    i = 0
    n = len(layers)

    def at(j, cls):
        return j < n and type(layers[j]) is cls

    while i < n:
        conv_first = at(i, Conv2D) and layers[i].groups == 1
        if conv_first and at(i + 1, BatchNorm) and at(i + 2, ReLU) and not at(i + 3, MaxPool2D):
            blocks.append(ConvBatchNorm(layers[i], BatchNormReLU(layers[i + 1], layers[i + 2])))
            i += 3
        elif conv_first and at(i + 1, BatchNorm) and not at(i + 2, ReLU):
            blocks.append(ConvBatchNorm(layers[i], layers[i + 1]))
            i += 2
        elif conv_first and at(i + 1, ReLU) and not at(i + 2, MaxPool2D):
            blocks.append(ConvReLU(layers[i], layers[i + 1]))  # before a max-pool: ReLU + max-pool is fused
            i += 2
        elif at(i, BatchNorm) and at(i + 1, ReLU):
            if at(i + 2, MaxPool2D):  # a max-pool input is (N, H, W, C): per-channel batch norm
                blocks.append(BatchNormReLU(layers[i], layers[i + 1], layers[i + 2]))
                i += 3
            else:
                blocks.append(BatchNormReLU(layers[i], layers[i + 1]))
                i += 2
        elif at(i, ReLU) and at(i + 1, MaxPool2D):
            blocks.append(ActivationMaxPool2D(layers[i], layers[i + 1]))
            i += 2
        elif at(i, LeakyReLU) and at(i + 1, MaxPool2D) and _leaky_pool_fusable(layers[i + 1]):
            blocks.append(ActivationMaxPool2D(layers[i], layers[i + 1]))
            i += 2
        else:
            blocks.append(layers[i])
            i += 1
    return blocks
