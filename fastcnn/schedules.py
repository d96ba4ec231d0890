"""Learning-rate schedules and early stopping.

Step-driven schedules are pure functions of the (fractional) epoch, so a
resumed run recomputes the same learning rate for every step. The trainer sets
``opt.lr = schedule.lr(epoch + batch / batches_per_epoch)`` before each step:

- ``none``: the base rate;
- ``step`` (step_size, gamma): base * gamma ** (epoch // step_size), as torch's StepLR stepped per epoch;
- ``multistep`` (milestones, gamma): base * gamma ** (milestones passed), as MultiStepLR;
- ``cosine`` (warmup_epochs, min_lr): linear warm-up from 0 to base over warmup_epochs, then
  min_lr + (base - min_lr) * (1 + cos(pi * progress)) / 2 over the remaining epochs, per step;
- ``reduce_on_plateau`` (monitor, factor, patience, threshold, min_lr): as ReduceLROnPlateau
  (relative threshold), fed the validation metrics at each epoch's end.

Stateful pieces (plateau, early stopping) round-trip through ``state_dict()``,
which the trainer stores in the checkpoint's meta.

Each schedule class declares its ``name`` (``train.schedule.name``) and its
``options`` (a schema, fastcnn/schema.py), read by config validation, ``--set``
overrides, the constructor and the README check in the tests; ``SCHEDULES`` maps
every name to its class and ``build_schedule`` reads it. ``EarlyStopping``
declares the options of ``train.early_stopping`` the same way.
"""
import bisect
import math
from typing import Any, Dict, Type

from .errors import ConfigError
from .schema import REQUIRED, Schema, choice, integer, number, resolve_options


def saved_number(state, key, minimum=None, none_ok=False):
    """``state[key]``, a finite number (at least ``minimum``; or None when ``none_ok``) restored from a
    checkpoint's meta; ValueError naming the key otherwise (a damaged or edited file)."""
    value = state[key]
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (minimum is not None and value < minimum):
        raise ValueError(f"{key!r} must be a finite number{'' if minimum is None else f' >= {minimum}'}, "
                         f"got {value!r}")
    return value


