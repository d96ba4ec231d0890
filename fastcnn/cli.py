"""The ``fastcnn`` command: train, eval, bench, summary, predict, export, plot.

Nothing heavy is imported at module level: ``fastcnn --help`` answers at once
and no kernel is compiled until a command needs it.
"""
import os
import signal
import sys
import time

import click

from . import __version__
from .errors import Terminated
from .onnx_export import DEFAULT_OPSET, MIN_OPSET  # plain constants: imports neither onnx nor NumPy
from .stopping import raise_terminated

_STARTED = time.perf_counter()

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


MAX_LINE = 600  # characters of one error line (a 100 kB --set value is not echoed back in full)


def _error(message):
    click.echo(f"Error: {_shorten(str(message))}", err=True)


def _shorten(message, limit=MAX_LINE):
    """Each line of ``message`` cut to ``limit`` characters (the middle elided)."""
    lines = []
    for line in message.splitlines() or [""]:
        if len(line) > limit:
            cut = len(line) - limit
            line = f"{line[:limit * 2 // 3]} [... {cut:,} characters ...] {line[-(limit // 3):]}"
        lines.append(line)
    return "\n".join(lines)


def _json(value):
    """Strict JSON for --json output: NaN and infinities are null, never a bare NaN."""
    from .safeio import dumps_json

    return dumps_json(value)


