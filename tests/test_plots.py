"""Plots: training curves (save_curves, fastcnn plot) and the confusion-matrix heatmap."""
import json
import os
import sys

import pytest

from fastcnn.plots import read_metrics, save_curves

from conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(folder, epochs=4):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 1 - 0.5 / e,
                                "val_loss": 1.2 / e, "val_accuracy": 1 - 0.6 / e}) + "\n")
    return folder


def test_save_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = write_metrics(tmp_path / "run")
    path = save_curves(run_dir)
    assert path == os.path.join(run_dir, "curves.png")
    data = open(path, "rb").read()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_save_curves_is_silent_without_matplotlib_or_metrics(tmp_path, monkeypatch):
    assert save_curves(tmp_path) is None  # no metrics.jsonl
    run_dir = write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert save_curves(run_dir) is None
    assert not (run_dir / "curves.png").exists()


def test_read_metrics_keeps_the_last_record_per_epoch_and_skips_broken_lines(tmp_path):
    run_dir = write_metrics(tmp_path / "run", epochs=2)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "val_accuracy": 0.99}) + "\n")
        f.write('{"epoch": 3, "val_acc')  # cut short by a crash
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'\n{"epoch": 4, "name": "\xff\xfe"}\n')  # not UTF-8
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["val_accuracy"] == 0.99


def test_read_metrics_refuses_a_huge_file_and_a_fifo(tmp_path, monkeypatch):
    from fastcnn import plots
    from fastcnn.errors import UserError

    run_dir = write_metrics(tmp_path / "run", epochs=3)
    monkeypatch.setattr(plots, "MAX_METRICS_BYTES", 100)
    with pytest.raises(UserError, match="cannot read .*metrics.jsonl"):
        read_metrics(run_dir / "metrics.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(UserError, match="cannot read .*fifo.jsonl"):
        read_metrics(tmp_path / "fifo.jsonl")


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = write_metrics(tmp_path / "run", epochs=1)
    code, out, err = run_cli(["plot", str(run_dir)], capsys)
    assert code == 0, err
    assert (run_dir / "curves.png").read_bytes().startswith(PNG_MAGIC) and "curves.png" in out
    code, out, err = run_cli(["plot", str(run_dir), "-o", str(tmp_path / "other.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "other.png").exists()


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "no such run folder"),
    (lambda p: p.mkdir(), "no metrics.jsonl"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("")), "no epoch record"),
])
def test_cli_plot_errors(tmp_path, capsys, make, words):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    make(run_dir)
    code, _, err = run_cli(["plot", str(run_dir)], capsys)
    assert code == 2 and err.startswith("Error: ") and words in err and len(err.strip().splitlines()) == 1


def test_cli_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    run_dir = write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(["plot", str(run_dir)], capsys)
    assert code == 2 and "pip install 'fastcnn[plot]'" in err and len(err.strip().splitlines()) == 1


def test_confusion_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    from fastcnn.plots import plot_confusion

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    matrix = [[90 if t == p else (t + p) % 3 for p in range(10)] for t in range(10)]
    path = plot_confusion(matrix, names, tmp_path / "cm.png", title="test")
    assert open(path, "rb").read().startswith(PNG_MAGIC)