def saved_count(state, key):
    """``state[key]``, a count (0 <= n < 2**31) restored from a checkpoint's meta; ValueError otherwise."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 31:
        raise ValueError(f"{key!r} must be a count (an integer >= 0), got {value!r}")
    return value

MONITORS = ("val_loss", "val_accuracy")


def milestones_list(value, path):
    """A non-empty, strictly increasing list of epochs (multistep's milestones)."""
    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"expected a non-empty list of epochs, e.g. [30, 60], got {value!r}")
    epochs = [integer(1)(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if epochs != sorted(set(epochs)):
        raise ConfigError(path, f"must be strictly increasing, got {epochs}")
    return epochs


class Schedule:
    """``none``: the base rate. The base of the other schedules."""

    name: str = "none"       # train.schedule.name
    options: Schema = {}     # train.schedule options: name -> (checker, default)

    def __init__(self, base_lr, total_epochs, *args, **kwargs):
        self.base_lr = float(base_lr)
        self.total_epochs = total_epochs
        # The declared options, with the config file's checks and defaults (ValueError when wrong).
        self.config: Dict[str, Any] = resolve_options(type(self).options, args, kwargs, type(self).__name__)

    def lr(self, epoch):
        """The learning rate at fractional epoch ``epoch`` (0 = start of training)."""
        return self.base_lr

    def epoch_end(self, metrics):
        """Called with the epoch's validation metrics ({'val_loss': .., 'val_accuracy': ..})."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class StepSchedule(Schedule):
    name = "step"
    options = {
        "step_size": (integer(1), REQUIRED),
        "gamma": (number(0.0, min_exclusive=True), 0.1),
    }

    def __init__(self, base_lr, total_epochs, *args, **kwargs):
        super().__init__(base_lr, total_epochs, *args, **kwargs)
        self.step_size, self.gamma = self.config["step_size"], self.config["gamma"]

    def lr(self, epoch):
        return self.base_lr * self.gamma ** (int(epoch) // self.step_size)


class MultiStepSchedule(Schedule):
    name = "multistep"
    options = {
        "milestones": (milestones_list, REQUIRED),
        "gamma": (number(0.0, min_exclusive=True), 0.1),
    }

    def __init__(self, base_lr, total_epochs, *args, **kwargs):
        super().__init__(base_lr, total_epochs, *args, **kwargs)
        self.milestones, self.gamma = sorted(self.config["milestones"]), self.config["gamma"]

    def lr(self, epoch):
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, int(epoch))


class CosineSchedule(Schedule):
    name = "cosine"
    options = {
        "warmup_epochs": (number(0.0), 0.0),
        "min_lr": (number(0.0), 0.0),
    }

    def __init__(self, base_lr, total_epochs, *args, **kwargs):
        super().__init__(base_lr, total_epochs, *args, **kwargs)
        self.warmup, self.min_lr = float(self.config["warmup_epochs"]), float(self.config["min_lr"])

    def lr(self, epoch):
        if epoch < self.warmup:
            return self.base_lr * epoch / self.warmup
        span = self.total_epochs - self.warmup
        progress = min(1.0, (epoch - self.warmup) / span) if span > 0 else 1.0
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class PlateauSchedule(Schedule):
    name = "reduce_on_plateau"
    options = {
        "monitor": (choice(*MONITORS), "val_loss"),
        "factor": (number(0.0, 1.0, min_exclusive=True, max_exclusive=True), 0.1),
        "patience": (integer(0), 10),
        "threshold": (number(0.0), 1e-4),
        "min_lr": (number(0.0), 0.0),
    }

    def __init__(self, base_lr, total_epochs, *args, **kwargs):
        super().__init__(base_lr, total_epochs, *args, **kwargs)
        c = self.config
        self.monitor, self.factor, self.patience = c["monitor"], c["factor"], c["patience"]
        self.threshold, self.min_lr = c["threshold"], c["min_lr"]
        self.current, self.best, self.bad_epochs = self.base_lr, None, 0

    def lr(self, epoch):
        return self.current

    def _improved(self, value):
        if self.best is None:
            return True
        if self.monitor == "val_loss":
            return value < self.best * (1 - self.threshold)
        return value > self.best * (1 + self.threshold)

    def epoch_end(self, metrics):
        value = metrics[self.monitor]
        if self._improved(value):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.current = max(self.current * self.factor, self.min_lr)
            self.bad_epochs = 0

    def state_dict(self):
        return {"current": self.current, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.current = saved_number(state, "current", minimum=0.0)
        self.best = saved_number(state, "best", none_ok=True)
        self.bad_epochs = saved_count(state, "bad_epochs")


# Every schedule by its train.schedule.name (the order of the "known: ..." list in errors).
SCHEDULES: Dict[str, Type[Schedule]] = {cls.name: cls for cls in (Schedule, StepSchedule, MultiStepSchedule,
                                                                   CosineSchedule, PlateauSchedule)}


def build_schedule(schedule_cfg, base_lr, total_epochs):
    """A schedule from a validated ``train.schedule`` section (missing options take their defaults)."""
    name = schedule_cfg["name"]
    cls = SCHEDULES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    options = {k: v for k, v in schedule_cfg.items() if k != "name"}
    return cls(base_lr, total_epochs, **options)


class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs."""

    # train.early_stopping's options (the section is null, i.e. off, by default).
    options: Schema = {
        "monitor": (choice(*MONITORS), "val_loss"),
        "patience": (integer(1), 5),
        "min_delta": (number(0.0), 0.0),
    }

    def __init__(self, *args, **kwargs):
        self.config: Dict[str, Any] = resolve_options(self.options, args, kwargs, type(self).__name__)
        self.monitor, self.patience, self.min_delta = (self.config[k] for k in ("monitor", "patience", "min_delta"))
        self.best, self.bad_epochs = None, 0

    def should_stop(self, metrics):
        """Record the epoch's metrics; True when training should stop now."""
        value = metrics[self.monitor]
        better = (self.best is None or
                  (value < self.best - self.min_delta if self.monitor == "val_loss"
                   else value > self.best + self.min_delta))
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self):
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.best, self.bad_epochs = saved_number(state, "best", none_ok=True), saved_count(state, "bad_epochs")
