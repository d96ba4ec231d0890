"""Optimizers with PyTorch's update rules: SGD (momentum, Nesterov, weight decay), Adam, AdamW.

An optimizer class is the single home of everything about it:

* ``name``: its ``train.optimizer.name``; ``options``: its options as a schema
  (``name -> (checker, default)``, fastcnn/schema.py), read by config
  validation (``train.optimizer``), ``--set`` overrides, the constructor
  (positional in declaration order or by name) and the README check in the tests;
* ``torch_optimizer(torch, params, options)``: the torch.optim optimizer with the
  same update rule and options: the one mapping from a fastcnn optimizer to a
  PyTorch one (the benchmarks, the scripts and the tests use it);
* ``step()``: the update, in a Numba kernel imported on first use (validating a
  config imports this module, and no Numba).

``OPTIMIZERS`` maps every name to its class; ``build_optimizer`` reads it.

An optimizer holds the Parameter objects it was given and updates ``p.data``
in place from ``p.grad`` on ``step()``. Its state round-trips through
``state_dict()`` / ``load_state_dict()`` as flat arrays (checkpoint keys
``optim.<name>``).
"""
import math
from typing import Any, Dict, Mapping, Optional, Type

import numpy as np

from .errors import CheckpointError, ConfigError
from .layers.base import kernel_module
from .schema import Schema, boolean, number, resolve_options
from .step import all_finite

kernels = kernel_module("optim")
# _OVERFLOW: hyperparameters are cast to the weights' dtype without NumPy's overflow warning. A learning
# rate beyond float32's range becomes Inf, the update makes the weights Inf, and the trainer stops with
# one line saying so (Trainer._require_finite_weights).


def betas_pair(value, path):
    """Adam's [beta1, beta2], each in [0, 1) (a tuple is accepted from Python)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(path, f"expected a pair [beta1, beta2], got {value!r}")
    return [number(0.0, 1.0, max_exclusive=True)(v, f"{path}[{i}]") for i, v in enumerate(value)]


class Optimizer:
    """Base: parameters, a learning rate the schedule may change, a step count."""

    name: str = ""              # train.optimizer.name; "" for an abstract base
    options: Schema = {}        # train.optimizer options: name -> (checker, default)
    torch_class: str = ""       # the torch.optim class with the same update rule and option names

    def __init__(self, params, *args, **kwargs):
        # The declared options, with the config file's checks and defaults (ValueError when wrong).
        self.config: Dict[str, Any] = self.resolve(args, kwargs)
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = float(self.config["lr"])
        self.step_count = 0

    @classmethod
    def resolve(cls, args=(), kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Options (positional in declaration order, or by name; a ``name`` key is ignored) -> all
        declared options with their defaults; ValueError (TypeError) as for the constructor."""
        kwargs = {k: v for k, v in (kwargs or {}).items() if k != "name"}
        return resolve_options(cls.options, tuple(args), kwargs, cls.__name__)

    @classmethod
    def torch_optimizer(cls, torch, params, options: Optional[Mapping[str, Any]] = None):
        """The equivalent ``torch.optim`` optimizer over ``params`` for these options (a validated
        ``train.optimizer`` section, or any subset of the declared options: the rest default)."""
        if not cls.torch_class:
            raise NotImplementedError(f"no PyTorch twin for {cls.__name__}")
        resolved = cls.resolve((), options)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}
        return getattr(torch.optim, cls.torch_class)(params, **kwargs)

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "lr")
        return f"{type(self).__name__}(lr={self.lr!r}{', ' if shown else ''}{shown})"

    def zero_grad(self):
        for p in self.params:
            p.grad.fill(0)

    def _slots(self):
        """{slot name: [array per parameter]}: the optimizer's per-parameter state."""
        return {}

    def state_dict(self):
        state = {"step": np.array(self.step_count, dtype=np.int64), "lr": np.array(self.lr, dtype=np.float64)}
        for slot, arrays in self._slots().items():
            for i, a in enumerate(arrays):
                state[f"{i}.{slot}"] = a.copy()
        return state

    def load_state_dict(self, state):
        """Restore from ``state_dict()`` output; CheckpointError naming the first entry that does not fit
        (another optimizer in ``train.optimizer``, another model, or a damaged file)."""
        for key, kind in (("step", "iu"), ("lr", "iuf")):
            value = np.asarray(state[key]) if key in state else None
            if value is None or value.shape != () or value.dtype.kind not in kind:
                raise CheckpointError(f"optimizer state 'optim.{key}' is missing or not a number "
                                      f"(train.optimizer differs from the checkpoint's?)")
        for slot, arrays in self._slots().items():
            for i, a in enumerate(arrays):
                key = f"{i}.{slot}"
                if key not in state:
                    raise CheckpointError(f"optimizer state is missing 'optim.{key}' (train.optimizer is "
                                          f"{type(self).__name__}; the checkpoint's optimizer differs?)")
                value = np.asarray(state[key])
                if value.shape != a.shape or value.dtype.kind != "f":
                    raise CheckpointError(f"optim.{key}: {value.dtype} {value.shape} in the checkpoint, "
                                          f"{a.dtype} {a.shape} in the model")
                if not all_finite(value):
                    raise CheckpointError(f"optim.{key} holds NaN or Inf (a damaged checkpoint)")
        step, lr = int(state["step"]), float(state["lr"])  # integer and number kinds checked above
        if not 0 <= step < 2 ** 53:
            raise CheckpointError(f"optimizer state 'optim.step' is {step}, not a step count (a damaged checkpoint)")
        if not (math.isfinite(lr) and lr >= 0):
            raise CheckpointError(f"optimizer state 'optim.lr' is {lr}, not a learning rate (a damaged checkpoint)")
        for slot, arrays in self._slots().items():
            for i, a in enumerate(arrays):
                a[...] = state[f"{i}.{slot}"]
        self.step_count, self.lr = step, lr


