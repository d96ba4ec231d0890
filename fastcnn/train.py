"""The training loop: data + model + optimizer -> epochs, metrics, checkpoints.

One step is ``fastcnn.train_step`` (fastcnn/step.py): forward, loss, backward,
NaN/Inf check, optional clipping, optimizer step; a script calling it over the
batches of ``fastcnn.data.BatchLoader`` trains as ``fastcnn train`` does.
Around it the trainer adds the learning-rate schedule, augmentation, the NaN
policy (``train.on_nan``), metrics.jsonl and checkpoints (last.npz, best.npz).

The output folder is the run's alone (fastcnn/rundir.py: a lock, --overwrite by
folder swap). An epoch ends with best.npz (when the validation accuracy
improved), then last.npz, then metrics.jsonl, each written atomically, so a
kill at any instant leaves files that agree: metrics.jsonl is the history of
last.npz or one epoch short of it, best.npz is the best epoch of last.npz's
history or of the epoch being finished (which a resume recomputes bit for bit).
A resume rewrites metrics.jsonl from the checkpoint's history.
"""
from __future__ import annotations

import os
import signal
import stat
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from . import __version__, faults
from .config import ConfigError, to_dict, to_yaml
from .errors import Terminated, UserError
from .evaluate import evaluate
from .rundir import RUN_FILES, OutputError, RunFolder, RunLock, describe_oserror
from .runtime import set_threads, warm_up
from .safeio import dumps_json, file_kind
from .step import StepResult, all_finite, describe_param, named_layers, train_step
from .stopping import SignalFlag


class Interrupted(Exception):
    """Training stopped by a signal after saving; ``code`` is the exit status (130 or 143)."""

    def __init__(self, signum, checkpoint):
        self.signum = signum
        self.code = 128 + signum
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by signal {signum}")


