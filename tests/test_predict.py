"""fastcnn predict: .npy batches and image files through a checkpoint, preprocessing, errors."""
import json
import os
import sys

import numpy as np
import pytest

from fastcnn import build_model, load_config
from fastcnn.checkpoint import load_checkpoint, save_checkpoint
from fastcnn.config import to_dict
from fastcnn.data import load_dataset
from fastcnn.evaluate import model_from_checkpoint
from fastcnn.predict import normalization_for, read_npy, softmax

from conftest import REPO, SMALL_CONFIG, run_cli

MNIST = os.path.join(REPO, "configs", "mnist.yaml")


@pytest.fixture(scope="module")
def trained(small_checkpoint):
    """A synthetic_small checkpoint (1 epoch), its model and config, and test images."""
    path = small_checkpoint
    checkpoint = load_checkpoint(path)
    cfg, model = model_from_checkpoint(checkpoint)
    ds = load_dataset("synthetic", input_shape=tuple(cfg.model.input_shape), num_classes=cfg.model.num_classes,
                      num_train=cfg.data.num_train, num_test=cfg.data.num_test, seed=cfg.seed)
    return {"path": path, "cfg": cfg, "model": model, "meta": checkpoint.meta, "x": ds.x_test[:10]}


def preprocess(trained, pixels):
    """What predict feeds the model for float pixels (whatever normalization the checkpoint carries)."""
    mean, std, _ = normalization_for(trained["cfg"], trained["meta"])
    return pixels if mean is None else (pixels - mean) / std


def test_npy_batch_agrees_with_forward(trained, tmp_path, capsys):
    x = trained["x"]
    path = tmp_path / "batch.npy"
    np.save(path, x)
    code, out, err = run_cli(["predict", trained["path"], str(path), "--json", "--top-k", "4", "--no-normalize"],
                             capsys)
    assert code == 0, err
    results = json.loads(out)
    assert [r["input"] for r in results] == [f"{path}[{i}]" for i in range(len(x))]
    logits = trained["model"].forward(x, training=False)
    probs = softmax(logits)
    for r, p in zip(results, probs):
        top = r["top"]
        assert len(top) == 4
        assert top[0]["class"] == int(np.argmax(p))
        assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-9)
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        for t in top:
            assert t["probability"] == pytest.approx(p[t["class"]], abs=1e-6)
            assert t["name"] == f"class_{t['class']}"

    # the default preprocessing (normalization from the checkpoint, when it has any) and --top-k 1
    code, out, err = run_cli(["predict", trained["path"], str(path), "--json", "--top-k", "1"], capsys)
    assert code == 0, err
    expected = trained["model"].forward(preprocess(trained, x), training=False).argmax(axis=1)
    assert [r["top"][0]["class"] for r in json.loads(out)] == expected.tolist()


def test_uint8_npy_shapes_and_text_output(trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 12, 12), dtype=np.uint8)
    np.save(tmp_path / "nhw.npy", pixels)
    np.save(tmp_path / "one_hw.npy", pixels[0])
    np.save(tmp_path / "one_hwc.npy", pixels[1][..., None])
    code, out, err = run_cli(["predict", trained["path"], str(tmp_path / "nhw.npy"), str(tmp_path / "one_hw.npy"),
                              str(tmp_path / "one_hwc.npy"), "--json"], capsys)
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 5 and results[3]["input"].endswith("one_hw.npy[0]")
    x = preprocess(trained, pixels[..., None].astype(np.float32) / 255)
    expected = trained["model"].forward(x, training=False).argmax(axis=1)
    got = [r["top"][0]["class"] for r in results]
    assert got[:3] == expected.tolist() and got[3] == expected[0] and got[4] == expected[1]

    code, out, err = run_cli(["predict", trained["path"], str(tmp_path / "one_hw.npy")], capsys)
    assert code == 0, err
    assert out.startswith(f"{tmp_path / 'one_hw.npy'}[0]") and "class_" in out and "%" in out


def test_png_inputs(trained, tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(12, 12), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.save(tmp_path / "gray.npy", gray)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.kron(gray, np.ones((2, 2), np.uint8))).save(tmp_path / "big.png")

    code, out, err = run_cli(["predict", trained["path"], str(tmp_path / "gray.png"), str(tmp_path / "rgb.png"),
                              str(tmp_path / "gray.npy"), "--json", "--top-k", "4"], capsys)
    assert code == 0, err
    png, rgb_png, npy = json.loads(out)
    assert png["input"] == str(tmp_path / "gray.png") and png["index"] is None
    for a, b in ((png, npy), (rgb_png, npy)):  # same pixels, same answer (RGB converted to gray)
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-5)

    code, _, err = run_cli(["predict", trained["path"], str(tmp_path / "big.png")], capsys)
    assert code == 2 and "big.png" in err and "24x24" in err and "--resize" in err
    code, out, err = run_cli(["predict", trained["path"], str(tmp_path / "big.png"), "--resize", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)) == 1


