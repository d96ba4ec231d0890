"""conv2d: 2-D cross-correlation, NHWC input, HWIO weight (PyTorch's Conv2d semantics, ``groups`` included).

``groups`` (DESIGN.md section 8): input channels and ``filters`` divisible by it; weight ``(kh, kw,
in_channels / groups, filters)``; output channel o sees the input channels of group o // (filters /
groups). groups == in_channels (depthwise, any channel multiplier filters / in_channels) runs the fused
NHWC depthwise kernels of fastcnn/kernels/depthwise.py; other groups > 1 run the conv kernels per group.
"""
import numpy as np

from ..errors import ConfigError
from ..schema import REQUIRED, boolean, int_or_pair, integer, padding_value
from ..shapes import pair, same_padding, window_output_size
from .base import Layer, Parameter, hw, init_weight_and_bias, kernel_module, require_rank, torch_dtype, window

conv = kernel_module("conv")
depthwise = kernel_module("depthwise")


class Conv2D(Layer):
    kind = "conv2d"
    options = {
        "filters": (integer(1), REQUIRED),
        "kernel_size": (int_or_pair(1), REQUIRED),
        "stride": (int_or_pair(1), 1),
        "padding": (padding_value, 0),
        "dilation": (int_or_pair(1), 1),
        "bias": (boolean, True),
        "groups": (integer(1), 1),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.filters = c["filters"]
        self.kernel = pair(c["kernel_size"])
        self.stride = pair(c["stride"])
        self.dilation = pair(c["dilation"])
        self.padding = c["padding"]
        self.use_bias = c["bias"]
        self.groups = c["groups"]

    def _pads(self, in_shape):
        """(top, bottom, left, right) for a (H, W, C) input."""
        if self.padding == "same":
            top, bottom = same_padding(self.kernel[0], self.dilation[0], self.stride[0], in_shape[0])
            left, right = same_padding(self.kernel[1], self.dilation[1], self.stride[1], in_shape[1])
            return top, bottom, left, right
        if self.padding == "valid":
            return 0, 0, 0, 0
        ph, pw = pair(self.padding)
        return ph, ph, pw, pw

    def output_shape(self, in_shape, path="conv2d"):
        require_rank(in_shape, 3, path, "conv2d")
        h, w, cin = in_shape
        g = self.groups
        if cin % g or self.filters % g:
            raise ConfigError(f"{path}.groups", f"{g} must divide both the input channels ({cin}) and filters "
                                                f"({self.filters})")
        top, bottom, left, right = self._pads(in_shape)
        oh = window_output_size(h, self.kernel[0], self.stride[0], top, bottom, self.dilation[0])
        ow = window_output_size(w, self.kernel[1], self.stride[1], left, right, self.dilation[1])
        if oh < 1 or ow < 1:
            raise ConfigError(path, f"conv2d with kernel {list(self.kernel)}, stride {list(self.stride)}, "
                                    f"padding {self.padding!r}, dilation {list(self.dilation)} turns input "
                                    f"{tuple(in_shape)} into an output of size {oh}x{ow} (below 1)")
        return (oh, ow, self.filters)

    def parameter_shapes(self, in_shape):
        shapes = {"weight": (*self.kernel, in_shape[2] // self.groups, self.filters)}
        if self.use_bias:
            shapes["bias"] = (self.filters,)
        return shapes

    def build(self, in_shape, rng, dtype):
        super().build(in_shape, rng, dtype)
        self.pads = self._pads(in_shape)
        kh, kw = self.kernel
        cin = in_shape[2] // self.groups  # input channels each output channel sees (PyTorch's fan_in)
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

    def forward(self, x, training, relu=False):
        """y = conv(x) + bias; with ``relu`` (the conv + ReLU block, fastcnn/fusion.py; groups 1 only)
        the ReLU applied to each output row as it is written."""
        self._begin_forward(x, training)
        self.x = x
        y = self._buffer("y", (x.shape[0], *self.out_shape))
        if self.groups == 1:
            conv.conv2d_forward(x, self.params["weight"].data, self._bias(), y, *self._geometry(), relu=relu)
        else:
            assert not relu, "the fused epilogue is for groups == 1"
            depthwise.grouped_forward(x, self.params["weight"].data, self._bias(), y, self.groups, *self._geometry())
        return y

    def record_forward(self, x):
        """What ``forward(x, True)`` records for ``backward``, without computing y: the cold-start
        warm-up's backward-only unit (fastcnn/runtime.py) compiles the backward kernels in one process
        while another compiles the forward's."""
        self._begin_forward(x, True)
        self.x = x

    def input_gradient_runs_forward_kernel(self):
        """Whether this layer's input gradient runs the forward's kernel (conv.input_gradient_via_forward):
        then the warm-up does not compile its backward apart from its forward."""
        return self.groups == 1 and conv.input_gradient_via_forward(self.params["weight"].data.shape,
                                                                     *self._geometry())

    def folded_forward(self, x, scale, shift, y, relu=False, residual=None):
        """y = relu?(conv(x) * scale + shift [+ residual]) per output channel, computed as conv(x) with
        the weights times ``scale`` and the bias ``bias * scale + shift``: an evaluation-mode batch norm
        folded in (fastcnn/fusion.py), and a residual block's add (groups 1), in one pass. Records
        nothing for a backward; x's shape is the caller's to check (ConvBatchNorm: its block's)."""
        w = self._buffer("folded_weight", self.params["weight"].data.shape)
        b = self._buffer("folded_bias", (self.filters,))
        np.multiply(self.params["weight"].data, scale, out=w)  # HWIO: the last axis is the output channel
        np.multiply(self._bias(), scale, out=b)
        b += shift
        if self.groups == 1:
            conv.conv2d_forward(x, w, b, y, *self._geometry(), relu=relu, residual=residual)
        else:
            assert not relu and residual is None, "the fused epilogue is for groups == 1"
            depthwise.grouped_forward(x, w, b, y, self.groups, *self._geometry())
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        w = self.params["weight"]
        db = self.params["bias"].grad if self.use_bias else self._buffer("db", (self.filters,))
        dx = None if not need_input_grad else self._buffer("dx", self.x.shape)
        x, geometry = self.x, self._geometry()
        shard = self.batch_shard(x.shape[0])
        if self.groups == 1:
            shard.sum_chunks(self._buffer, lambda s, dw, db: conv.conv2d_backward_weight(
                x[s], dy[s], dw, db, *geometry), w.grad, db)
            if dx is not None:
                conv.conv2d_backward_input(dy, w.data, dx, *geometry)
        else:  # per chunk (the depthwise kernel computes dx in the same pass)
            shard.sum_chunks(self._buffer, lambda s, dw, db: depthwise.grouped_backward(
                x[s], dy[s], w.data, None if dx is None else dx[s], dw, db, self.groups, *geometry), w.grad, db)
        return dx

    def onnx_nodes(self, graph, x):
        top, bottom, left, right = self.pads
        inputs = [x, graph.constant("weight", self.params["weight"].data.transpose(3, 2, 0, 1))]  # HWIO -> OIHW
        if self.use_bias:
            inputs.append(graph.constant("bias", self.params["bias"].data))
        return graph.node("Conv", inputs, kernel_shape=list(self.kernel), strides=list(self.stride),
                          dilations=list(self.dilation), pads=[top, left, bottom, right], group=self.groups)

    def flops(self, batch):
        oh, ow, f = self.out_shape
        return 2 * batch * oh * ow * self.kernel[0] * self.kernel[1] * (self.in_shape[2] // self.groups) * f

    def describe(self):
        if self.padding == "same":
            pad = "same"
        elif self.padding == "valid":
            pad = "p0"
        else:
            pad = f"p{hw(self.pads[0::2] if hasattr(self, 'pads') else pair(self.padding))}"
        text = f"conv2d {self.filters} {window(self.kernel)} s{hw(self.stride)} {pad}"
        if tuple(self.dilation) != (1, 1):
            text += f" d{hw(self.dilation)}"
        if self.groups != 1:
            text += f" g{self.groups}"
        if not self.use_bias:
            text += " nobias"
        return text

    def torch_module(self, torch):
        nn = torch.nn
        top, bottom, left, right = self.pads

        class PaddedConv2d(nn.Conv2d):
            """Zero padding that may differ top/bottom, left/right (strided `same`) before the
            convolution; the parameters keep nn.Conv2d's names (``weight``, ``bias``)."""

            def forward(self, x):
                return super().forward(nn.functional.pad(x, (left, right, top, bottom)))

        symmetric = top == bottom and left == right
        cls = nn.Conv2d if symmetric else PaddedConv2d
        mod = cls(self.in_shape[2], self.filters, self.kernel, stride=self.stride, dilation=self.dilation,
                  padding=(top, left) if symmetric else 0, groups=self.groups, bias=self.use_bias,
                  dtype=torch_dtype(self, torch))
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(self.params["weight"].data.transpose(3, 2, 0, 1).copy()))
            if self.use_bias:
                mod.bias.copy_(torch.from_numpy(self.params["bias"].data))
        return mod