class _StopFlag(SignalFlag):
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves, then stops.

    A second signal raises KeyboardInterrupt at once (checkpoints are written
    atomically, so that never leaves a broken file).
    """

    def __init__(self, ignore_after: bool = False):
        super().__init__()
        # The CLI exits right after a stop: further signals are then ignored rather than restored to
        # Python's default (which would raise KeyboardInterrupt while it prints the resume command).
        self.ignore_after = ignore_after

    def handler_after(self, sig, old):
        return signal.SIG_IGN if self.ignore_after and self.signum is not None else old

def load_data(cfg, progress=True):
    """The dataset of the config, checked against the model: (x_train, y_train, x_val, y_val, dataset)."""
    from .data import load_dataset, split_validation

    d = cfg.data
    ds = load_dataset(d.dataset, d.root, input_shape=tuple(cfg.model.input_shape),
                      num_classes=cfg.model.num_classes, num_train=d.num_train, num_test=d.num_test,
                      seed=cfg.seed, progress=progress, path=d.path, resize=d.resize, augment=dict(d.augment))
    if tuple(ds.input_shape) != tuple(cfg.model.input_shape):
        raise ConfigError("model.input_shape", f"is {list(cfg.model.input_shape)} but dataset {d.dataset!r} has "
                                               f"images of shape {list(ds.input_shape)}")
    if ds.num_classes != cfg.model.num_classes:
        raise ConfigError("model.num_classes", f"is {cfg.model.num_classes} but dataset {d.dataset!r} has "
                                               f"{ds.num_classes} classes")
    if d.validation == "test":
        return ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds
    try:
        x_tr, y_tr, x_val, y_val = split_validation(ds.x_train, ds.y_train, d.validation, cfg.seed)
    except ValueError as e:
        raise ConfigError("data.validation", str(e)) from None
    return x_tr, y_tr, x_val, y_val, ds


def _silent(*args, **kwargs) -> None:
    """The log of processes other than rank 0."""


class PeerFailed(UserError):
    """Another process of the run failed (it, or rank 0, reports why): exit quietly with its code."""

    def __init__(self, code: int):
        super().__init__(f"another process failed (exit code {code})")
        self.exit_code = code
        self.quiet = True


def exit_code_of(error: BaseException | None) -> int:
    """The exit status an error gives fastcnn train (0: no error)."""
    if error is None:
        return 0
    if isinstance(error, UserError):
        return int(getattr(error, "exit_code", 2))
    if isinstance(error, Terminated):
        return 143
    if isinstance(error, (KeyboardInterrupt, Interrupted)):
        return int(getattr(error, "code", 130))
    return 1


def agreed_failure(error: BaseException | None, codes: np.ndarray, rank: int) -> BaseException:
    """What a process raises when a step failed somewhere (``codes``: every rank's exit code, 0 where
    it succeeded): its own error, quiet when rank 0 failed too (rank 0 reports it) and naming its
    rank when rank 0 did not; else PeerFailed with the highest code."""
    if error is None:
        return PeerFailed(int(codes.max()))
    if rank > 0 and codes[0]:
        error.quiet = True  # rank 0 failed too: it reports
    elif rank > 0 and isinstance(error, UserError):
        named = UserError(f"process {rank}: {error}")
        named.exit_code = int(getattr(error, "exit_code", 2))
        return named
    return error


def run_together(group: Any, fn: Callable[[], Any], on: str = "all") -> Any:
    """fn() on every process of ``group`` ("all"), on rank 0 alone ("root"), or on rank 0 and then on
    the others ("root first": rank 0 downloads or compiles what the others then find); its result.

    When fn fails on any process, every process raises (none is left waiting in a collective): the
    failing ones their own error, the others a quiet PeerFailed. The error is marked ``agreed`` and
    carries ``job_code``, the highest exit code of all (mpiexec ORs the processes' codes, so all exit
    with that one); fastcnn/cli.py reports it once: rank 0's error, else the failing process's,
    naming its rank.
    """
    result = None
    steps = {"all": ("all",), "root": ("root",), "root first": ("root", "others")}[on]
    for who in steps:
        error = None
        if who == "all" or (who == "root") == group.is_root:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - every process must hear of it
                error = e
        group.idle_barrier()  # rank 0 may take long (compiling): the others wait without spinning
        codes = group.allgather_rows(np.array([exit_code_of(error)], np.int64), [1] * group.size)
        if codes.any():
            failure = agreed_failure(error, codes, group.rank)
            failure.agreed = True  # every process raises now: nothing to abort (fastcnn/cli.py)
            failure.job_code = int(codes.max())
            raise failure
    return result


class TrainingDiverged(Exception):
    """A NaN or Inf in the loss or a gradient with ``train.on_nan: stop``, or in the weights after an update
    (exit code 1, one line)."""


CHECKPOINT_FILES = ("last.npz", "best.npz")
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _checked_meta(meta, path):
    """The resume fields of a checkpoint's meta, type-checked: CheckpointError naming the bad one."""
    from .errors import CheckpointError

    def fail(key, what):
        raise CheckpointError(f"--resume {path}: meta {key!r} {what}; not a checkpoint this trainer wrote")

    out = {}
    for key in ("epoch", "batch", "skipped_steps"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 53:
            fail(key, f"must be an integer >= 0, got {value!r}")
        out[key] = value
    best = meta.get("best_accuracy")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        fail("best_accuracy", f"must be a number or null, got {best!r}")
    out["best_accuracy"] = best
    history = meta.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        fail("history", "must be a list of epoch records")
    out["history"] = list(history)
    running = meta.get("running")
    if running is not None:
        fields = ("loss", "correct", "seen", "seconds")
        if not isinstance(running, dict) or not all(
                isinstance(running.get(k), (int, float)) and not isinstance(running.get(k), bool) for k in fields):
            fail("running", f"must be null or a mapping of {', '.join(fields)} to numbers")
    out["running"] = running
    for key in ("schedule", "early_stopping"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            fail(key, "must be a mapping")
    run_id = meta.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not run_id.isalnum() or len(run_id) > 64):
        fail("run_id", "must be a short alphanumeric string")
    out["run_id"] = run_id
    return out


class NanPolicy:
    """``train.on_nan`` for a step whose loss or gradient holds a NaN or Inf.

    ``stop``: TrainingDiverged, whose message says which checkpoints are kept (``kept()``).
    ``skip``: the step is dropped and counted, and the batch-norm running statistics its forward
    updated are restored (``before_step`` saves them).
    """

    def __init__(self, model: Any, on_nan: str, skipped: int = 0, kept: Callable[[], str] | None = None):
        self.skip = on_nan == "skip"
        self.skipped = skipped
        self.kept = kept or (lambda: "the last good checkpoint is kept")
        self._buffers = [b for _, b in model.named_buffers()]
        self._saved = [np.empty_like(b) for b in self._buffers] if self.skip else []

    def before_step(self) -> None:
        for src, dst in zip(self._buffers, self._saved):
            np.copyto(dst, src)

    def on_fault(self, fault: str, where: str) -> str:
        """Raise TrainingDiverged (stop) or undo the step's side effects (skip): the line to print."""
        if not self.skip:
            raise TrainingDiverged(f"training diverged at {where}: {fault}; {self.kept()} "
                                   f"(train.on_nan: skip skips such steps)")
        for src, dst in zip(self._saved, self._buffers):
            np.copyto(dst, src)
        self.skipped += 1
        return f"skipped {where}: {fault} ({self.skipped} skipped so far)"


def new_running() -> dict:
    """An epoch's running sums (saved as the checkpoint's ``running`` mid-epoch)."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def add_step(running: dict, result: StepResult) -> None:
    """Count a taken step in the epoch's running sums."""
    running["loss"] += float(result.loss) * result.count
    running["correct"] += result.correct
    running["seen"] += result.count


def epoch_record(epoch: int, step: int, running: dict, val: dict, lr: float, skipped_steps: int) -> dict:
    """The metrics.jsonl record of an epoch (``epoch`` counted from 0 here, from 1 in the record)."""
    return {
        "epoch": epoch + 1, "step": step,
        "train_loss": running["loss"] / max(running["seen"], 1),
        "train_accuracy": running["correct"] / max(running["seen"], 1),
        "val_loss": val["loss"], "val_accuracy": val["accuracy"],
        "images_per_sec": running["seen"] / max(running["seconds"], 1e-9),
        "epoch_seconds": running["seconds"], "lr": lr, "skipped_steps": skipped_steps,
    }


def metrics_text(history: list) -> str:
    """metrics.jsonl's content: one strict-JSON line per epoch record (NaN/Inf as null)."""
    return "".join(dumps_json(record) + "\n" for record in history)


def best_epoch(history: list) -> int | None:
    """The epoch (counted from 1) best.npz holds for this history: the first with the highest val_accuracy."""
    best, epoch = None, None
    for record in history:
        value = record.get("val_accuracy") if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and (
                best is None or value > best):
            best, epoch = value, record.get("epoch")
    return epoch


class Trainer:
    """Runs ``cfg.train.epochs`` epochs; writes metrics.jsonl, last.npz, best.npz and config.yaml."""

    def __init__(self, cfg: Any, resume: str | None = None, overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], Any] = print, started: float | None = None,
                 ignore_signals_after_stop: bool = False, group: Any = None):
        self.cfg = cfg
        # The processes training this model (fastcnn/distributed.py; None: this one alone). Rank 0
        # alone writes output.dir, logs and shows progress; every process trains its share of each
        # batch (fastcnn/shard.py) and the results are the same bit for bit as one process's.
        self.group = group
        self.distributed = group is not None and group.size > 1
        self.root = not self.distributed or group.is_root
        if not self.root:
            progress = False
            log = _silent
        self.ignore_signals_after_stop = ignore_signals_after_stop
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.log = log
        self.started = started if started is not None else time.perf_counter()
        self.folder: RunFolder | None = None
        self.run_id = None
        # What each checkpoint in output.dir holds, in words, once this run wrote (or resumed from) it.
        self.on_disk: dict = {"last.npz": None, "best.npz": None}
        self._stop = None

    # -- checkpoints -----------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        return self.nan_policy.skipped

    def checkpoint_meta(self, epoch: int, batch_in_epoch: int, running: dict | None) -> dict:
        """The ``meta`` of a checkpoint saved at (epoch, batch in epoch): everything a resume needs."""
        return {
            "config": to_dict(self.cfg), "epoch": epoch, "batch": batch_in_epoch, "step": self.opt.step_count,
            "running": running, "best_accuracy": self.best_accuracy, "history": self.history,
            "skipped_steps": self.skipped_steps, "threads": self.threads, "fastcnn_version": __version__,
            "processes": self.group.size if self.distributed else 1,
            "schedule": self.schedule.state_dict(), "stopped_early": self.stopped_early,
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping else None,
            # The batch order is a pure function of (seed, epoch) and nothing else draws random numbers
            # during training, so (epoch, batch) above is the whole RNG state.
            "rng": {"loader_seed": self.cfg.seed},
            # Which run wrote it: last.npz, best.npz and config.yaml of one folder always name the same run.
            "run_id": self.run_id,
            # What `fastcnn predict` needs to preprocess new images as the training data was.
            "class_names": list(self.dataset.class_names),
            "data_stats": ({"mean": [float(v) for v in np.ravel(self.dataset.mean)],
                            "std": [float(v) for v in np.ravel(self.dataset.std)]}
                           if getattr(self.dataset, "mean", None) is not None else None),
        }

    def _require_finite_weights(self, when: str) -> None:
        """TrainingDiverged when the updates left a weight NaN or Inf: a learning rate, momentum or weight decay
        so large that the update overflowed while the step's loss and gradients were still finite. Such weights
        are never validated, recorded or saved (on every process: they hold the same weights)."""
        for key, p in self.model.named_parameters():
            if not all_finite(p.data):
                raise TrainingDiverged(f"training diverged {when}: the updates made {key} "
                                       f"({describe_param(self.model, key)}) NaN or Inf (train.optimizer.lr, "
                                       f"momentum or weight_decay too large?); {self._kept()}")

    def _save(self, name: str, epoch: int, batch_in_epoch: int, running: dict | None) -> str:
        """Write checkpoint ``name`` atomically; OutputError (one line, what is intact) when it fails.
        TrainingDiverged, and nothing written, when a weight is NaN or Inf."""
        from .checkpoint import save_checkpoint

        self._require_finite_weights(f"before saving {name} (epoch {epoch}, batch {batch_in_epoch})")
        if not self.root:  # rank 0 writes
            return os.path.join(self.out_dir, name)
        path = self.folder.file(name)
        try:
            save_checkpoint(path, self.model.state_dict(), self.opt.state_dict(),
                            self.checkpoint_meta(epoch, batch_in_epoch, running))
        except OSError as e:
            raise self._output_error(path, e) from None
        self.on_disk[name] = (f"epoch {epoch}, batch {batch_in_epoch}" if batch_in_epoch
                              else f"end of epoch {epoch}" if name == "last.npz" else f"epoch {epoch}")
        return self.folder.final(name)

    def _write_text(self, name: str, text: str) -> None:
        """Write a text file of the run atomically; OutputError when it fails."""
        from .atomicio import atomic_write_bytes

        if not self.root:  # rank 0 writes
            return
        path = self.folder.file(name)
        try:
            atomic_write_bytes(path, text.encode("utf-8"))
        except OSError as e:
            raise self._output_error(path, e) from None

    def _write_metrics(self) -> None:
        """metrics.jsonl from the history (rewritten whole, atomically: never a torn or repeated line)."""
        self._write_text("metrics.jsonl", metrics_text(self.history))

    def _commit(self) -> None:
        """--overwrite: once the first checkpoint is written, the new run's folder replaces the old one."""
        if not self.root or self.folder.committed:
            return
        try:
            self.folder.commit()
        except OSError as e:
            raise self._output_error(self.folder.path, e, "replace the earlier run in") from None
        self.log(f"Replaced the earlier run in {self.out_dir} (--overwrite)")

    def _kept(self) -> str:
        """Which checkpoints of output.dir are intact, in words (for error messages)."""
        if self.folder is None:
            return "nothing was written"
        if not self.folder.committed:
            return f"the earlier run in {self.out_dir} is untouched"
        parts = [f"{name} ({what})" for name, what in self.on_disk.items() if what]
        if not parts:
            return f"no checkpoint was written yet; {self.out_dir} holds none"
        return " and ".join(parts) + (" are" if len(parts) > 1 else " is") + f" intact in {self.out_dir}"

    def _output_error(self, path: str, e: OSError, verb: str = "write") -> OutputError:
        signum = self._stop.signum if self._stop is not None else None
        reason = describe_oserror(e, path)
        if "no longer exists" in reason:
            kept = "the checkpoints written so far moved with it"
        else:
            for name in CHECKPOINT_FILES:  # one replaced by something else meanwhile is not intact
                if self.on_disk[name] and self.folder is not None and not os.path.isfile(self.folder.file(name)):
                    self.on_disk[name] = None
            kept = self._kept()
        prefix = f"interrupted by {SIGNAL_NAMES.get(signum, signum)}, but " if signum else ""
        message = f"{prefix}cannot {verb} {path}: {reason}; {kept}"
        resume_from = next((n for n in CHECKPOINT_FILES if self.on_disk[n]), None)
        if resume_from and self.folder is not None and self.folder.committed and not signum \
                and "no longer exists" not in reason:
            message += f" (continue with --resume {os.path.join(self.out_dir, resume_from)})"
        return OutputError(message, exit_code=128 + signum if signum else 2)

    # -- setup -------------------------------------------------------------------
    def _needs_drop_last(self, n_train: int) -> bool:
        """Drop an epoch's last batch when it holds one image and a batch norm sees one value per channel.

        Batch norm cannot normalize a single value (PyTorch refuses too); that happens after a dense
        layer or a global pool when the training set leaves a remainder of 1 image.
        """
        if n_train % self.cfg.data.batch_size != 1 or n_train == 1:
            return False
        per_image = [int(np.prod(layer.in_shape[:-1])) for _, layer in named_layers(self.model)
                     if getattr(layer, "kind", None) == "batchnorm"]
        if any(count == 1 for count in per_image):
            self.log(f"Note: the last batch of each epoch ({n_train} = k x {self.cfg.data.batch_size} + 1) would "
                     f"hold one image, which batch norm cannot normalize; it is skipped")
            return True
        return False

    def _check_output(self) -> str:
        """How this run will use output.dir ('fresh', 'resume' or 'overwrite'); nothing is written yet.

        Never silently replaces another run's checkpoints; a file or folder in the way is an error now,
        not a traceback after the first epoch.
        """
        out = self.out_dir
        if os.path.lexists(out) and not os.path.isdir(out):
            raise UserError(f"output.dir: {out} is {self._kind(out)}, not a folder; pass --set output.dir=OTHER")
        if os.path.isdir(out):
            RunLock(out).check_free()  # a live run there: say so before anything else
        present = [n for n in RUN_FILES if os.path.lexists(os.path.join(out, n))]
        # A checkpoint is a regular file: a folder named last.npz is something in the way (below).
        checkpoints = [n for n in CHECKPOINT_FILES if n in present and self._kind(os.path.join(out, n)) == "a file"]
        if self.resume:
            mode = "resume"
            others = self._other_runs(checkpoints)
            if others and self.overwrite:
                mode = "overwrite"  # the resumed run replaces the other one once it has saved
            elif others:
                raise UserError(f"output.dir: {out} holds another run than the one resumed ({', '.join(others)}); "
                                f"pass --overwrite to replace it with the resumed run, or --set output.dir=OTHER")
        elif checkpoints and not self.overwrite:
            raise UserError(f"output.dir: {out} already holds a run ({', '.join(checkpoints)}); pass "
                            f"--overwrite to replace it, --resume {os.path.join(out, 'last.npz')} to "
                            f"continue it, or --set output.dir=OTHER")
        elif present and self.overwrite:
            mode = "overwrite"
        else:
            mode = "fresh"
        if mode != "overwrite":
            for name in present:
                path = os.path.join(out, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    raise UserError(f"output.dir: {path} is {self._kind(path)}, not a file; move it away"
                                    + (" (or pass --overwrite)" if mode == "fresh" else ""))
        return mode

    def _other_runs(self, checkpoints: list) -> list:
        """The checkpoints of output.dir written by another run than the checkpoint resumed (by run id)."""
        from .checkpoint import open_checkpoint

        def run_id(path):
            try:
                with open_checkpoint(path) as opened:
                    value = opened.meta.get("run_id")
            except UserError:
                return None
            return value if isinstance(value, str) else None

        mine = run_id(self.resume) if os.path.isfile(self.resume) else None
        if mine is None:
            return []  # an older checkpoint without a run id (or a bad one, which _load reports)
        others = []
        for name in checkpoints:
            theirs = run_id(os.path.join(self.out_dir, name))
            if theirs is not None and theirs != mine:
                others.append(f"{name} of run {theirs}")
        return others

    @staticmethod
    def _kind(path: str) -> str:
        if os.path.islink(path):
            return "a symbolic link"
        try:
            mode = os.stat(path).st_mode
            return "a file" if stat.S_ISREG(mode) else file_kind(mode)
        except OSError:
            return "unreadable"

    def _load(self):
        """Data, model and optimizer; the checkpoint's state when resuming. Returns the loaded pieces."""
        from .checkpoint import open_checkpoint
        from .errors import CheckpointError
        from .model import build_model

        faults.hit("start:load")
        from .optim import build_optimizer
        from .schedules import EarlyStopping, build_schedule

        cfg = self.cfg
        # The checkpoint's meta and array shapes are checked before any data is read, and before
        # its arrays are: they must fit the model this config describes.
        opened = open_checkpoint(self.resume) if self.resume else None
        try:
            self.model = build_model(cfg.model, seed=cfg.seed)
            self.opt = build_optimizer(cfg.train.optimizer, self.model.parameters())
            checkpoint = None
            if opened is not None:
                try:
                    opened.check_shapes({k: v.shape for k, v in self.model._state_arrays().items()})
                except CheckpointError as e:
                    raise UserError(f"--resume {self.resume}: does not match the config's model: {e}") from None
                checkpoint = opened.load()
        finally:
            if opened is not None:
                opened.close()
        self.schedule = build_schedule(cfg.train.schedule, cfg.train.optimizer["lr"], cfg.train.epochs)
        es = cfg.train.early_stopping
        self.early_stopping = EarlyStopping(**es) if es else None
        self.stopped_early = False
        self.position = (0, 0, None)  # epoch, batch in epoch, running sums of the epoch
        self.best_accuracy, self.history, skipped_steps = None, [], 0
        if checkpoint is not None:
            try:
                self.model.load_state_dict(checkpoint.model)
                self.opt.load_state_dict(checkpoint.optim)
            except UserError as e:
                if "damaged checkpoint" in str(e):
                    raise UserError(f"--resume {self.resume}: {e}") from None
                what = "optimizer (train.optimizer)" if "optim" in str(e) else "model"
                raise UserError(f"--resume {self.resume}: does not match the config's {what}: {e}") from None
            checked = _checked_meta(checkpoint.meta, self.resume)
            self.position = (checked["epoch"], checked["batch"], checked["running"])
            self.best_accuracy = checked["best_accuracy"]
            self.history = checked["history"]
            self.run_id = checked["run_id"]
            skipped_steps = checked["skipped_steps"]
            meta = checkpoint.meta
            try:
                self.schedule.load_state_dict(meta.get("schedule") or {})
                if self.early_stopping and meta.get("early_stopping"):
                    self.early_stopping.load_state_dict(meta["early_stopping"])
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"--resume {self.resume}: the saved schedule or early-stopping state does not "
                                f"match train.schedule / train.early_stopping, or is damaged ({e})") from None
            self.stopped_early = bool(meta.get("stopped_early", False))
            saved_threads = meta.get("threads")
            if saved_threads is not None and saved_threads != self.threads:
                self.log(f"Note: the checkpoint was written with {saved_threads} thread(s), this run uses "
                         f"{self.threads}")
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex[:16]
        # Batch-norm running statistics are restored when a step is skipped (on_nan: skip).
        self.nan_policy = NanPolicy(self.model, cfg.train.on_nan, skipped_steps, kept=self._kept)
        return load_data(cfg, self.progress)

    def _open_output(self, mode: str) -> None:
        """Lock output.dir (or stage an --overwrite beside it), clean leftovers, reconcile a resumed run."""
        self.folder = RunFolder(self.out_dir, mode)
        try:
            self.folder.open()
        except OSError as e:
            self.folder.close()
            raise UserError(f"output.dir: cannot write to {self.out_dir}: {describe_oserror(e, self.out_dir)}"
                            ) from None
        except BaseException:
            self.folder.close()
            raise
        for note in self.folder.notes:
            self.log(f"Note: {self.out_dir}: {note}")
        out = self.out_dir
        if mode == "fresh":
            # Another run may have finished here between the check and the lock.
            checkpoints = [n for n in CHECKPOINT_FILES if os.path.lexists(os.path.join(out, n))]
            if checkpoints:
                raise UserError(f"output.dir: {out} already holds a run ({', '.join(checkpoints)}), written "
                                f"while this one started; pass --overwrite to replace it or --set "
                                f"output.dir=OTHER")
            for name in RUN_FILES:  # files of an earlier start that never wrote a checkpoint
                path = os.path.join(out, name)
                if os.path.isfile(path):
                    try:
                        os.unlink(path)
                    except OSError as e:
                        raise self._output_error(path, e, "remove") from None
        elif mode == "resume":
            self._reconcile()
        elif self.history:  # a resumed run replacing another one (--overwrite): its metrics, in the staging folder
            self._write_metrics()

    def _reconcile(self) -> None:
        """A resumed run's files agree with the checkpoint it resumes from, before it trains on.

        metrics.jsonl is rewritten from the checkpoint's history (an epoch appended by a run killed
        before its checkpoint, or missing because the kill came after it, is set right); best.npz is
        restored from last.npz when a kill came between the two writes of an older version.
        """
        from .atomicio import atomic_write_bytes
        from .checkpoint import open_checkpoint

        out = self.out_dir
        last = os.path.join(out, "last.npz")
        epoch, batch, _ = self.position
        resumed_here = os.path.exists(last) and os.path.samefile(self.resume, last)
        if resumed_here:
            self.on_disk["last.npz"] = f"epoch {epoch}, batch {batch}" if batch else f"end of epoch {epoch}"
        best = os.path.join(out, "best.npz")
        best_meta = None
        if os.path.isfile(best):
            try:
                with open_checkpoint(best) as opened:
                    best_meta = opened.meta
            except UserError:
                best_meta = None
        want = best_epoch(self.history)
        have = best_meta.get("epoch") if isinstance(best_meta, dict) else None
        if resumed_here and want is not None and want == epoch and not batch and (
                not isinstance(have, int) or have < want):
            try:
                with open(last, "rb") as f:
                    atomic_write_bytes(best, f.read())
            except OSError as e:
                raise self._output_error(best, e) from None
            self.log(f"Note: best.npz was behind last.npz (an interrupted save); restored it from last.npz "
                     f"(epoch {want})")
            have = want
        if isinstance(have, int):
            self.on_disk["best.npz"] = f"epoch {have}"
        old = None
        try:
            with open(os.path.join(out, "metrics.jsonl"), "rb") as f:
                old = f.read(1 << 24).decode("utf-8", "replace")
        except OSError:
            pass
        new = metrics_text(self.history)
        if old != new:
            self._write_metrics()
            if old:
                self.log(f"Note: metrics.jsonl rewritten from the checkpoint's history ({len(self.history)} "
                         f"epoch(s); it held {old.count(chr(10))} line(s))")

    def _prepare(self):
        """Everything before the first step: output checks, model, data, config.yaml, kernels.

        Returns (validation images, validation labels, the epoch and batch to start at, its running sums).
        """
        from .data import BatchLoader

        cfg = self.cfg
        self.out_dir = cfg.output.dir
        # Several processes: every step below runs on each (rank 0 first where it downloads, writes or
        # compiles), and a failure anywhere ends all of them with the same exit code, reported once.
        threads = cfg.train.threads
        if threads is None and self.distributed:
            from .distributed import default_threads

            threads = default_threads(self.group)  # this process's share of the node's cores
        self.threads = self._together(lambda: set_threads(threads))
        mode = self._together(self._check_output, on="root")
        x_train, y_train, x_val, y_val, ds = self._together(self._load, on="root first")
        self.dataset = ds
        start_epoch, start_batch, running = self.position
        self.loader = BatchLoader(x_train, y_train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, reuse=True,
                                  drop_last=self._needs_drop_last(len(x_train)))
        self._together(self._check_positions, on="all")
        # Everything the run needs is loaded and checked: only now create (and lock) the output folder,
        # so a failed start leaves nothing behind and never touches an earlier run.
        self._together(lambda: self._open_output(mode), on="root")
        if self.resume and start_epoch >= cfg.train.epochs and not self.stopped_early:
            self.log(f"Nothing to train: {self.resume} is at the end of epoch {start_epoch} and train.epochs is "
                     f"{cfg.train.epochs} (raise train.epochs to train on)")
        elif self.resume:
            self.log(f"Resuming from {self.resume}: epoch {start_epoch + 1}, batch {start_batch}")
        self._together(lambda: self._write_text("config.yaml", f"# fastcnn {__version__}, run {self.run_id}\n"
                                                + to_yaml(cfg)), on="root")
        faults.hit("start:after-config")
        where = (f"{self.group.size} processes x {self.threads} thread(s)" if self.distributed
                 else f"{self.threads} thread(s)")
        self.log(f"Training on {len(x_train)} images ({ds.name}), validating on {len(x_val)}; "
                 f"{self.model.num_parameters():,} parameters; {where}; output {self.out_dir}")
        # Rank 0 compiles (or loads the kernel cache) first; the others then load what it cached.
        self._together(lambda: warm_up(cfg.model, log=self.log, optimizer=cfg.train.optimizer,
                                       clip=cfg.train.clip_grad_norm is not None), on="root first")
        self.augmenter = ds.augmenter  # training batches only; None when data.augment enables nothing
        return x_val, y_val, start_epoch, start_batch, running

    def _check_positions(self) -> None:
        """The resumed position fits the epoch; with several processes, every batch can be shared."""
        from .shard import GRAD_CHUNKS

        start_batch = self.position[1]
        n_batches = len(self.loader)
        if start_batch > n_batches:
            raise UserError(f"--resume {self.resume}: saved at batch {start_batch} of an epoch of "
                            f"{n_batches} batches (data.batch_size or data.num_train changed since)")
        if not self.distributed:
            return
        k = self.group.size
        n_train, batch = self.loader.num_samples, self.cfg.data.batch_size
        smallest = min(batch, n_train) if self.loader.drop_last or n_train % batch == 0 else n_train % batch
        if k > GRAD_CHUNKS:
            raise UserError(f"{k} processes: at most {GRAD_CHUNKS} can share a batch (each takes whole chunks of "
                            f"the {GRAD_CHUNKS} that every batch is split into); start at most {GRAD_CHUNKS}")
        if k > smallest:
            raise UserError(f"{k} processes need at least {k} images in every batch, but the last batch of an "
                            f"epoch holds {smallest} ({n_train} training images, data.batch_size {batch}); "
                            f"start fewer processes or change data.batch_size")

    def _together(self, fn: Callable[[], Any], on: str = "all") -> Any:
        """fn() in one process; with several, run_together (rank 0 only where ``on`` is "root")."""
        return run_together(self.group, fn, on) if self.distributed else fn()

    def _agreed_signal(self, stop: _StopFlag) -> int | None:
        """The signal that stops the run now: this process's; with several, the one any process got,
        agreed by all (a collective), so that every process stops after the same step. A signal
        arriving after the agreement counts at the next one."""
        if not self.distributed:
            return stop.signum
        agreed = self.group.allreduce_max(stop.signum or 0)
        if agreed:
            stop.signum = agreed
        return agreed or None

    # -- the loop ----------------------------------------------------------------
    def run(self) -> dict:
        """Train; returns {'history', 'best_accuracy', 'output_dir', 'skipped_steps'}.

        Raises Interrupted after saving when a signal stopped it, TrainingDiverged for a NaN/Inf
        with ``train.on_nan: stop`` (or an epoch whose every step was skipped), UserError for a bad
        config, checkpoint or output folder (OutputError when writing the output fails).
        """
        try:
            return self._run()
        finally:
            if self.folder is not None:
                self.folder.close()

    def _run(self) -> dict:
        x_val, y_val, start_epoch, start_batch, running = self._prepare()
        self._first_step_logged = False
        epochs = self.cfg.train.epochs
        if self.stopped_early:
            self.log("This run already stopped early; nothing to resume")
            start_epoch = epochs
        last = os.path.join(self.out_dir, "last.npz")
        with _StopFlag(self.ignore_signals_after_stop) as stop:
            self._stop = stop
            for epoch in range(start_epoch, epochs):
                first = start_batch if epoch == start_epoch else 0
                sums = self._train_epoch(epoch, first, running or new_running(), stop)
                running = None
                if not sums["seen"] and len(self.loader):
                    raise TrainingDiverged(
                        f"every step of epoch {epoch + 1} was skipped (train.on_nan: skip; "
                        f"{self.skipped_steps} step(s) skipped in all): the model no longer trains; "
                        f"{self._kept()}")
                self._end_epoch(epoch, sums, x_val, y_val)
                signum = self._agreed_signal(stop)
                if signum is not None:
                    raise Interrupted(signum, last)
                if self.stopped_early:
                    es = self.early_stopping
                    self.log(f"Early stopping: {es.monitor} has not improved for {es.patience} epoch(s) "
                             f"(best {es.best:.4f})")
                    break
            if epochs == start_epoch and not self.resume:
                self._save("last.npz", epochs, 0, None)
                self._write_metrics()
                self._commit()
            self._plot_curves()
            signum = self._agreed_signal(stop)
            if signum is not None:  # arrived after the last step: everything is saved already
                raise Interrupted(signum, last)
        return {"history": self.history, "best_accuracy": self.best_accuracy, "output_dir": self.out_dir,
                "skipped_steps": self.skipped_steps}

    def _train_epoch(self, epoch: int, first: int, sums: dict, stop: _StopFlag) -> dict:
        """The batches of ``epoch`` from batch ``first`` on; returns the epoch's running sums.

        A signal finishes the step in flight, saves last.npz mid-epoch and raises Interrupted.
        """
        from tqdm import tqdm

        loader, clip = self.loader, self.cfg.train.clip_grad_norm
        bar = tqdm(total=len(loader), initial=first, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                   unit="batch", disable=not self.progress, dynamic_ncols=True, leave=True)
        t_epoch = time.perf_counter()
        for b, (xb, yb) in enumerate(loader.epoch_batches(epoch, start=first), start=first):
            if not self._first_step_logged:
                self.log(f"First training step at {time.perf_counter() - self.started:.2f} s after start")
                self._first_step_logged = True
            if self.augmenter is not None:
                xb = self.augmenter.apply(xb, epoch, b)  # a function of (seed, epoch, b): resume stays exact
            self.opt.lr = self.schedule.lr(epoch + b / len(loader))
            self.nan_policy.before_step()
            self.model.step = epoch * len(loader) + b  # dropout masks: a function of the position
            result = self._step(xb, yb, clip)
            if result.ok:
                add_step(sums, result)
            else:
                where = f"step {self.opt.step_count + self.skipped_steps + 1} (epoch {epoch + 1}, batch {b + 1})"
                if not self.nan_policy.skip:
                    bar.close()
                line = self.nan_policy.on_fault(result.fault, where)  # on every process: same state
                if self.root:
                    bar.write(line)
            bar.update(1)
            if sums["seen"] and (b % 20 == 0 or b == len(loader) - 1):
                elapsed = sums["seconds"] + time.perf_counter() - t_epoch
                bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}",
                                acc=f"{sums['correct'] / sums['seen']:.4f}",
                                img_s=f"{sums['seen'] / max(elapsed, 1e-9):.0f}", refresh=False)
            signum = self._agreed_signal(stop)  # every process stops after the same step
            if signum is not None:
                bar.close()
                sums["seconds"] += time.perf_counter() - t_epoch
                faults.hit("signal-save:before")
                path = self._save("last.npz", epoch, b + 1, sums)
                self._commit()
                raise Interrupted(signum, path)
        bar.close()
        sums["seconds"] += time.perf_counter() - t_epoch
        return sums

    def _step(self, xb: np.ndarray, yb: np.ndarray, clip) -> StepResult:
        """train_step on this process's share of the batch (all of it in one process)."""
        if not self.distributed:
            return train_step(self.model, self.opt, xb, yb, clip_grad_norm=clip,
                              label_smoothing=self.cfg.train.label_smoothing)
        from .shard import BatchShard

        shard = BatchShard(len(yb), self.group)
        self.model.set_shard(shard)
        try:
            return train_step(self.model, self.opt, xb[shard.start:shard.stop], yb[shard.start:shard.stop],
                              clip_grad_norm=clip, label_smoothing=self.cfg.train.label_smoothing)
        finally:
            self.model.set_shard(None)

    def _plot_curves(self) -> None:
        """curves.png beside metrics.jsonl when matplotlib is installed; a plotting failure only warns."""
        from .plots import save_curves

        if not self.root:
            return
        try:
            path = save_curves(self.folder.write_dir)
        except Exception as e:  # noqa: BLE001 - the checkpoints are saved; a plot must not fail the run
            self.log(f"Warning: could not draw curves.png: {e}")
            return
        if path:
            self.log(f"Curves: {path}")

    def _end_epoch(self, epoch: int, sums: dict, x_val: np.ndarray, y_val: np.ndarray) -> None:
        """Validate, log; save best.npz (if improved), then last.npz, then metrics.jsonl.

        That order keeps the files in agreement at every instant (see the module doc); a resume from
        last.npz redoes the epoch bit for bit, so a best.npz a kill left one epoch ahead is what the
        resumed run writes again.
        """
        self._require_finite_weights(f"in epoch {epoch + 1}")
        val = evaluate(self.model, x_val, y_val, group=self.group if self.distributed else None)
        record = epoch_record(epoch, self.opt.step_count, sums, val, self.opt.lr, self.skipped_steps)
        self.history.append(record)
        improved = self.best_accuracy is None or val["accuracy"] > self.best_accuracy
        if improved:
            self.best_accuracy = val["accuracy"]
        self.schedule.epoch_end(record)
        if self.early_stopping is not None and self.early_stopping.should_stop(record):
            self.stopped_early = True
        if improved:
            self._save("best.npz", epoch + 1, 0, None)
        faults.hit("epoch-end:after-best")
        self._save("last.npz", epoch + 1, 0, None)
        faults.hit("epoch-end:after-last")
        self._write_metrics()
        faults.hit("epoch-end:after-metrics")
        self._commit()
        self.log(f"epoch {epoch + 1}/{self.cfg.train.epochs}: train loss {record['train_loss']:.4f} "
                 f"acc {record['train_accuracy']:.4f} | val loss {val['loss']:.4f} acc {val['accuracy']:.4f} | "
                 f"{record['images_per_sec']:.0f} img/s, {sums['seconds']:.1f} s" + (" (best)" if improved else ""))
