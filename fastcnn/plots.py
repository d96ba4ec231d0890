"""Plots (optional extra ``fastcnn[plot]``: matplotlib): training curves, confusion matrix.

matplotlib is imported lazily and only through ``matplotlib.figure.Figure``
with the Agg canvas: no pyplot, no GUI backend, no global state touched.

>>> save_curves("runs/mnist")      # runs/mnist/curves.png, or None without matplotlib
"""
import json
import os

from .errors import UserError

PLOT_EXTRA = "pip install 'fastcnn[plot]'"


def matplotlib_available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib(what="plotting"):
    """UserError naming the extra when matplotlib is missing."""
    if not matplotlib_available():
        raise UserError(f"{what} needs matplotlib, which is not installed: {PLOT_EXTRA}")


def check_writable(path):
    """UserError unless a file can be created at ``path`` (its folder exists and is writable)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; give a file name such as {os.path.join(path, 'plot.png')}")
    if not os.path.isdir(folder):
        raise UserError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{path}: cannot write to folder {folder}")


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    """Render to memory, then write atomically: a kill never leaves half a PNG."""
    import io

    from .atomicio import atomic_write_bytes

    ext = os.path.splitext(os.fspath(path))[1][1:].lower()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=ext if ext in fig.canvas.get_supported_filetypes() else "png")
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return str(path)


# -- training curves ---------------------------------------------------------
# metrics.jsonl holds one line of about 300 bytes per epoch: 64 MiB is far beyond any real run.
MAX_METRICS_BYTES = 64 << 20


def read_metrics(path):
    """The records of a metrics.jsonl, one per epoch (the last one wins for a repeated epoch). Lines that are
    not JSON records (a line cut short by a crash, bytes that are not UTF-8) are skipped."""
    from .safeio import UnsafeFile, read_regular

    try:
        data = read_regular(path, MAX_METRICS_BYTES)
    except UnsafeFile as e:
        raise UserError(f"cannot read {path}: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    by_epoch = {}
    for line in data.splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # also UnicodeDecodeError
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _metrics_path(run_dir):
    run_dir = os.fspath(run_dir)
    if os.path.isfile(run_dir) and run_dir.endswith(".jsonl"):
        return run_dir, os.path.dirname(run_dir) or "."
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run folder")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no metrics.jsonl in this folder (not a training run, or no epoch finished)")
    return path, run_dir


def _series(records, key):
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and value == value:  # skip None and NaN
            xs.append(r["epoch"])
            ys.append(float(value))
    return xs, ys


def draw_curves(run_dir, output=None):
    """Draw loss and accuracy per epoch (training and validation) of a run to a PNG; returns its path.

    ``run_dir``: a run folder holding metrics.jsonl (or the .jsonl file
    itself); ``output`` defaults to ``<run_dir>/curves.png``. UserError when
    matplotlib is missing, there are no metrics, or the file cannot be written.
    """
    require_matplotlib("fastcnn plot")
    metrics, folder = _metrics_path(run_dir)
    records = read_metrics(metrics)
    if not records:
        raise UserError(f"{metrics}: holds no epoch record yet")
    output = os.fspath(output) if output is not None else os.path.join(folder, "curves.png")
    check_writable(output)

    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = _figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    style = {"marker": "o", "markersize": 4, "linewidth": 1.8}
    train_color, val_color = "#1f77b4", "#d62728"

    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "accuracy", "Accuracy")):
        for prefix, label, color in (("train", "training", train_color), ("val", "validation", val_color)):
            xs, ys = _series(records, f"{prefix}_{key}")
            if xs:
                ax.plot(xs, ys, label=label, color=color, **style)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key if key == "loss" else "accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)

    xs, ys = _series(records, "val_accuracy")
    if ys:
        best = max(range(len(ys)), key=lambda i: ys[i])  # first epoch reaching the best, as best.npz
        ax_acc.plot([xs[best]], [ys[best]], marker="*", markersize=14, color=val_color, linestyle="none",
                    label=f"best: {ys[best]:.2%} (epoch {xs[best]})")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    _, train_loss = _series(records, "train_loss")
    _, val_loss = _series(records, "val_loss")
    losses = [v for v in train_loss + val_loss if v > 0]
    if losses and max(losses) / min(losses) > 50:
        ax_loss.set_yscale("log")  # a loss falling over decades is unreadable on a linear axis
    ax_loss.legend(loc="upper right")
    ax_acc.legend(loc="lower right")
    name = os.path.basename(os.path.abspath(folder))
    fig.suptitle(f"{name}: {len(records)} epoch{'s' if len(records) != 1 else ''}", fontsize=12)
    return _save(fig, output)


def save_curves(run_dir):
    """``<run_dir>/curves.png`` from ``<run_dir>/metrics.jsonl``; its path, or None.

    None (silently) when matplotlib is not installed or the run has no epoch
    record: meant to be called at the end of training.
    """
    if not matplotlib_available():
        return None
    try:
        metrics, _ = _metrics_path(run_dir)
        if not read_metrics(metrics):
            return None
    except UserError:
        return None
    return draw_curves(run_dir)


# -- confusion matrix --------------------------------------------------------
def plot_confusion(matrix, class_names, path, title=None):
    """A heatmap PNG of a confusion matrix (rows: true class, columns: predicted); returns the path.

    Cells are coloured by the fraction of their row (so that small classes
    show as well as large ones; square-root scale) and labelled with the counts.
    """
    import numpy as np

    require_matplotlib("--plot")
    check_writable(path)
    matrix = np.asarray(matrix, dtype=np.int64)
    k = len(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = min(max(4.5, 0.55 * k + 2.5), 14)
    fig = _figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    from matplotlib.colors import PowerNorm

    # a square-root colour scale: the few percent of a class that is misclassified stays visible
    image = ax.imshow(frac, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0))
    cbar = fig.colorbar(image, ax=ax, shrink=0.8)
    cbar.set_label("fraction of the true class")
    names = [str(n) for n in class_names]
    ax.set_xticks(range(k), labels=names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right"
                  if max(map(len, names)) > 2 else "center")
    ax.set_yticks(range(k), labels=names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 30:
        size = 9 if k <= 12 else 7
        for t in range(k):
            for p in range(k):
                if matrix[t, p]:
                    ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=size,
                            color="white" if frac[t, p] > 0.3 else "black")
    ax.set_title(title or "Confusion matrix")
    return _save(fig, path)
