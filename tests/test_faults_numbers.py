"""Numbers that are not numbers: strict JSON everywhere (NaN/Inf as null), a checkpoint meta that keeps
them exactly, an epoch whose every step was skipped stops the run, and divergence messages that say
which checkpoint really is kept."""
import json
import math

import numpy as np
import pytest

from fastcnn.checkpoint import load_checkpoint, save_checkpoint
from fastcnn.data import loader as loader_module
from fastcnn.rundir import verify_run
from fastcnn.train import metrics_text

from conftest import SMALL_CONFIG, run_cli


def argv(out_dir, *extra):
    return ["train", SMALL_CONFIG, "--set", f"output.dir={out_dir}", "--set", "train.epochs=3",
            "--set", "data.num_train=64", "--set", "data.batch_size=16", "--threads", "1", "--no-progress", *extra]


def strict(text):
    def reject(constant):
        raise ValueError(f"bare {constant}")
    return json.loads(text, parse_constant=reject)


def nan_batches(monkeypatch, epochs, batches=None):
    original = loader_module.BatchLoader.epoch_batches

    def epoch_batches(self, e, start=0):
        for i, (xb, yb) in enumerate(original(self, e, start=start), start=start):
            if e in epochs and (batches is None or i in batches):
                xb = xb.copy()
                xb[0, 0, 0, 0] = np.nan
            yield xb, yb

    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", epoch_batches)


def test_an_epoch_with_every_step_skipped_stops_the_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_batches(monkeypatch, {1})
    code, text, err = run_cli(argv(out, "--set", "train.on_nan=skip"), capsys)
    assert code == 1
    line = err.strip()
    assert line.startswith("Error: every step of epoch 2 was skipped (train.on_nan: skip; 4 step(s) skipped")
    assert "last.npz (end of epoch 1) and best.npz (epoch 1) are intact" in line and len(line.splitlines()) == 1
    assert "epoch 2/3" not in text  # no epoch line with a made-up loss of 0.0000
    assert load_checkpoint(out / "last.npz").meta["epoch"] == 1
    assert verify_run(str(out)) == []


def test_some_skipped_steps_still_train(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_batches(monkeypatch, {1}, {0, 1, 2})
    code, _, err = run_cli(argv(out, "--set", "train.on_nan=skip"), capsys)
    assert code == 0, err
    assert [r["skipped_steps"] for r in load_checkpoint(out / "last.npz").meta["history"]] == [0, 3, 3]


def test_divergence_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_batches(monkeypatch, {0}, {2})
    code, _, err = run_cli(argv(out), capsys)
    assert code == 1
    assert "training diverged at step 3 (epoch 1, batch 3)" in err
    assert f"no checkpoint was written yet; {out} holds none" in err and "last good" not in err


def test_divergence_later_names_the_checkpoints_kept(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_batches(monkeypatch, {2}, {0})
    code, _, err = run_cli(argv(out), capsys)
    assert code == 1
    assert f"last.npz (end of epoch 2) and best.npz (epoch 2) are intact in {out}" in err


def test_non_finite_metrics_are_null_in_metrics_jsonl_and_exact_in_the_checkpoint(tmp_path, capsys, monkeypatch):
    from fastcnn import train as train_module

    original = train_module.evaluate

    def evaluate(model, x, y, batch_size=500, **kwargs):  # (kwargs: e.g. the trainer's process group)
        result = original(model, x, y, batch_size, **kwargs)
        result["loss"] = float("nan")
        return result

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    out = tmp_path / "run"
    code, _, err = run_cli(argv(out, "--set", "train.schedule={name: reduce_on_plateau}"), capsys)
    assert code == 0, err
    records = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records] == [None, None, None]
    with np.load(out / "last.npz", allow_pickle=False) as data:
        strict(str(data["meta"]))  # the meta is strict JSON too
    meta = load_checkpoint(out / "last.npz").meta
    assert math.isnan(meta["history"][0]["val_loss"])  # and reads back as the float it was
    assert verify_run(str(out), complete=True) == []


def test_checkpoint_meta_round_trips_non_finite_numbers(tmp_path):
    path = tmp_path / "c.npz"
    meta = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": {"__float__": "x"}}
    save_checkpoint(path, {"layers.0.weight": np.zeros(2, np.float32)}, None, meta)
    got = load_checkpoint(path).meta
    assert math.isnan(got["a"]) and got["b"] == [float("inf"), -float("inf"), 1.5] and got["c"] == {"__float__": "x"}


def test_metrics_text_is_strict_json():
    text = metrics_text([{"epoch": 1, "val_loss": float("nan"), "train_loss": float("inf"), "lr": np.float32(0.5)}])
    assert strict(text) == {"epoch": 1, "val_loss": None, "train_loss": None, "lr": 0.5}


def test_eval_json_of_a_model_with_non_finite_loss(small_checkpoint, tmp_path, capsys):
    with np.load(small_checkpoint, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["layers.5.weight"] = (arrays["layers.5.weight"] * np.float32(3e37)).astype(np.float32)
    path = tmp_path / "big.npz"
    np.savez(path, **arrays)
    code, out, err = run_cli(["eval", str(path), "--json"], capsys)
    assert code == 0, err
    result = strict(out)
    assert result["loss"] is None and 0 <= result["accuracy"] <= 1
    code, out, err = run_cli(["eval", str(path)], capsys)
    assert code == 0 and "loss nan" in out


@pytest.mark.parametrize("command", ["summary", "bench"])
def test_other_json_output_is_strict(command, capsys):
    argv = [command, SMALL_CONFIG, "--json"] + (["--repeats", "1", "--batch-size", "2"] if command == "bench" else [])
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    strict(out)


def test_an_update_that_overflows_the_weights_is_never_saved(tmp_path, capsys):
    """lr 1e300 (a finite config value; Inf in float32): the first update makes the weights Inf while that
    step's loss and gradients were finite. The epoch's end stops the run with one line; nothing is saved."""
    out = tmp_path / "run"
    code, text, err = run_cli(argv(out, "--set", "train.optimizer.lr=1e300", "--set", "data.batch_size=64"), capsys)
    assert code == 1
    assert err.startswith("Error: training diverged in epoch 1: the updates made layers.") and "NaN or Inf" in err
    assert f"no checkpoint was written yet; {out} holds none" in err
    assert len(err.strip().splitlines()) == 1, err  # no NumPy overflow warnings either
    assert "epoch 1/3" not in text  # no epoch line, no validation of Inf weights
    assert not (out / "last.npz").exists() and not (out / "best.npz").exists()


def test_weights_made_inf_in_a_later_epoch_keep_the_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    from fastcnn import optim

    original = optim.SGD.step

    def step(self):
        original(self)
        if self.step_count == 8:  # the last step of epoch 2 (4 steps per epoch): no step sees its loss
            self.params[0].data[0] = np.inf

    monkeypatch.setattr(optim.SGD, "step", step)
    out = tmp_path / "run"
    code, _, err = run_cli(argv(out), capsys)
    assert code == 1
    assert "training diverged in epoch 2: the updates made layers.0.weight" in err
    assert f"last.npz (end of epoch 1) and best.npz (epoch 1) are intact in {out}" in err
    assert load_checkpoint(out / "last.npz").meta["epoch"] == 1
    assert verify_run(str(out)) == []