class _Stopped(Exception):
    """A KeyboardInterrupt (Ctrl-C) or SIGTERM inside a command, passed to main() past click (which would
    print an empty line for it first)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Terminated:
            raise _Stopped(143, "terminated") from None
        except KeyboardInterrupt:
            raise _Stopped(130, "interrupted") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastcnn")
def cli():
    """Train convolutional networks fast on a multicore CPU.

    \b
    Quick start:
      fastcnn train configs/mnist.yaml          # train; writes runs/mnist/
      fastcnn eval runs/mnist/best.npz          # score the best checkpoint
      fastcnn bench                             # time the CPU kernels
      fastcnn summary configs/mnist.yaml        # layers, shapes, parameters, FLOPs
      fastcnn predict runs/mnist/best.npz digit.png
      fastcnn export runs/mnist/best.npz        # -> runs/mnist/best.onnx (ONNX, for onnxruntime)
      fastcnn plot runs/mnist                   # loss/accuracy curves -> curves.png

    Data is read from data.root in the config, else $FASTCNN_DATA, else
    ~/.cache/fastcnn (downloaded there when missing and online).
    """


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.epochs=1 --set model.layers[0].filters=16. Repeatable.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue from a checkpoint (RUN_DIR/last.npz), mid-epoch too.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier run in output.dir (once this run has written its first checkpoint).")
@click.option("--threads", type=int, default=None, help="Kernel threads (default: train.threads, else all cores).")
@click.option("--no-progress", is_flag=True, help="No progress bars (log lines only).")
def train(config, overrides, resume, overwrite, threads, no_progress):
    """Train the network described in the YAML file CONFIG.

    Writes metrics.jsonl, last.npz, best.npz (best validation accuracy) and
    the resolved config.yaml to output.dir, which it locks: a second run on the
    same folder is refused. Ctrl-C finishes the current step, saves last.npz
    and prints the command that resumes. A run never replaces another run's
    checkpoints unless --overwrite (or --resume) says so, and --overwrite
    replaces them only once the new run has written its first checkpoint.
    """
    from .config import load_config
    from .distributed import current_group
    from .train import Trainer, run_together

    # Started by an MPI launcher (mpiexec -n K, srun): the K processes train one model together.
    group = current_group()
    if threads is not None:
        overrides = (*overrides, f"train.threads={threads}")
    try:
        if group.size > 1:  # a mistake (or a file missing on one machine) ends every process, said once
            cfg = run_together(group, lambda: load_config(config, overrides))
        else:
            cfg = load_config(config, overrides)
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, progress=not no_progress, log=click.echo,
                          started=_STARTED, ignore_signals_after_stop=True, group=group)
        result = trainer.run()
    except BaseException as e:
        if group.size > 1:
            _end_process_group(group, e)
        raise
    if result["best_accuracy"] is None or not group.is_root:
        return
    out, best = result["output_dir"], os.path.join(result["output_dir"], "best.npz")
    if os.path.exists(best):
        click.echo(f"Best validation accuracy {result['best_accuracy']:.4f}; checkpoints in {out} "
                   f"(evaluate: fastcnn eval {best})")
    else:  # a finished run resumed into a new folder: nothing was trained, nothing written there
        click.echo(f"Best validation accuracy {result['best_accuracy']:.4f} (the resumed run's); no checkpoint "
                   f"written to {out}")


@cli.command(name="eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding the datasets (default: $FASTCNN_DATA, else the cache; never the checkpoint's "
                   "data.root).")
@click.option("--data-path", type=click.Path(), default=None,
              help="The folder or .npz file of a folder/npz dataset (default: the checkpoint's data.path, "
                   "only read).")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--threads", type=int, default=None, help="Kernel threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (accuracy, loss, per_class_accuracy, confusion_matrix).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw the confusion matrix to this PNG (needs matplotlib: pip install 'fastcnn[plot]').")
def eval_(checkpoint, data_root, data_path, batch_size, threads, as_json, plot_path):
    """Score a trained CHECKPOINT on its dataset's test split.

    Prints accuracy, loss, per-class accuracy and the confusion matrix
    (rows: true class, columns: predicted class).
    """
    from .evaluate import evaluate_checkpoint, format_confusion

    if plot_path is not None:
        from .plots import check_writable, require_matplotlib

        require_matplotlib()          # fail before the evaluation, not after it
        check_writable(plot_path)
    result = evaluate_checkpoint(checkpoint, data_root=data_root, batch_size=batch_size, threads=threads,
                                 data_path=data_path, log=lambda line: click.echo(line, err=True))
    if plot_path is not None:
        from .plots import plot_confusion

        plot_confusion(result["confusion_matrix"], result["class_names"], plot_path,
                       title=f"{result['dataset']} test set: {result['count']:,} images, "
                             f"accuracy {result['accuracy']:.2%}")
    if as_json:
        click.echo(_json(result))
        return
    click.echo(f"{result['dataset']} test set, {result['count']} images")
    loss = result["loss"]
    click.echo(f"accuracy {result['accuracy']:.4f}   loss {'nan' if loss is None else f'{loss:.4f}'}")
    click.echo("per-class accuracy:")
    for name, acc in zip(result["class_names"], result["per_class_accuracy"]):
        click.echo(f"  {name:>12}  {'-' if acc is None else f'{acc:.4f}'}")
    click.echo("confusion matrix (rows: true class, columns: predicted; . = 0):")
    click.echo(format_confusion(result["confusion_matrix"], result["class_names"]))
    if plot_path is not None:
        click.echo(f"Wrote {plot_path}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=int, default=None, help="Kernel threads (default: all cores).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per row.")
@click.option("--compare", type=click.Choice(["torch"]), default=None, help="Time PyTorch beside each row.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(config, batch_size, threads, repeats, compare, as_json):
    """Time each layer's forward and backward pass and the whole training step.

    CONFIG defaults to the seed network (configs/mnist.yaml's model). Reports
    medians, GFLOP/s and the training step's images/s.
    """
    from .bench import print_report, run_bench

    report = run_bench(config, batch_size=batch_size, threads=threads, repeats=repeats, compare=compare,
                       log=(lambda *_: None) if as_json else click.echo)
    if as_json:
        click.echo(_json(report))
    else:
        print_report(report, click.echo)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key. Repeatable.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch for the per-batch totals (default: data.batch_size).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def summary(config, overrides, batch_size, as_json):
    """Print the network of CONFIG layer by layer: output shapes, parameters, FLOPs.

    Reads no data and compiles no kernel.
    """
    from .config import load_config
    from .model import build_model
    from .summary import format_summary, summarize

    cfg = load_config(config, overrides)
    model = build_model(cfg.model, seed=cfg.seed, fuse=False)
    info = summarize(model, batch_size=batch_size if batch_size is not None else cfg.data.batch_size)
    click.echo(_json(info) if as_json else format_summary(info))


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Classes shown per input.")
@click.option("--resize", is_flag=True, help="Resize inputs to the model's input size instead of refusing them.")
@click.option("--invert", is_flag=True, help="Invert pixel values (x -> 1 - x) first: dark-on-light drawings "
                                             "for MNIST-style models.")
@click.option("--no-normalize", is_flag=True,
              help="No mean/std normalization: float inputs go to the model as they are (already "
                   "normalized like the training data); integer pixels are still scaled by 1/255.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--threads", type=int, default=None, help="Kernel threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per input image.")
def predict(checkpoint, inputs, top_k, resize, invert, no_normalize, batch_size, threads, as_json):
    """Classify images with a trained CHECKPOINT (or an .onnx file written by
    fastcnn export, run in onnxruntime: pip install 'fastcnn[onnx]').

    \b
    INPUT: PNG/JPEG files (needs Pillow: pip install 'fastcnn[images]') or
    .npy arrays: (N, H, W, C), (N, H, W), one (H, W, C) or (H, W) image;
    integer (uint8) pixels are scaled by 1/255, floats are taken as pixels
    in [0, 1]. Then the training data's normalization: the checkpoint's
    data_stats, else the MNIST / Fashion-MNIST / CIFAR-10 mean and std.
    """
    from .predict import format_predictions, predict_inputs
    from .runtime import set_threads

    set_threads(threads, key="--threads")
    result = predict_inputs(checkpoint, inputs, top_k=top_k, batch_size=batch_size, resize=resize,
                            invert=invert, normalize=not no_normalize, threads=threads)
    for note in result["notes"]:
        click.echo(f"Note: {note}", err=True)
    if as_json:
        click.echo(_json(result["predictions"]))
    else:
        click.echo(format_predictions(result["predictions"]))


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="ONNX file to write (default: CHECKPOINT with the suffix .onnx).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help=f"ONNX opset, {MIN_OPSET} up to the newest the installed onnx supports.")
@click.option("--raw-pixels", is_flag=True,
              help="Fold the training data's normalization into the graph: its input is then pixels in [0, 1].")
def export(checkpoint, output, opset, raw_pixels):
    """Export a trained CHECKPOINT to ONNX (evaluation mode), for onnxruntime and other runtimes.

    \b
    Input `input`: float32 NHWC (batch, H, W, C), batch dynamic, normalized as
    the training data was (or pixels in [0, 1] with --raw-pixels); output
    `logits` (batch, num_classes). Needs pip install 'fastcnn[onnx]'.
    Check it with: fastcnn predict OUT.onnx INPUT...
    """
    from .onnx_export import export_checkpoint

    path = export_checkpoint(checkpoint, output, opset=opset, raw_pixels=raw_pixels)
    click.echo(f"Wrote {path} (opset {opset}; input float32 NHWC "
               f"{'pixels in [0, 1]' if raw_pixels else 'normalized as the training data'}; output logits)")


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: RUN_DIR/curves.png).")
def plot(run_dir, output):
    """Draw the loss and accuracy curves of a training run (RUN_DIR/metrics.jsonl) to a PNG.

    Needs matplotlib: pip install 'fastcnn[plot]'.
    """
    from .plots import draw_curves

    path = draw_curves(run_dir, output)
    click.echo(f"Wrote {path}")


def _end_process_group(group, error):
    """An error in one process of a multi-process run (fastcnn train under mpiexec).

    Raised by every process at once (a failed start, checked together: ``agreed``; a stop by signal
    or a divergence, which all processes see at the same step): rank 0 reports a stop or divergence
    as a one-process run does (returns: main() does it); otherwise each process reports its own error
    unless it is quiet (another process reports it) and exits with the code agreed by all. Raised by
    this process alone (a full disk on rank 0, a bug): it reports it, naming its rank, and ends every
    process (MPI Abort) so that none waits for it forever.
    """
    from .errors import Terminated, UserError
    from .train import Interrupted, TrainingDiverged, exit_code_of

    if isinstance(error, (Interrupted, TrainingDiverged)):
        if not group.is_root:
            sys.exit(exit_code_of(error))  # quietly: rank 0 reports
        return
    agreed = getattr(error, "agreed", False)
    code = getattr(error, "job_code", None) or exit_code_of(error)
    # An agreed UserError of another process already names it (train.agreed_failure).
    where = "" if group.is_root or (agreed and isinstance(error, UserError)) else f"process {group.rank}: "
    if getattr(error, "quiet", False):
        pass  # another process reports it
    elif isinstance(error, UserError):
        _error(f"{where}{error}")
    elif isinstance(error, KeyboardInterrupt):
        _error(f"{where}{'terminated' if isinstance(error, Terminated) else 'interrupted'}")
    else:
        import traceback

        click.echo(f"Error: {where}internal error{'' if agreed else ', ending every process of the run'}:",
                   err=True)
        traceback.print_exception(type(error), error, error.__traceback__)
    sys.stderr.flush()
    sys.stdout.flush()
    if agreed:
        _ignore_signals()
        sys.exit(code)  # every process leaves now, with the same code
    group.abort(code)


def main(argv=None):
    """Console entry point: user mistakes -> one line and exit 2; interrupts -> 130/143."""
    from .errors import UserError

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        # Before training installs its own handler (and after), SIGTERM stops like Ctrl-C: exit 143, one
        # line, the cleanup of `finally` blocks run (a lock released, a staging folder removed).
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        cli.main(args=argv, prog_name="fastcnn", standalone_mode=False)
    except click.exceptions.Abort as e:  # click's name for a KeyboardInterrupt it caught
        _ignore_signals()
        if isinstance(e.__cause__ or e.__context__, Terminated):
            _error("terminated")
            sys.exit(143)
        _error("interrupted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except UserError as e:
        if not getattr(e, "quiet", False):  # e.g. the other copies started by an MPI launcher
            _error(str(e))
        # OutputError while saving after a signal: 130/143, as the signal would have given.
        sys.exit(getattr(e, "exit_code", EXIT_USER_ERROR))
    except _Stopped as e:
        _ignore_signals()
        _error(str(e))
        sys.exit(e.code)
    except Terminated:
        _ignore_signals()
        _error("terminated")
        sys.exit(143)
    except KeyboardInterrupt:
        _ignore_signals()
        _error("interrupted")
        sys.exit(130)
    except MemoryError:
        _error(_out_of_memory_message(argv))
        sys.exit(EXIT_USER_ERROR)
    except RecursionError:
        _error("input nested too deeply to process (a hostile or damaged file?)")
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:  # noqa: BLE001 - the last line of defence
        from .train import Interrupted, TrainingDiverged

        if isinstance(e, TrainingDiverged):
            _error(str(e))
            sys.exit(EXIT_INTERNAL)
        if isinstance(e, Interrupted):
            # Everything is saved; a further Ctrl-C must not cut these lines or change the exit code.
            _ignore_signals()
            click.echo(f"\nInterrupted: saved {e.checkpoint}", err=True)
            click.echo(f"Resume with: fastcnn train {' '.join(_resume_args(e.checkpoint))}", err=True)
            sys.exit(e.code)
        raise
    sys.exit(0)


def _ignore_signals():
    """Exiting on a signal: a further Ctrl-C or SIGTERM must not cut the last line or change the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _out_of_memory_message(argv):
    """Out of memory, said without guessing a cause it cannot know (input files are bounded before reading)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "train":
        return ("out of memory while training: the model, data.batch_size or data.num_train may be too large "
                "for this machine")
    if command in ("eval", "predict", "bench"):
        return f"out of memory in fastcnn {command}: try a smaller --batch-size"
    return "out of memory"


def _resume_args(checkpoint):
    """The original command line with --resume pointing at the saved checkpoint."""
    args = sys.argv[2:] if len(sys.argv) > 2 else []
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        out.append(a)
    import shlex

    return [shlex.quote(a) for a in out] + ["--resume", shlex.quote(checkpoint)]


if __name__ == "__main__":
    main()
