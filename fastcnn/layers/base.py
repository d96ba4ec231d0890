"""What every layer type shares: Parameter, the Layer protocol, initialization.

A layer type is one class in its own module of this package. The class is the
single home of everything about the type:

* ``kind``: its config ``type``; ``options``: its config options as a schema
  (``name -> (checker, default)``, fastcnn/schema.py), read by config
  validation, by the constructor (positional in declaration order or by name)
  and by the README check in the tests;
* ``output_shape(in_shape, path)``: the per-sample output shape, or a
  ConfigError naming ``path``; ``parameter_shapes(in_shape)``: the shapes of its
  parameters and buffers (config validation bounds the model size with them
  before anything is allocated); ``build``: allocation and initialization;
* ``flops(batch)``, ``describe()`` (the summary's text), ``torch_module(torch)``
  (the PyTorch twin used by the tests and benchmarks), ``onnx_nodes(graph, x)`` (its
  evaluation-mode ONNX nodes, fastcnn/onnx_export.py);
* ``forward(x, training)`` / ``backward(dy, need_input_grad)`` calling the kernels.

The package discovers the classes (fastcnn/layers/__init__.py): adding a layer
type is adding a module, its tests and its README row.

The protocol, so that a model can branch (a residual block feeds one input to
two consumers and adds their gradients):

* ``forward`` never writes into its input; its output lives in a buffer the
  layer owns and reuses (valid until its next forward), so one output may feed
  several consumers;
* ``backward`` returns dL/dx in a buffer the layer owns (or, for layers that
  are the identity in backward, the very ``dy`` given): a consumer that
  accumulates gradients from several branches adds them into a buffer of its
  own, never into one it received;
* ``backward`` overwrites (never accumulates into) its parameters' ``.grad``;
* ``children()`` names the sub-layers of a container (none for a plain layer):
  state-dict keys, the summary and model-wide walks follow it.

Kernels are imported lazily (``kernel_module``): validating a config or
printing a summary imports no Numba code.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from ..schema import Schema, int_or_pair, optional, resolve_options
from ..shapes import window_output_size

Shape = Tuple[int, ...]


class kernel_module:
    """A fastcnn.kernels module imported on first use (attributes are cached on access)."""

    def __init__(self, name: str):
        self._name = f"fastcnn.kernels.{name}"

    def __getattr__(self, attr):
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)
        return value


class Parameter:
    """A trainable array and its gradient (same shape and dtype)."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.grad = np.zeros_like(data)

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def checked_gradient(owner, dy, expected, dtype) -> np.ndarray:
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


class Scratch:
    """Arrays reused across calls while their shape and dtype stay the same."""

    def _buffer(self, name: str, shape, dtype=None) -> np.ndarray:
        dtype = np.dtype(dtype or self.dtype)
        scratch = self.__dict__.setdefault("_scratch", {})
        buf = scratch.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = np.empty(shape, dtype=dtype)
            scratch[name] = buf
        return buf


