"""Checkpoints: atomic save, faithful load, clear errors, never unpickle."""
import json
import os

import numpy as np
import pytest

from fastcnn.atomicio import atomic_write_bytes
from fastcnn.checkpoint import load_checkpoint, save_checkpoint
from fastcnn.errors import CheckpointError


def _state():
    return {"layers.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "layers.0.bias": np.ones(3)}


def test_round_trip(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _state(), {"step": np.array(3), "0.exp_avg": np.zeros(2)}, {"epoch": 2})
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.model["layers.0.weight"], _state()["layers.0.weight"])
    assert ck.model["layers.0.weight"].dtype == np.float32
    assert int(ck.optim["step"]) == 3 and ck.optim["0.exp_avg"].shape == (2,)
    assert ck.meta["epoch"] == 2 and "fastcnn_version" in ck.meta
    # Plain numpy reads it without pickle.
    with np.load(path, allow_pickle=False) as data:
        assert json.loads(str(data["meta"]))["epoch"] == 2


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _state(), meta={"epoch": 1})
    good = path.read_bytes()

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]  # no temporary file left behind


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(os.urandom(300)), "not an .npz"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(300)), "not a valid checkpoint"),
    (lambda p: np.savez(p, **{"layers.0.weight": np.zeros(2)}), "no 'meta'"),
    (lambda p: np.savez(p, meta=np.array("{not json"), **{"layers.0.weight": np.zeros(2)}), "corrupt 'meta'"),
    (lambda p: np.savez(p, meta=np.array("{}"), **{"layers.0.weight": np.array([{"a": 1}], dtype=object)}),
     "pickled"),
])
def test_bad_files_give_clear_errors(tmp_path, make, words):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"layers.0.weight": np.random.default_rng(0).normal(size=(50, 50))}, meta={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        load_checkpoint(path)


def test_zip_member_that_is_not_an_array(tmp_path):
    import zipfile

    path = tmp_path / "c.npz"
    save_checkpoint(path, _state(), meta={"epoch": 1})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("layers.9.weight.npy", b"xx")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
