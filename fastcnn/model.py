"""Sequential model: built from ``model.layers``, forward/backward, state_dict.

State-dict keys are ``layers.<i>.<name>``, ``<i>`` counting every layer of the
config (ReLU and flatten too), ``<name>`` one of weight, bias, gamma, beta,
running_mean, running_var.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import CheckpointError
from .layers import Layer, Parameter, plan_shapes

__all__ = ["Sequential", "build_model", "plan_shapes"]


def _spec_get(spec, key, default=None):
    return spec.get(key, default) if isinstance(spec, dict) else getattr(spec, key, default)


class Sequential:
    """A stack of layers applied in order."""

    def __init__(self, layers: Sequence[Layer], input_shape: Sequence[int], dtype="float32", fuse: bool = True):
        from .fusion import plan_blocks

        self.layers = list(layers)
        # What forward/backward run: fused blocks (same results, fewer passes over memory) or the layers.
        self.blocks = plan_blocks(self.layers) if fuse else list(self.layers)
        self.input_shape = tuple(input_shape)
        self.dtype = np.dtype(dtype)
        # Training-step counter read by layers with ``uses_step`` (dropout: its mask is a function of
        # (seed, layer index, step)). The trainer sets ``model.step = <global step>`` before each training
        # forward; left alone, forward(training=True) increments it after each call.
        self.step = 0
        self.shard = None  # the part of each batch this process holds (set_shard); None: all of it
        # (output shape, dtype, training) of the last forward that completed; backward checks against it.
        self._last_forward = None
        self._stepped = [m for _, m in self.named_modules() if getattr(m, "uses_step", False)]
        for i, layer in enumerate(self.layers):
            if getattr(layer, "uses_step", False) and getattr(layer, "index", 0) is None:
                layer.index = i

    # -- the training step -------------------------------------------------
    def set_shard(self, shard) -> None:
        """The part of the batch this process holds in the next steps (fastcnn/shard.py BatchShard;
        None: every batch whole, the default). Layers use it for batches of its local size."""
        self.shard = shard
        for _, module in self.named_modules():
            module.shard = shard

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x: (N, H, W, C) NHWC -> logits (N, num_classes), a fresh array.

        In training, dropout layers draw their mask for step ``self.step``; then ``self.step`` is
        incremented (the trainer may set it to the global step before each call instead).
        ``backward`` then differentiates this forward, in its mode (see ``backward``).
        """
        self._last_forward = None
        x = np.asarray(x)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model input must have shape (batch, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        if x.shape[0] < 1:
            raise ValueError("model input is an empty batch")
        if x.dtype.kind not in "fiub":
            raise TypeError(f"model input must be a real-valued array, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if training:
            for layer in self._stepped:
                layer.step = int(self.step)
        for block in self.blocks:
            x = block.forward(x, training)
        if training:
            self.step = int(self.step) + 1
        self._last_forward = (x.shape, x.dtype, bool(training))
        return x.copy()

    def backward(self, dlogits: np.ndarray, input_grad: bool = True) -> Optional[np.ndarray]:
        """Gradient of the loss w.r.t. the logits -> dL/dx (NHWC), a fresh array.

        Overwrites every parameter's ``.grad``. With ``input_grad=False`` the
        first layer skips its input gradient (the trainer does not need it)
        and None is returned.

        Differentiates the last ``forward``: ``dlogits`` must have its output's shape (ValueError
        otherwise; RuntimeError when there was no forward). After ``forward(training=False)`` it is
        the gradient of the evaluation-mode network, as PyTorch's after ``model.eval()``: batch
        norm through its running statistics, dropout the identity.
        """
        if self._last_forward is None:
            raise RuntimeError("backward() needs a forward() first")
        shape = self._last_forward[0]
        dy = np.asarray(dlogits)
        if dy.shape != shape:
            raise ValueError(f"dlogits must have the shape of the last forward's output {shape}, got {dy.shape}")
        if dy.dtype.kind not in "fiub":
            raise TypeError(f"dlogits must be a real-valued array, got dtype {dy.dtype}")
        dy = np.ascontiguousarray(dy, dtype=self.dtype)
        for i in range(len(self.blocks) - 1, -1, -1):
            dy = self.blocks[i].backward(dy, need_input_grad=input_grad or i > 0)
        return dy.copy() if input_grad else None

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for a large array, in evaluation mode, in batches."""
        out = []
        for start in range(0, len(x), batch_size):
            out.append(self.forward(x[start:start + batch_size], training=False))
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), self.dtype)

    # -- parameters and state ---------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.layers[-1].out_shape[0]

    def named_modules(self) -> Iterator[Tuple[str, Layer]]:
        """(prefix, layer) for every layer, nested ones included: ("layers.0", conv), ..."""
        for i, layer in enumerate(self.layers):
            yield from layer.named_modules(f"layers.{i}")

    def named_parameters(self) -> Iterator[Tuple[str, Parameter]]:
        for i, layer in enumerate(self.layers):
            yield from layer.named_parameters(f"layers.{i}")

    def parameters(self) -> List[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> Iterator[Tuple[str, np.ndarray]]:
        for i, layer in enumerate(self.layers):
            yield from layer.named_buffers(f"layers.{i}")

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters())

    def state_dict(self) -> Dict[str, np.ndarray]:
        """{key: ndarray}: copies of every parameter and buffer."""
        state = {k: p.data.copy() for k, p in self.named_parameters()}
        state.update({k: b.copy() for k, b in self.named_buffers()})
        return state

    def _state_arrays(self):
        arrays = {k: p.data for k, p in self.named_parameters()}
        arrays.update(dict(self.named_buffers()))
        return arrays

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy arrays into the model in place. Every key must match, with its shape.

        ``state``: a mapping of str -> ndarray (a dict, or what np.load gives for an .npz).
        Raises TypeError when it is not one, CheckpointError naming the key for a missing,
        unknown, misshapen, non-float or non-finite (NaN/Inf) entry. Checks everything
        before copying anything: on error the model is unchanged.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of str -> ndarray, got {type(state).__name__}")
        keys = list(state.keys())
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"state must be a mapping of str -> ndarray; it has the key {k!r} "
                                f"({type(k).__name__})")
        own = self._state_arrays()
        values = {}
        for key, target in own.items():
            if key not in state:
                raise CheckpointError(f"state is missing key {key!r} (expected shape {target.shape})")
            try:
                value = np.asarray(state[key])
            except Exception as e:  # e.g. a ragged list
                raise CheckpointError(f"{key}: not an array ({e})") from None
            if value.shape != target.shape:
                raise CheckpointError(f"{key}: shape {value.shape} in the state, {target.shape} in the model")
            if value.dtype.kind != "f":
                raise CheckpointError(f"{key}: expected a float array, got dtype {value.dtype}")
            if not np.isfinite(value).all():
                raise CheckpointError(f"{key} holds NaN or Inf")
            values[key] = value
        extra = [k for k in keys if k.startswith("layers.") and k not in own]
        if extra:
            raise CheckpointError(f"state has key {extra[0]!r}, which this model does not have")
        for key, target in own.items():
            target[...] = values[key]

    def __repr__(self):
        lines = [f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers)]
        return "Sequential(\n" + "\n".join(lines) + "\n)"


def build_model(model_cfg, seed: Optional[int] = 0, fuse: bool = True) -> Sequential:
    """A Sequential from a ``model`` config section, initialized from ``seed``.

    A plain dict is validated (and given defaults) first, as in a config file.
    """
    from . import config

    if not isinstance(model_cfg, config.Section):
        model_cfg = config.validate_section("model", model_cfg)
    plan = plan_shapes(model_cfg)
    dtype = np.dtype(_spec_get(model_cfg, "dtype", "float32"))
    rng = np.random.default_rng(seed)
    layers = []
    for i, (layer, in_shape, _) in enumerate(plan):
        layer.init = _spec_get(model_cfg, "init", "he_uniform")
        layer.fuse = fuse  # containers (residual) plan their branches' fused blocks, or not
        if getattr(layer, "uses_step", False):  # dropout: mask keyed by (seed, layer index, step)
            layer.seed, layer.index = (0 if seed is None else int(seed)), i
        layer.build(in_shape, rng, dtype)
        layers.append(layer)
    # Dropout nested in a container (a residual body): the model seed and an index unique in the model,
    # after the top-level positions: len(layers), len(layers) + 1, ... in named_modules() order.
    nested = [m for layer in layers for _, m in layer.named_modules()
              if m is not layer and getattr(m, "uses_step", False)]
    for n, m in enumerate(nested):
        m.seed, m.index = (0 if seed is None else int(seed)), len(layers) + n
    return Sequential(layers, _spec_get(model_cfg, "input_shape", (28, 28, 1)), dtype, fuse=fuse)
