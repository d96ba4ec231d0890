"""Interrupts, bit-exact resume, NaN handling, output-folder safety."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from fastcnn.checkpoint import load_checkpoint
from fastcnn.config import load_config
from fastcnn.data import loader as loader_module
from fastcnn.errors import UserError
from fastcnn.step import first_nonfinite_grad
from fastcnn.train import Interrupted, Trainer, TrainingDiverged

from conftest import REPO

SMALL = os.path.join(REPO, "configs", "synthetic_small.yaml")


def _cfg(out_dir, *extra):
    return load_config(SMALL, [f"output.dir={out_dir}", "train.epochs=3", "data.batch_size=16",
                               "train.threads=2", *extra])


def _train(cfg, **kw):
    return Trainer(cfg, progress=False, log=lambda *a: None, **kw).run()


def _weights(path):
    ck = load_checkpoint(path)
    return ck.model, ck.optim


@pytest.fixture
def signal_at(monkeypatch):
    """Make the loader raise a real signal at the given (epoch, batch): the handler then runs as for Ctrl-C."""
    def arm(signum, epoch, batch):
        original = loader_module.BatchLoader.epoch_batches

        def epoch_batches(self, e, start=0):
            for i, item in enumerate(original(self, e, start=start), start=start):
                if (e, i) == (epoch, batch):
                    signal.raise_signal(signum)
                yield item

        monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", epoch_batches)
        return original
    return arm


@pytest.mark.parametrize("signum, code, where", [(signal.SIGINT, 130, (1, 5)), (signal.SIGTERM, 143, (0, 15))])
def test_interrupt_then_resume_is_bit_exact(tmp_path, signal_at, monkeypatch, signum, code, where):
    reference_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _train(_cfg(reference_dir))
    original = signal_at(signum, *where)
    with pytest.raises(Interrupted) as info:
        _train(_cfg(run_dir))
    assert info.value.code == code
    meta = load_checkpoint(run_dir / "last.npz").meta
    assert (meta["epoch"], meta["batch"]) == (where[0], where[1] + 1)  # the step in flight was finished
    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", original)
    _train(_cfg(run_dir), resume=str(run_dir / "last.npz"))
    ref_model, ref_optim = _weights(reference_dir / "last.npz")
    model, optim = _weights(run_dir / "last.npz")
    assert model.keys() == ref_model.keys() and optim.keys() == ref_optim.keys()
    for key in ref_model:
        np.testing.assert_array_equal(model[key], ref_model[key], err_msg=key)
    for key in ref_optim:
        np.testing.assert_array_equal(optim[key], ref_optim[key], err_msg=key)
    history = [r["epoch"] for r in load_checkpoint(run_dir / "last.npz").meta["history"]]
    assert history == [1, 2, 3]


def test_real_sigint_saves_and_prints_resume_command(tmp_path):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastcnn.cli", "train", SMALL, "--set", f"output.dir={out_dir}",
           "--set", "train.epochs=1000", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("First training step"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Resume with: fastcnn train" in err and "--resume" in err and "Traceback" not in err
    meta = load_checkpoint(out_dir / "last.npz").meta
    assert meta["epoch"] < 1000


def test_refuses_to_overwrite_another_run(tmp_path):
    out_dir = tmp_path / "run"
    _train(_cfg(out_dir, "train.epochs=1"))
    with pytest.raises(UserError, match="already holds a run"):
        _train(_cfg(out_dir, "train.epochs=1"))
    before = (out_dir / "best.npz").stat().st_mtime_ns
    _train(_cfg(out_dir, "train.epochs=1"), overwrite=True)
    assert (out_dir / "best.npz").stat().st_mtime_ns != before


def test_resume_with_another_architecture_names_the_key(tmp_path):
    out_dir = tmp_path / "run"
    _train(_cfg(out_dir, "train.epochs=1"))
    with pytest.raises(UserError, match=r"layers.0.weight: shape \(3, 3, 1, 8\).*\(3, 3, 1, 6\)"):
        _train(_cfg(out_dir, "model.layers[0].filters=6"), resume=str(out_dir / "last.npz"))


def _inject_nan(monkeypatch, epoch, batch):
    original = loader_module.BatchLoader.epoch_batches

    def epoch_batches(self, e, start=0):
        for i, (xb, yb) in enumerate(original(self, e, start=start), start=start):
            if (e, i) == (epoch, batch):
                xb = xb.copy()
                xb[0, 0, 0, 0] = np.nan
            yield xb, yb

    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", epoch_batches)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    _inject_nan(monkeypatch, 1, 3)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 20 \(epoch 2, batch 4\): the (loss|gradient)"):
        _train(_cfg(out_dir))
    ck = load_checkpoint(out_dir / "last.npz")
    assert ck.meta["epoch"] == 1
    assert all(np.isfinite(v).all() for v in ck.model.values())


def test_nan_skip_counts_and_continues(tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    _inject_nan(monkeypatch, 0, 2)
    result = _train(_cfg(out_dir, "train.on_nan=skip"))
    assert result["skipped_steps"] == 1
    ck = load_checkpoint(out_dir / "last.npz")
    assert ck.meta["history"][-1]["skipped_steps"] == 1
    assert all(np.isfinite(v).all() for v in ck.model.values())  # running stats restored too


def test_first_nonfinite_grad_names_the_parameter():
    import fastcnn

    model = fastcnn.build_model(load_config(SMALL).model)
    assert first_nonfinite_grad(model) is None
    dict(model.named_parameters())["layers.5.weight"].grad[3, 1] = np.inf
    assert first_nonfinite_grad(model) == "layers.5.weight"


def test_unwritable_output_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="output.dir: cannot write"):
        _train(_cfg(blocker / "sub"))


def test_thread_count_does_not_change_the_weights(tmp_path):
    runs = []
    for threads in (1, 2):
        out_dir = tmp_path / f"t{threads}"
        _train(_cfg(out_dir, "train.epochs=1", f"train.threads={threads}"))
        runs.append(_weights(out_dir / "last.npz")[0])
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)


def _rewrite_meta(path, **changes):
    import json

    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(changes)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


@pytest.mark.parametrize("changes, words", [
    ({"epoch": "abc"}, "'epoch' must be an integer"),
    ({"batch": None}, "'batch' must be an integer"),
    ({"history": 5}, "'history' must be a list"),
    ({"best_accuracy": "best"}, "'best_accuracy' must be a number"),
    ({"running": {"loss": 1}}, "'running' must be null or a mapping"),
    ({"batch": 9999}, "saved at batch 9999 of an epoch of 16 batches"),
])
def test_resume_with_a_damaged_meta_is_a_clear_error(tmp_path, changes, words):
    out_dir = tmp_path / "run"
    _train(_cfg(out_dir, "train.epochs=1"))
    _rewrite_meta(out_dir / "last.npz", **changes)
    with pytest.raises(UserError, match=words):
        _train(_cfg(out_dir, "train.epochs=2"), resume=str(out_dir / "last.npz"))


def test_validation_fraction_leaving_nothing_is_a_config_error(tmp_path):
    from fastcnn.errors import ConfigError

    with pytest.raises(ConfigError, match="data.validation"):
        _train(_cfg(tmp_path / "v", "data.num_train=1", "data.validation=0.5"))
    assert not (tmp_path / "v").exists()  # a failed start leaves no output folder behind


def test_last_batch_of_one_with_batchnorm_after_dense(tmp_path):
    layers = ("model.layers=[{type: flatten}, {type: dense, units: 8}, {type: batchnorm}, {type: relu}, "
              "{type: dense, units: 4}]")
    result = _train(_cfg(tmp_path / "b", layers, "data.num_train=33", "train.epochs=1"))
    assert result["history"][0]["epoch"] == 1


def test_checkpoint_files_get_normal_permissions(tmp_path):
    import stat

    out_dir = tmp_path / "p"
    _train(_cfg(out_dir, "train.epochs=1"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out_dir / "last.npz").st_mode) == 0o666 & ~umask