def test_mnist_preprocessing(tmp_path, capsys):
    """A checkpoint of an MNIST config (untrained): pixels/255, then (x - 0.1307) / 0.3081."""
    cfg = load_config(MNIST)
    model = build_model(cfg.model, seed=0)
    path = tmp_path / "mnist.npz"
    save_checkpoint(path, model.state_dict(), meta={"config": to_dict(cfg), "epoch": 0})
    pixels = np.random.default_rng(2).integers(0, 128, size=(4, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "digits.npy", pixels)
    code, out, err = run_cli(["predict", str(path), str(tmp_path / "digits.npy"), "--json", "--top-k", "10"], capsys)
    assert code == 0, err
    x = (pixels[..., None].astype(np.float32) / 255 - np.float32(0.1307)) / np.float32(0.3081)
    probs = softmax(model.forward(x, training=False))
    for r, p in zip(json.loads(out), probs):
        assert r["top"][0]["class"] == int(p.argmax())
        assert {t["name"] for t in r["top"]} == {str(i) for i in range(10)}
        for t in r["top"]:
            assert t["probability"] == pytest.approx(p[t["class"]], abs=1e-5)
    assert "Note:" not in err  # dark random noise: no warning, known statistics

    # a mostly bright image gets a hint to --invert
    np.save(tmp_path / "bright.npy", np.full((28, 28), 250, np.uint8))
    code, _, err = run_cli(["predict", str(path), str(tmp_path / "bright.npy")], capsys)
    assert code == 0 and "--invert" in err


def test_normalization_sources(trained):
    cfg = trained["cfg"]
    mean, std, source = normalization_for(cfg, {"data_stats": {"mean": [0.5], "std": [0.25]}})
    assert mean.tolist() == [0.5] and std.tolist() == [0.25] and "data_stats" in source
    mean, _, note = normalization_for(cfg, {})
    assert mean is None and "data_stats" in note and "255" in note
    mnist = load_config(MNIST)
    mean, std, _ = normalization_for(mnist, {})
    assert mean[0] == pytest.approx(0.1307) and std[0] == pytest.approx(0.3081)


def test_read_npy_layouts(tmp_path):
    shape = (12, 12, 1)
    for arr, n in ((np.zeros((5, 12, 12, 1)), 5), (np.zeros((5, 12, 12)), 5), (np.zeros((12, 12, 1)), 1),
                   (np.zeros((12, 12)), 1), (np.zeros((12, 12, 3)), 1)):
        np.save(tmp_path / "a.npy", arr)
        x = read_npy(str(tmp_path / "a.npy"), shape)
        assert x.ndim == 4 and len(x) == n and x.dtype == np.float32


@pytest.mark.parametrize("name, make, words", [
    ("missing.npy", None, "no such file"),
    ("garbage.npy", lambda p: p.write_bytes(os.urandom(64)), "not a valid .npy"),
    ("objects.npy", lambda p: np.save(p, np.array([{}], dtype=object), allow_pickle=True), "pickled"),
    ("rank5.npy", lambda p: np.save(p, np.zeros((1, 2, 12, 12, 1))), "shape (1, 2, 12, 12, 1)"),
    ("small.npy", lambda p: np.save(p, np.zeros((2, 8, 8), np.uint8)), "8x8"),
    ("text.npy", lambda p: np.save(p, np.array([["a"] * 12] * 12)), "not a number type"),
    ("nan.npy", lambda p: np.save(p, np.full((12, 12), np.nan, np.float32)), "NaN"),
    ("five.npy", lambda p: np.save(p, np.zeros((12, 12, 2), np.float32)), "2 channel(s)"),
    ("ck.npz", lambda p: np.savez(p, a=np.zeros(3)), ".npz"),
    ("fake.png", lambda p: p.write_bytes(b"not an image"), "not an image file"),
])
def test_bad_inputs_exit_2_with_one_line_naming_the_file(trained, tmp_path, capsys, name, make, words):
    if name.endswith(".png"):
        pytest.importorskip("PIL")
    path = tmp_path / name
    if make is not None:
        make(path)
    code, out, err = run_cli(["predict", trained["path"], str(path)], capsys)
    assert code == 2, err
    assert err.startswith("Error: ") and str(path) in err and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_pillow_names_the_extra(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    code, _, err = run_cli(["predict", trained["path"], str(tmp_path / "a.png")], capsys)
    assert code == 2 and "pip install 'fastcnn[images]'" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "a.npy", np.zeros((12, 12), np.uint8))  # .npy needs no Pillow
    code, _, err = run_cli(["predict", trained["path"], str(tmp_path / "a.npy")], capsys)
    assert code == 0, err


def test_bad_checkpoint(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((12, 12), np.uint8))
    code, _, err = run_cli(["predict", str(tmp_path / "none.npz"), str(tmp_path / "a.npy")], capsys)
    assert code == 2 and "checkpoint not found" in err


def test_data_stats_and_class_names_from_the_meta(tmp_path, capsys):
    """A checkpoint saved with meta data_stats (per channel) and class_names: both are used."""
    cfg = load_config(SMALL_CONFIG, ["model.input_shape=[12, 12, 3]"])
    model = build_model(cfg.model, seed=0)
    path = tmp_path / "rgb.npz"
    meta = {"config": to_dict(cfg), "data_stats": {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.2]},
            "class_names": ["cat", "dog", "emu", "fox"]}
    save_checkpoint(path, model.state_dict(), meta=meta)
    pixels = np.random.default_rng(3).integers(0, 256, size=(3, 12, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    code, out, err = run_cli(["predict", str(path), str(tmp_path / "x.npy"), "--json", "--top-k", "4"], capsys)
    assert code == 0, err
    x = (pixels.astype(np.float32) / 255 - np.float32([0.1, 0.2, 0.3])) / np.float32([0.5, 0.25, 0.2])
    probs = softmax(model.forward(x, training=False))
    for r, p in zip(json.loads(out), probs):
        assert r["top"][0]["class"] == int(p.argmax())
        assert r["top"][0]["name"] == ["cat", "dog", "emu", "fox"][int(p.argmax())]
        for t in r["top"]:
            assert t["probability"] == pytest.approx(p[t["class"]], abs=1e-5)
    assert "Note:" not in err
