"""Evaluation: the one function that scores a model (the trainer's validation and ``fastcnn eval``),
and ``fastcnn eval``'s checkpoint scoring with its confusion matrix."""
from __future__ import annotations

import os

import numpy as np

from .checkpoint import CheckpointFile, open_checkpoint
from .config import validate
from .errors import CheckpointError, ConfigError


def config_from_checkpoint(checkpoint):
    """The validated config saved in a checkpoint's meta (CheckpointError when absent or invalid)."""
    raw = checkpoint.meta.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{checkpoint.path}: no config in its meta; not a fastcnn training checkpoint")
    try:
        return validate(raw)
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint.path}: its saved config is invalid ({e})") from None


def check_parameter_shapes(cfg, opened: CheckpointFile) -> None:
    """The model the saved config describes must be the one whose arrays the file holds.

    Checked from the config's shape plan and the file's .npy headers, before any model is built:
    a meta declaring a model of hundreds of millions of parameters beside a small file is refused
    without allocating it.
    """
    from .layers import plan_shapes

    for i, (layer, in_shape, _) in enumerate(plan_shapes(cfg.model)):
        for name, shape in layer.parameter_shapes(in_shape).items():
            key = f"layers.{i}.{name}"
            stored = opened.shapes.get(key)
            if stored is None:
                raise CheckpointError(f"{opened.path}: its saved config describes {key} of shape {tuple(shape)}, "
                                      f"which the file does not hold")
            if tuple(stored) != tuple(shape):
                raise CheckpointError(f"{opened.path}: {key}: shape {tuple(stored)} in the file, {tuple(shape)} "
                                      f"in its saved config")


def load_model_checkpoint(path):
    """(checkpoint, config, model) of a checkpoint file, every size checked before it is allocated."""
    with open_checkpoint(path) as opened:
        cfg = config_from_checkpoint(opened)
        check_parameter_shapes(cfg, opened)
        checkpoint = opened.load()
    cfg, model = model_from_checkpoint(checkpoint, cfg)
    return checkpoint, cfg, model


def load_model(path):
    """``fastcnn.load_model``: a checkpoint's model with its weights, ready for ``forward(x, training=False)``.

    The loading of ``fastcnn eval`` and ``predict``, with their checks (a CheckpointError for a missing,
    damaged or mismatched file)."""
    return load_model_checkpoint(path)[2]


def model_from_checkpoint(checkpoint, cfg=None):
    """(config, model) rebuilt from a loaded checkpoint's meta and arrays."""
    from .model import build_model

    if cfg is None:
        cfg = config_from_checkpoint(checkpoint)
    model = build_model(cfg.model, seed=cfg.seed)
    try:
        model.load_state_dict(checkpoint.model)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint.path}: {e}") from None
    return cfg, model


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 500, group=None) -> dict:
    """Evaluation-mode metrics and the confusion matrix of ``model`` on ``(x, y)``.

    Returns {'loss', 'accuracy', 'per_class_accuracy' (None for a class with no
    sample), 'count', 'confusion_matrix'}: ``confusion_matrix[t][p]`` counts the
    samples of true class t predicted as p (rows: true, columns: predicted).
    The trainer's validation (metrics.jsonl's val_loss, val_accuracy) and
    ``fastcnn eval`` both call this: same batching, same loss, same numbers.

    ``group`` (fastcnn/distributed.py, several processes holding the same model): process r
    evaluates batches r, r + K, ...; the batch losses are gathered and added in batch order, so
    every process returns the numbers one process computes.
    """
    from .losses import softmax_cross_entropy

    k = model.num_classes
    size, rank = (group.size, group.rank) if group is not None else (1, 0)
    starts = range(0, len(x), batch_size)
    confusion = np.zeros((k, k), np.int64)
    batch_loss = np.zeros(len(starts), np.float64)  # loss x size of each batch
    for i, start in enumerate(starts):
        if i % size != rank:
            continue
        xb, yb = x[start:start + batch_size], np.asarray(y[start:start + batch_size])
        logits = model.forward(xb, training=False)
        loss, _ = softmax_cross_entropy(logits, yb)
        batch_loss[i] = float(loss) * len(yb)
        np.add.at(confusion, (yb, logits.argmax(axis=1)), 1)
    if size > 1:
        owner = np.arange(len(starts)) % size
        batch_loss = group.allgather_rows(batch_loss[None], [1] * size)[owner, np.arange(len(starts))]
        confusion = group.allgather_rows(confusion[None], [1] * size).sum(axis=0)
    total_loss = 0.0
    for value in batch_loss:  # in batch order, as one process adds them
        total_loss += float(value)
    return metrics_from_confusion(confusion, total_loss)