class SGD(Optimizer):
    """torch.optim.SGD: d = g + wd*p; buf = momentum*buf + (1-dampening)*d; p -= lr*(d + momentum*buf | buf)."""

    name = "sgd"
    options = {
        "lr": (number(0.0, min_exclusive=True), 0.01),
        "momentum": (number(0.0), 0.0),
        "dampening": (number(0.0), 0.0),
        "nesterov": (boolean, False),
        "weight_decay": (number(0.0), 0.0),
    }
    torch_class = "SGD"

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        c = self.config
        if c["nesterov"] and (c["momentum"] <= 0 or c["dampening"] != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening 0")
        self.momentum, self.dampening = float(c["momentum"]), float(c["dampening"])
        self.nesterov, self.weight_decay = bool(c["nesterov"]), float(c["weight_decay"])
        self.momentum_buffers = [np.zeros_like(p.data) for p in self.params]

    def _slots(self):
        return {"momentum_buffer": self.momentum_buffers}

    def step(self):
        first = self.step_count == 0
        for p, buf in zip(self.params, self.momentum_buffers):
            t = p.data.dtype.type
            with np.errstate(over="ignore"):  # see _OVERFLOW
                lr, momentum, dampening, wd = t(self.lr), t(self.momentum), t(self.dampening), t(self.weight_decay)
            kernels.sgd_update(p.data.reshape(-1), p.grad.reshape(-1), buf.reshape(-1), lr, momentum, dampening, wd,
                               self.nesterov, first)
        self.step_count += 1


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient, not AdamW)."""

    name = "adam"
    options = {
        "lr": (number(0.0, min_exclusive=True), 0.001),
        "betas": (betas_pair, [0.9, 0.999]),
        "eps": (number(0.0, min_exclusive=True), 1e-8),
        "weight_decay": (number(0.0), 0.0),
    }
    torch_class = "Adam"
    decoupled = False

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        c = self.config
        (b1, b2), self.eps, self.weight_decay = c["betas"], float(c["eps"]), float(c["weight_decay"])
        self.beta1, self.beta2 = float(b1), float(b2)
        self.exp_avg = [np.zeros_like(p.data) for p in self.params]
        self.exp_avg_sq = [np.zeros_like(p.data) for p in self.params]

    def _slots(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def step(self):
        self.step_count += 1
        t_step = self.step_count
        bc1 = 1.0 - self.beta1 ** t_step
        bc2_sqrt = (1.0 - self.beta2 ** t_step) ** 0.5
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            t = p.data.dtype.type
            with np.errstate(over="ignore"):  # see _OVERFLOW
                hyper = [t(h) for h in (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)]
            kernels.adam_update(p.data.reshape(-1), p.grad.reshape(-1), m.reshape(-1), v.reshape(-1), *hyper,
                                self.decoupled, t(bc1), t(bc2_sqrt))


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay (p *= 1 - lr*wd), default weight_decay 0.01."""

    name = "adamw"
    options = {**Adam.options, "weight_decay": (number(0.0), 0.01)}
    torch_class = "AdamW"
    decoupled = True


# Every optimizer by its train.optimizer.name (the order of the "known: ..." list in errors).
OPTIMIZERS: Dict[str, Type[Optimizer]] = {cls.name: cls for cls in (Adam, AdamW, SGD)}


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_).

    Returns the norm before clipping. As PyTorch: coefficient max_norm / (norm + 1e-6), applied when < 1.
    """
    total = sum(kernels.sum_of_squares(p.grad.reshape(-1)) for p in params) ** 0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            kernels.scale_inplace(p.grad.reshape(-1), p.grad.dtype.type(coef))
    return total


def optimizer_class(name) -> Type[Optimizer]:
    """The class registered as ``name`` (ValueError naming the known ones otherwise)."""
    cls = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return cls


def build_optimizer(opt_cfg, params):
    """An optimizer from a validated ``train.optimizer`` section (missing options take their defaults)."""
    options = {k: v for k, v in opt_cfg.items() if k != "name"}
    return optimizer_class(opt_cfg["name"])(params, **options)


def torch_optimizer(torch, params, opt_cfg):
    """The torch.optim twin of a ``train.optimizer`` section over ``params`` (see Optimizer.torch_optimizer)."""
    return optimizer_class(opt_cfg["name"]).torch_optimizer(torch, params, opt_cfg)
