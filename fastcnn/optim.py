"""Optimizers with PyTorch's update rules: SGD (momentum, Nesterov, weight decay), Adam, AdamW.

An optimizer holds the Parameter objects it was given and updates ``p.data``
in place from ``p.grad`` on ``step()``. Its state round-trips through
``state_dict()`` / ``load_state_dict()`` as flat arrays (checkpoint keys
``optim.<name>``).
"""
import numpy as np

from .errors import CheckpointError
from .kernels import optim as kernels


class Optimizer:
    """Base: parameters, a learning rate the schedule may change, a step count."""

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.lr = float(lr)
        self.step_count = 0

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
        for slot, arrays in self._slots().items():
            for i, a in enumerate(arrays):
                a[...] = state[f"{i}.{slot}"]
        self.step_count = int(state["step"])
        self.lr = float(state["lr"])


class SGD(Optimizer):
    """torch.optim.SGD: d = g + wd*p; buf = momentum*buf + (1-dampening)*d; p -= lr*(d + momentum*buf | buf)."""

    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)
        self.momentum_buffers = [np.zeros_like(p.data) for p in self.params]

    def _slots(self):
        return {"momentum_buffer": self.momentum_buffers}

    def step(self):
        first = self.step_count == 0
        for p, buf in zip(self.params, self.momentum_buffers):
            t = p.data.dtype.type
            kernels.sgd_update(p.data.reshape(-1), p.grad.reshape(-1), buf.reshape(-1), t(self.lr),
                               t(self.momentum), t(self.dampening), t(self.weight_decay), self.nesterov, first)
        self.step_count += 1


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient, not AdamW)."""

    decoupled = False

    def __init__(self, params, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError("eps must be > 0 and weight_decay >= 0")
        self.beta1, self.beta2, self.eps, self.weight_decay = float(b1), float(b2), float(eps), float(weight_decay)
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
            kernels.adam_update(p.data.reshape(-1), p.grad.reshape(-1), m.reshape(-1), v.reshape(-1), t(self.lr),
                                t(self.beta1), t(self.beta2), t(self.eps), t(self.weight_decay), self.decoupled,
                                t(bc1), t(bc2_sqrt))


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay (p *= 1 - lr*wd), default weight_decay 0.01."""

    decoupled = True

    def __init__(self, params, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


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


def build_optimizer(opt_cfg, params):
    """An optimizer from a validated ``train.optimizer`` section."""
    options = {k: v for k, v in opt_cfg.items() if k != "name"}
    if opt_cfg["name"] in ("adam", "adamw"):
        options["betas"] = tuple(options.get("betas", (0.9, 0.999)))
        return (Adam if opt_cfg["name"] == "adam" else AdamW)(params, **options)
    if opt_cfg["name"] == "sgd":
        return SGD(params, **options)
    raise ValueError(f"unknown optimizer {opt_cfg['name']!r}")