class Layer(Scratch):
    """Base class of layer types (see the module docstring for the protocol)."""

    kind: str = ""              # the config `type`; "" for an abstract base
    options: Schema = {}        # config options: name -> (checker, default)
    init = "he_uniform"         # weight initialization scheme (init_weight_and_bias); set by build_model

    def __init__(self, *args, **kwargs):
        # The declared options, with the config file's checks and defaults.
        self.config: Dict[str, Any] = resolve_options(type(self).options, args, kwargs,
                                                      self.kind or type(self).__name__)
        self.params: Dict[str, Parameter] = {}
        self.buffers: Dict[str, np.ndarray] = {}
        self._scratch = {}
        self.dtype = np.dtype(np.float32)

    # -- declaration -------------------------------------------------------
    def output_shape(self, in_shape: Shape, path: str = "layer") -> Shape:
        """Per-sample output shape; ConfigError (naming ``path``) if impossible."""
        return tuple(in_shape)

    def parameter_shapes(self, in_shape: Shape) -> Dict[str, Shape]:
        """{name: shape} of the parameters and buffers a build for ``in_shape`` allocates."""
        return {}

    def flops(self, batch: int) -> int:
        """Forward multiply-add FLOPs (2 per MAC) for a batch; 0 for cheap layers."""
        return 0

    def describe(self) -> str:
        """A short description for the summary table, e.g. ``conv2d 32 3x3 s1 p0``."""
        return self.kind

    def torch_module(self, torch):
        """The equivalent torch.nn module, with this layer's weights copied (NCHW)."""
        raise NotImplementedError(f"no PyTorch twin for {self.kind or type(self).__name__}")

    def onnx_nodes(self, graph, x: str) -> str:
        """Add the ONNX nodes computing this layer in evaluation mode to ``graph`` (an OnnxGraph of
        fastcnn/onnx_export.py: ``graph.node(op, inputs, **attributes)``, ``graph.constant(name, array)``)
        and return the output's name. ``x`` names the input: NCHW for a (H, W, C) layer, (batch,
        features) for a flat one. The default: this layer type cannot be exported (one line naming it)."""
        raise graph.cannot_export(self)

    def children(self) -> List[Tuple[str, "Layer"]]:
        """(name, sub-layer) pairs of a container; none for a plain layer."""
        return []

    # -- building ----------------------------------------------------------
    def build(self, in_shape: Shape, rng: np.random.Generator, dtype) -> None:
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(self.output_shape(in_shape))
        self.dtype = np.dtype(dtype)

    # -- walking (state-dict keys follow children()) -------------------------
    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Layer"]]:
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        for path, module in self.named_modules(prefix):
            for name, p in module.params.items():
                yield (f"{path}.{name}" if path else name), p

    def named_buffers(self, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
        for path, module in self.named_modules(prefix):
            for name, b in module.buffers.items():
                yield (f"{path}.{name}" if path else name), b

    # -- running -----------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_input_grad: bool = True) -> Optional[np.ndarray]:
        raise NotImplementedError

    # The part of the batch this process holds (fastcnn/shard.py; set by Sequential.set_shard).
    shard = None

    def batch_shard(self, n: int):
        """The BatchShard of a forward batch of ``n`` samples: the one set for the step when it
        holds n samples, else the whole batch in this process."""
        from ..shard import shard_for

        return shard_for(self.shard, n)

    # Shape checks: the kernels do no bounds checking.
    _dy_shape = None  # the shape backward expects: that of the last forward's output

    def _begin_forward(self, x, training):
        """Check x against the built input shape; remember the input and output shapes and the mode."""
        self._dy_shape = None
        in_shape = getattr(self, "in_shape", None)
        if in_shape is not None and (x.ndim != 1 + len(in_shape) or tuple(x.shape[1:]) != in_shape):
            raise ValueError(f"{type(self).__name__}.forward: input must have shape (batch, "
                             f"{', '.join(map(str, in_shape))}), got {x.shape}")
        self.training = bool(training)
        self.x_shape = x.shape
        self._dy_shape = (x.shape[0], *self.out_shape) if in_shape is not None else None

    def _check_dy(self, dy):
        return checked_gradient(self, dy, self._dy_shape, self.dtype)

    def _begin_backward(self, dy, need_input_grad):
        """(checked dy, the input-gradient buffer (the last forward input's shape) or None when it is
        not wanted)."""
        dy = self._check_dy(dy)
        return dy, (self._buffer("dx", self.x_shape) if need_input_grad else None)

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({shown})"


def require_rank(in_shape, rank, path, what):
    """ConfigError unless the input is (height, width, channels) (rank 3) or flat (rank 1)."""
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


def hw(pair_value) -> str:
    """(3, 3) -> '3', (1, 2) -> '1x2' (summary text)."""
    a, b = (int(v) for v in pair_value)
    return f"{a}" if a == b else f"{a}x{b}"


def window(pair_value) -> str:
    a, b = (int(v) for v in pair_value)
    return f"{a}x{b}"


def pool_window_options(padding: bool) -> dict:
    """The options of a pooling window (maxpool2d, avgpool2d): pool_size, stride (default: the pool
    size) and, where the type pads, padding."""
    options = {
        "pool_size": (int_or_pair(1), 2),
        "stride": (optional(int_or_pair(1)), None),
    }
    if padding:
        options["padding"] = (int_or_pair(0), 0)
    return options


def pooled_shape(layer, in_shape, path, pad=(0, 0)):
    """(OH, OW, C) of a pooling window layer (``layer.pool``, ``layer.stride``); ConfigError below 1x1."""
    require_rank(in_shape, 3, path, layer.kind)
    h, w, c = in_shape
    oh = window_output_size(h, layer.pool[0], layer.stride[0], pad[0], pad[0])
    ow = window_output_size(w, layer.pool[1], layer.stride[1], pad[1], pad[1])
    if oh < 1 or ow < 1:
        raise ConfigError(path, f"{layer.kind} with pool {list(layer.pool)}, stride {list(layer.stride)} turns "
                                f"input {tuple(in_shape)} into an output of size {oh}x{ow} (below 1)")
    return (oh, ow, c)


def torch_dtype(layer, torch):
    return torch.float64 if layer.dtype == np.float64 else torch.float32


def rows(a):
    """A contiguous activation as (batch x rows, W, C): (N*H, W, C) for NHWC, (N, 1, F) for flat."""
    if a.ndim == 4:
        n, h, w, c = a.shape
        return a.reshape(n * h, w, c)
    return a.reshape(a.shape[0], 1, -1)
