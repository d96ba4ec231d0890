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
"""
import bisect
import math


class Schedule:
    def __init__(self, base_lr, total_epochs):
        self.base_lr = float(base_lr)
        self.total_epochs = total_epochs

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
    def __init__(self, base_lr, total_epochs, step_size, gamma=0.1):
        super().__init__(base_lr, total_epochs)
        self.step_size, self.gamma = step_size, gamma

    def lr(self, epoch):
        return self.base_lr * self.gamma ** (int(epoch) // self.step_size)


class MultiStepSchedule(Schedule):
    def __init__(self, base_lr, total_epochs, milestones, gamma=0.1):
        super().__init__(base_lr, total_epochs)
        self.milestones, self.gamma = sorted(milestones), gamma

    def lr(self, epoch):
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, int(epoch))


class CosineSchedule(Schedule):
    def __init__(self, base_lr, total_epochs, warmup_epochs=0.0, min_lr=0.0):
        super().__init__(base_lr, total_epochs)
        self.warmup, self.min_lr = float(warmup_epochs), float(min_lr)

    def lr(self, epoch):
        if epoch < self.warmup:
            return self.base_lr * epoch / self.warmup
        span = self.total_epochs - self.warmup
        progress = min(1.0, (epoch - self.warmup) / span) if span > 0 else 1.0
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class PlateauSchedule(Schedule):
    def __init__(self, base_lr, total_epochs, monitor="val_loss", factor=0.1, patience=10, threshold=1e-4,
                 min_lr=0.0):
        super().__init__(base_lr, total_epochs)
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.threshold, self.min_lr = threshold, min_lr
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
        self.current, self.best, self.bad_epochs = state["current"], state["best"], state["bad_epochs"]


SCHEDULES = {"none": Schedule, "step": StepSchedule, "multistep": MultiStepSchedule, "cosine": CosineSchedule,
             "reduce_on_plateau": PlateauSchedule}


def build_schedule(schedule_cfg, base_lr, total_epochs):
    """A schedule from a validated ``train.schedule`` section."""
    options = {k: v for k, v in schedule_cfg.items() if k != "name"}
    return SCHEDULES[schedule_cfg["name"]](base_lr, total_epochs, **options)


class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs."""

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
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
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
