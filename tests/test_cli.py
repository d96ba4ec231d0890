"""The CLI end to end: train a small model on synthetic data, evaluate it, errors and exit codes."""
import json
import os

import numpy as np
import pytest

from fastcnn import __version__
from fastcnn.cli import main

from conftest import REPO

SMALL = os.path.join(REPO, "configs", "synthetic_small.yaml")


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_version_and_help(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and __version__ in out
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "train" in out and "eval" in out and "bench" in out
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0 and "--set" in out and "--resume" in out


def test_train_then_eval(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(["train", SMALL, "--set", f"output.dir={out_dir}", "--set", "train.epochs=1",
                          "--threads", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert "epoch 1/1" in out
    for name in ("last.npz", "best.npz", "metrics.jsonl", "config.yaml"):
        assert (out_dir / name).exists(), name
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and 0 <= record["val_accuracy"] <= 1 and record["images_per_sec"] > 0

    code, out, err = run(["eval", str(out_dir / "best.npz"), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["accuracy"] == pytest.approx(record["val_accuracy"])
    assert result["loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    assert len(result["per_class_accuracy"]) == 4

    code, out, _ = run(["eval", str(out_dir / "best.npz")], capsys)
    assert code == 0 and "accuracy" in out and "per-class" in out


def test_trained_model_learns_the_synthetic_task(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run(["train", SMALL, "--set", f"output.dir={out_dir}", "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert records[-1]["val_accuracy"] > 0.9  # 4 classes: chance is 0.25


def test_same_seed_same_weights(tmp_path, capsys):
    weights = []
    for name in ("a", "b"):
        out_dir = tmp_path / name
        code, _, err = run(["train", SMALL, "--set", f"output.dir={out_dir}", "--set", "train.epochs=1",
                            "--threads", "2", "--no-progress"], capsys)
        assert code == 0, err
        with np.load(out_dir / "last.npz", allow_pickle=False) as data:
            weights.append({k: data[k] for k in data.files if k.startswith("layers.")})
    for key in weights[0]:
        np.testing.assert_array_equal(weights[0][key], weights[1][key], err_msg=key)


@pytest.mark.parametrize("argv, words", [
    (["train", "/nonexistent/config.yaml"], "config file not found"),
    (["train", SMALL, "--set", "train.epoch=2"], "train.epoch: no such key"),
    (["train", SMALL, "--set", "model.layers[0].filters=0"], "model.layers[0].filters"),
    (["train", SMALL, "--set", "model.layers[3].pool_size=40"], "model.layers[3]"),
    (["eval", "/nonexistent/ck.npz"], "checkpoint not found"),
])
def test_user_mistakes_exit_2_with_one_line(argv, words, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("Error: ") and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_of_random_bytes(tmp_path, capsys):
    path = tmp_path / "x.npz"
    path.write_bytes(os.urandom(1000))
    code, _, err = run(["eval", str(path)], capsys)
    assert code == 2 and "not an .npz" in err
