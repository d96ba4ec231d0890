"""The ``fastcnn`` command: train, eval, bench.

Nothing heavy is imported at module level: ``fastcnn --help`` answers at once
and no kernel is compiled until a command needs it.
"""
import json
import sys
import time

import click

from . import __version__

_STARTED = time.perf_counter()

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _error(message):
    click.echo(f"Error: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastcnn")
def cli():
    """Train convolutional networks fast on a multicore CPU.

    \b
    Quick start:
      fastcnn train configs/mnist.yaml          # train; writes runs/mnist/
      fastcnn eval runs/mnist/best.npz          # score the best checkpoint
      fastcnn bench                             # time the CPU kernels

    Data is read from data.root in the config, else $FASTCNN_DATA, else
    ~/.cache/fastcnn (downloaded there when missing and online).
    """


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.epochs=1 --set model.layers[0].filters=16. Repeatable.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue from a checkpoint (RUN_DIR/last.npz), mid-epoch too.")
@click.option("--overwrite", is_flag=True, help="Replace the checkpoints of an earlier run in output.dir.")
@click.option("--threads", type=int, default=None, help="Kernel threads (default: train.threads, else all cores).")
@click.option("--no-progress", is_flag=True, help="No progress bars (log lines only).")
def train(config, overrides, resume, overwrite, threads, no_progress):
    """Train the network described in the YAML file CONFIG.

    Writes metrics.jsonl, last.npz, best.npz (best validation accuracy) and
    the resolved config.yaml to output.dir. Ctrl-C finishes the current step,
    saves last.npz and prints the command that resumes. A run never replaces
    another run's checkpoints unless --overwrite (or --resume) says so.
    """
    from .config import load_config
    from .train import Trainer

    if threads is not None:
        overrides = (*overrides, f"train.threads={threads}")
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, progress=not no_progress, log=click.echo,
                      started=_STARTED)
    result = trainer.run()
    if result["best_accuracy"] is not None:
        click.echo(f"Best validation accuracy {result['best_accuracy']:.4f}; "
                   f"checkpoints in {result['output_dir']} (evaluate: fastcnn eval {result['output_dir']}/best.npz)")


@cli.command(name="eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding the datasets (default: the checkpoint's data.root, $FASTCNN_DATA, the cache).")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--threads", type=int, default=None, help="Kernel threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (accuracy, loss, per_class_accuracy).")
def eval_(checkpoint, data_root, batch_size, threads, as_json):
    """Score a trained CHECKPOINT on its dataset's test split."""
    from .evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data_root=data_root, batch_size=batch_size, threads=threads)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['dataset']} test set, {result['count']} images")
    click.echo(f"accuracy {result['accuracy']:.4f}   loss {result['loss']:.4f}")
    click.echo("per-class accuracy:")
    for name, acc in zip(result["class_names"], result["per_class_accuracy"]):
        click.echo(f"  {name:>12}  {'-' if acc is None else f'{acc:.4f}'}")


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
        click.echo(json.dumps(report))
    else:
        print_report(report, click.echo)


def main(argv=None):
    """Console entry point: user mistakes -> one line and exit 2; interrupts -> 130/143."""
    from .errors import UserError

    try:
        cli.main(args=argv, prog_name="fastcnn", standalone_mode=False)
    except click.exceptions.Abort:
        _error("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except UserError as e:
        _error(str(e))
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence
        from .train import Interrupted, TrainingDiverged

        if isinstance(e, TrainingDiverged):
            _error(str(e))
            sys.exit(EXIT_INTERNAL)
        if isinstance(e, Interrupted):
            click.echo(f"\nInterrupted: saved {e.checkpoint}", err=True)
            click.echo(f"Resume with: fastcnn train {' '.join(_resume_args(e.checkpoint))}", err=True)
            sys.exit(e.code)
        raise
    sys.exit(0)


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
