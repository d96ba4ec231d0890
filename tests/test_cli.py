"""The CLI end to end: train a small model on synthetic data, evaluate it, errors and exit codes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastcnn import __version__

from conftest import REPO, SMALL_CONFIG, run_cli

SMALL = SMALL_CONFIG


def test_version_and_help(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and __version__ in out
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "train" in out and "eval" in out and "bench" in out
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and "--set" in out and "--resume" in out


def test_train_then_eval(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", SMALL, "--set", f"output.dir={out_dir}", "--set", "train.epochs=1",
                              "--threads", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert "epoch 1/1" in out
    for name in ("last.npz", "best.npz", "metrics.jsonl", "config.yaml"):
        assert (out_dir / name).exists(), name
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and 0 <= record["val_accuracy"] <= 1 and record["images_per_sec"] > 0

    code, out, err = run_cli(["eval", str(out_dir / "best.npz"), "--json", "--threads", "1"], capsys)
    assert code == 0, err
    result = json.loads(out)
    # One evaluation function for the trainer's validation and `fastcnn eval`: the very same numbers.
    assert result["accuracy"] == record["val_accuracy"] and result["loss"] == record["val_loss"]
    assert len(result["per_class_accuracy"]) == 4

    code, out, _ = run_cli(["eval", str(out_dir / "best.npz")], capsys)
    assert code == 0 and "accuracy" in out and "per-class" in out


def test_trained_model_learns_the_synthetic_task(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(["train", SMALL, "--set", f"output.dir={out_dir}", "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert records[-1]["val_accuracy"] > 0.9  # 4 classes: chance is 0.25


def test_same_seed_same_weights(tmp_path, capsys):
    weights = []
    for name in ("a", "b"):
        out_dir = tmp_path / name
        code, _, err = run_cli(["train", SMALL, "--set", f"output.dir={out_dir}", "--set", "train.epochs=1",
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
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("Error: ") and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_of_random_bytes(tmp_path, capsys):
    path = tmp_path / "x.npz"
    path.write_bytes(os.urandom(1000))
    code, _, err = run_cli(["eval", str(path)], capsys)
    assert code == 2 and "not an .npz" in err


# -- confusion matrix (fastcnn eval) ---------------------------------------------


def test_eval_confusion_matrix(small_checkpoint, capsys):
    code, out, err = run_cli(["eval", small_checkpoint, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    cm = np.array(result["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == result["count"] == 64
    rows = cm.sum(axis=1)
    np.testing.assert_allclose(np.diag(cm) / rows, result["per_class_accuracy"])
    assert np.trace(cm) / cm.sum() == pytest.approx(result["accuracy"])

    code, out, err = run_cli(["eval", small_checkpoint], capsys)
    assert code == 0, err
    assert "confusion matrix" in out and "true \\ pred" in out
    table = out[out.index("true \\ pred"):].splitlines()
    assert table[0].split()[-4:] == ["class_0", "class_1", "class_2", "class_3"]
    assert len(table) == 5 and table[1].split()[0] == "class_0"


def test_eval_confusion_matrix_against_the_model(small_checkpoint):
    """Rows: true class, columns: predicted class, as model.predict gives them."""
    from fastcnn.checkpoint import load_checkpoint
    from fastcnn.data import load_dataset
    from fastcnn.evaluate import evaluate_checkpoint, model_from_checkpoint

    cfg, model = model_from_checkpoint(load_checkpoint(small_checkpoint))
    ds = load_dataset("synthetic", input_shape=tuple(cfg.model.input_shape), num_classes=4,
                      num_train=cfg.data.num_train, num_test=cfg.data.num_test, seed=cfg.seed)
    pred = model.predict(ds.x_test).argmax(axis=1)
    expected = np.zeros((4, 4), np.int64)
    for t, p in zip(ds.y_test, pred):
        expected[t, p] += 1
    result = evaluate_checkpoint(small_checkpoint, batch_size=7)
    np.testing.assert_array_equal(result["confusion_matrix"], expected)


def test_format_confusion_is_compact():
    from fastcnn.evaluate import format_confusion

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    cm = np.eye(10, dtype=np.int64) * 1000
    cm[6, 0] = 123
    lines = format_confusion(cm, names).splitlines()
    assert len(lines) == 11 and max(len(line) for line in lines) <= 100
    assert "T-shirt" in lines[0] and lines[7].lstrip().startswith("Shirt") and "123" in lines[7]


def test_eval_plot(small_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "cm.png"
    code, out, err = run_cli(["eval", small_checkpoint, "--plot", str(path)], capsys)
    assert code == 0, err
    assert path.read_bytes().startswith(b"\x89PNG") and str(path) in out


def test_eval_plot_to_a_missing_folder(small_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # without it, the missing extra is reported first
    code, _, err = run_cli(["eval", small_checkpoint, "--plot", str(tmp_path / "no" / "cm.png")], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_eval_plot_without_matplotlib_names_the_extra(small_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(["eval", small_checkpoint, "--plot", str(tmp_path / "cm.png")], capsys)
    assert code == 2 and "pip install 'fastcnn[plot]'" in err and len(err.strip().splitlines()) == 1


def test_new_commands_in_help(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and all(word in out for word in ("summary", "predict", "plot"))
    code, out, _ = run_cli(["predict", "--help"], capsys)
    assert code == 0 and "--top-k" in out and "fastcnn[images]" in out


@pytest.mark.parametrize("argv, code, words", [
    (["--version"], 0, f"fastcnn, version {__version__}"),
    (["eval", "/nonexistent/ck.npz"], 2, "Error: checkpoint not found: /nonexistent/ck.npz"),
])
def test_python_dash_m_fastcnn_is_the_fastcnn_command(argv, code, words):
    proc = subprocess.run([sys.executable, "-m", "fastcnn", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == code, proc.stderr
    assert words in (proc.stdout if code == 0 else proc.stderr)
    if code:
        assert len(proc.stderr.strip().splitlines()) == 1
