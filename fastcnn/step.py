"""One training step, the public API: ``fastcnn.train_step(model, opt, x, y)``.

A loop of ``train_step`` over the batches of ``fastcnn.data.BatchLoader`` trains
exactly as ``fastcnn train`` does (same weights, bit for bit): the trainer's
epoch loop calls this function and adds only the learning-rate schedule,
augmentation, the NaN policy, metrics and checkpoints around it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["StepResult", "train_step", "all_finite", "first_nonfinite_grad", "describe_param"]


@dataclass(frozen=True)
class StepResult:
    """What one ``train_step`` did.

    ``loss``: the batch's mean loss (NaN/Inf when that was the fault); ``correct``: how many of the
    ``count`` samples the training-mode forward classified right (0 after a fault). ``fault``: None
    when the optimizer stepped, else why it did not (``"the loss is nan"``, ``"the gradient of
    layers.3.weight (weight of layer 3 (conv2d)) holds NaN or Inf"``); ``parameter`` is then the
    state-dict key of the first non-finite gradient (None for a non-finite loss).
    """

    loss: float
    correct: int
    count: int
    fault: str | None = None
    parameter: str | None = None

    @property
    def ok(self) -> bool:
        """True when the optimizer stepped (no NaN or Inf in the loss or a gradient)."""
        return self.fault is None


def train_step(model: Any, opt: Any, x: np.ndarray, y: np.ndarray, *,
               clip_grad_norm: float | None = None, label_smoothing: float = 0.0) -> StepResult:
    """Forward (training mode), softmax cross-entropy, backward, optional gradient clipping, optimizer step.

    ``x``: a batch (N, H, W, C); ``y``: its N integer labels. ``clip_grad_norm``: scale the
    gradients to this global L2 norm at most before the step (``train.clip_grad_norm``).
    ``label_smoothing``: the loss's (``train.label_smoothing``; see softmax_cross_entropy).

    The step is not taken when the loss or a gradient holds a NaN or Inf: the result's ``fault``
    says which (naming the parameter), the weights and the optimizer state are unchanged, the
    gradients are left as they are. The forward has already updated batch-norm running statistics
    by then; ``fastcnn train`` with ``train.on_nan: skip`` restores them, with ``stop`` it stops.

    The input gradient is not computed (``model.backward(..., input_grad=False)``). The caller
    sets ``opt.lr`` (a schedule) and ``model.step`` (dropout masks) beforehand if it wants to;
    left alone, ``model.step`` counts the training forwards, as the trainer's global step does.
    """
    from .losses import softmax_cross_entropy
    from .shard import shard_for

    # The part of the batch this process holds (Sequential.set_shard; the whole batch by default):
    # the loss, the count and the gradients are the whole batch's, on every process.
    shard = shard_for(getattr(model, "shard", None), len(y))
    logits = model.forward(x, training=True)
    loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing, shard)
    count = shard.total
    if not np.isfinite(loss):
        return StepResult(loss, 0, count, f"the loss is {loss}")
    model.backward(dlogits, input_grad=False)
    bad = first_nonfinite_grad(model)
    if bad is not None:
        return StepResult(loss, 0, count, f"the gradient of {bad} ({describe_param(model, bad)}) holds NaN or Inf",
                          bad)
    if clip_grad_norm is not None:
        from .optim import clip_grad_norm as clip

        clip(model.parameters(), clip_grad_norm)
    opt.step()
    return StepResult(loss, shard.sum_int(int((logits.argmax(axis=1) == y).sum())), count)


def all_finite(a: np.ndarray) -> bool:
    """True when no element of the float array ``a`` is NaN or Inf."""
    # A float64 sum is non-finite iff some element is (float32 values cannot overflow it), and it needs no
    # temporary array; Inf + -Inf makes a NaN, not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isfinite(np.sum(a, dtype=np.float64)))


def first_nonfinite_grad(model: Any) -> str | None:
    """The state-dict key of the first parameter whose gradient holds a NaN or Inf, else None."""
    for key, p in model.named_parameters():
        if not all_finite(p.grad):
            return key
    return None


def named_layers(model: Any):
    """(prefix, layer) for every layer, nested ones included (``model.named_modules()``), else
    ``("layers.<i>", layer)`` for the layers of a flat model."""
    if hasattr(model, "named_modules"):
        return list(model.named_modules())
    return [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]


def describe_param(model: Any, key: str) -> str:
    """``layers.3.weight`` -> ``weight of layer 3 (conv2d)``; nested keys too:
    ``layers.4.0.body.1.gamma`` -> ``gamma of layer 4.0.body.1 (batchnorm)``."""
    prefix, _, name = key.rpartition(".")
    where = prefix[len("layers."):] if prefix.startswith("layers.") else prefix
    for path, layer in named_layers(model):
        if path == prefix:
            kind = getattr(layer, "kind", None)
            if kind is not None:
                return f"{name} of layer {where} ({kind})"
            break
    return f"{name} of layer {where}"