def metrics_from_confusion(confusion, total_loss: float | None = None) -> dict:
    """Accuracy, per-class accuracy (diagonal / row sums) and count from a confusion matrix."""
    confusion = np.asarray(confusion, np.int64)
    rows = confusion.sum(axis=1)
    n = int(rows.sum())
    diag = np.diag(confusion)
    return {
        "loss": None if total_loss is None else total_loss / max(n, 1),
        "accuracy": float(diag.sum() / max(n, 1)),
        "per_class_accuracy": [float(c / r) if r else None for c, r in zip(diag, rows)],
        "count": n,
        "confusion_matrix": confusion.tolist(),
    }


def evaluate_checkpoint(path: str | os.PathLike, data_root: str | None = None, batch_size: int = 500,
                        threads: int | None = None, data_path: str | None = None, log=None) -> dict:
    """Test-set metrics of a checkpoint: accuracy, loss, per-class accuracy, count, dataset, class names,
    confusion_matrix (rows: true class, columns: predicted class).

    The data is found where the caller says: ``data_root`` (else $FASTCNN_DATA, else the user cache)
    and, for folder/npz datasets, ``data_path`` (else the checkpoint's data.path, which is only read).
    A checkpoint's own data.root is ignored: a file never decides where folders are created or
    downloads go.
    """
    from .data import load_dataset, resolve_root
    from .runtime import set_threads

    checkpoint, cfg, model = load_model_checkpoint(path)
    set_threads(threads, key="--threads")
    d = cfg.data
    saved_root = d.get("root")
    if data_root is None and saved_root and log is not None and d.dataset in ("mnist", "fashion-mnist", "cifar10"):
        log(f"Note: reading {d.dataset} from {resolve_root(None)} (the checkpoint's data.root {saved_root!r} is "
            f"not used; pass --data-root to choose)")
    extra = {"resize": d.resize} if d.get("resize") is not None else {}
    if d.get("path") is not None or data_path is not None:  # folder / npz datasets
        extra["path"] = data_path if data_path is not None else d.path
    ds = load_dataset(d.dataset, data_root,
                      input_shape=tuple(cfg.model.input_shape), num_classes=cfg.model.num_classes,
                      num_train=d.num_train, num_test=d.num_test, seed=cfg.seed, **extra)
    result = evaluate(model, ds.x_test, ds.y_test, batch_size=batch_size)
    result.update({"dataset": ds.name, "checkpoint": str(path), "epoch": checkpoint.meta.get("epoch"),
                   "class_names": list(ds.class_names)})
    return result


def format_confusion(matrix, class_names, max_name=7):
    """The confusion matrix as a text table: rows true class, columns predicted, class names as headers.

    Column headers are the class names cut to ``max_name`` characters (or the
    width of the largest count, if wider); row labels are the full names.
    """
    matrix = np.asarray(matrix)
    names = [str(n) for n in class_names]
    count_width = max(len(str(int(matrix.max()))) if matrix.size else 1, 1)
    width = max(count_width, min(max(len(n) for n in names), max_name))
    heads = [n[:width] for n in names]
    corner = "true \\ pred"
    label_width = max(len(corner), *(len(n) for n in names))
    lines = [corner.rjust(label_width) + "  " + " ".join(h.rjust(width) for h in heads)]
    for name, row in zip(names, matrix):
        cells = [str(int(v)).rjust(width) if v else ".".rjust(width) for v in row]
        lines.append(f"{name.rjust(label_width)}  " + " ".join(cells))
    return "\n".join(lines)
