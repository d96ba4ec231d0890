"""Hostile and misplaced files: refused with one line (exit 2) before anything big is allocated,
never hanging on a FIFO, never reading /dev/zero to the end; a file or folder in the way of the
output, or an output folder moved away mid-run, is one line too."""
import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from fastcnn.checkpoint import load_checkpoint, save_checkpoint
from fastcnn.data import loader as loader_module
from fastcnn.errors import CheckpointError, DataError
from fastcnn.rundir import verify_run

from conftest import REPO, SMALL_CONFIG, run_cli


def argv(out_dir, *extra):
    return ["train", SMALL_CONFIG, "--set", f"output.dir={out_dir}", "--set", "train.epochs=3",
            "--set", "data.num_train=64", "--set", "data.batch_size=16", "--threads", "1", "--no-progress", *extra]


def one_line(err):
    assert err.startswith("Error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "memory" not in err
    return err.strip()


def at_batch(monkeypatch, epoch, batch, action):
    """Run ``action()`` when the loader reaches (epoch, batch), as if someone did it during training."""
    original = loader_module.BatchLoader.epoch_batches

    def epoch_batches(self, e, start=0):
        for i, item in enumerate(original(self, e, start=start), start=start):
            if (e, i) == (epoch, batch):
                action()
            yield item

    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", epoch_batches)


# -- in the way of the output ---------------------------------------------------------


def test_output_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    code, _, err = run_cli(argv(tmp_path / "run"), capsys)
    assert code == 2 and f"output.dir: {tmp_path / 'run'} is a file, not a folder" in one_line(err)


@pytest.mark.parametrize("name, extra, words", [
    ("metrics.jsonl", [], "metrics.jsonl is a folder, not a file; move it away (or pass --overwrite)"),
    ("last.npz", [], "last.npz is a folder, not a file; move it away (or pass --overwrite)"),
    ("config.yaml", ["--resume", "ELSEWHERE"], "config.yaml is a folder, not a file; move it away"),
])
def test_a_folder_in_the_way_is_reported_before_training(tmp_path, capsys, small_checkpoint, name, extra, words):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    extra = [small_checkpoint if e == "ELSEWHERE" else e for e in extra]
    code, text, err = run_cli(argv(out, *extra), capsys)
    assert code == 2 and words in one_line(err)
    assert "First training step" not in text


def test_overwrite_replaces_a_folder_in_the_way(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "last.npz").mkdir(parents=True)
    code, _, err = run_cli(argv(out, "--overwrite"), capsys)
    assert code == 0, err
    assert verify_run(str(out), complete=True) == []


def test_last_npz_becomes_a_folder_mid_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def block():
        os.unlink(out / "last.npz")
        (out / "last.npz").mkdir()

    at_batch(monkeypatch, 1, 0, block)
    code, _, err = run_cli(argv(out), capsys)
    assert code == 2
    assert (f"cannot write {out}/last.npz: a folder of that name is in the way (move it away); "
            f"best.npz (epoch 2) is intact in {out} (continue with --resume {out}/best.npz)") in one_line(err)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_output_folder_moved_away_mid_run(tmp_path, capsys, monkeypatch):
    out, moved = tmp_path / "run", tmp_path / "moved"
    at_batch(monkeypatch, 1, 0, lambda: os.rename(out, moved))
    code, _, err = run_cli(argv(out), capsys)
    assert code == 2
    assert re.search(rf"cannot write {out}/best.npz: the folder {out} no longer exists \(moved or deleted while "
                     rf"the run was writing\); the checkpoints written so far moved with it", one_line(err))
    assert verify_run(str(moved)) == []  # what was written is whole, where it went
    assert load_checkpoint(moved / "last.npz").meta["epoch"] == 1
    assert not (moved / ".fastcnn.lock").exists()  # the run's lock is released where its folder went


# -- hostile checkpoints -----------------------------------------------------------------


def _npy_bytes(array=None, header=None, data=b""):
    buffer = io.BytesIO()
    if header is None:
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def _rewrite(source, path, meta=None, members=None, compress=False):
    """A copy of checkpoint ``source`` at ``path`` with its meta and some members replaced (raw bytes)."""
    with np.load(source, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    raw = {f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()}
    if meta is not None:
        raw["meta.npy"] = _npy_bytes(np.array(meta))
    raw.update(members or {})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
                         compresslevel=1 if compress else None) as z:
        for name, value in raw.items():
            if callable(value):
                value(z, name)
            else:
                z.writestr(name, value)
    return path


def _commands(path, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((12, 12), np.float32))
    return [["eval", str(path)], ["predict", str(path), str(npy)],
            argv(tmp_path / "resumed", "--resume", str(path))]


def _check_refused(path, tmp_path, capsys, words):
    for cmd in _commands(path, tmp_path):
        tracemalloc.start()
        try:
            code, _, err = run_cli(cmd, capsys)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert code == 2, (cmd[0], err)
        assert re.search(words, one_line(err)), err
        assert peak < 64 << 20, f"{cmd[0]} allocated {peak:,} bytes before refusing the file"
    assert not (tmp_path / "resumed").exists()


def test_deeply_nested_meta(small_checkpoint, tmp_path, capsys):
    meta = json.loads(str(np.load(small_checkpoint)["meta"]))
    for depth in (100, 200_000):  # within and beyond Python's recursion limit
        meta["extra"] = json.loads("[" * 100 + "]" * 100) if depth == 100 else None
        text = json.dumps(meta) if depth == 100 else json.dumps(meta)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
        path = _rewrite(small_checkpoint, tmp_path / f"deep{depth}.npz", meta=text)
        _check_refused(path, tmp_path, capsys, r"corrupt 'meta' entry \(nests deeper than 64 levels\)")


def test_zip_bomb_is_refused_before_inflating(small_checkpoint, tmp_path, capsys):
    count = 75_000_000  # 300 MB of float32 zeros, about 1.3 MB compressed

    def bomb(z, name):
        with z.open(name, "w", force_zip64=True) as w:
            w.write(_npy_bytes(header={"descr": "<f4", "fortran_order": False, "shape": (count,)}))
            chunk = bytes(1 << 24)
            left = count * 4
            while left:
                w.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))

    path = _rewrite(small_checkpoint, tmp_path / "bomb.npz", members={"layers.0.weight.npy": bomb}, compress=True)
    assert path.stat().st_size < 4 << 20
    _check_refused(path, tmp_path, capsys, r"entries would inflate to 300,0\d\d,\d\d\d bytes, more than the .* "
                                           r"allowed for a file of .* bytes \(a zip bomb\?\)")


def test_npy_header_declaring_more_than_the_entry_holds(small_checkpoint, tmp_path, capsys):
    member = _npy_bytes(header={"descr": "<f4", "fortran_order": False, "shape": (10 ** 9,)}, data=bytes(64))
    path = _rewrite(small_checkpoint, tmp_path / "liar.npz", members={"layers.0.weight.npy": member})
    _check_refused(path, tmp_path, capsys, r"entry 'layers.0.weight': its header declares an array of shape "
                                           r"\(1000000000,\) \(4,000,000,000 bytes\), more than the \d+ bytes")


def test_meta_declaring_a_huge_model_is_refused_before_building_it(small_checkpoint, tmp_path, capsys):
    meta = json.loads(str(np.load(small_checkpoint)["meta"]))
    layers = meta["config"]["model"]["layers"]
    meta["config"]["model"]["layers"] = layers[:-1] + [{"type": "dense", "units": 1_000_000}, layers[-1]]
    path = _rewrite(small_checkpoint, tmp_path / "huge.npz", meta=json.dumps(meta))
    for cmd in _commands(path, tmp_path)[:2]:  # --resume builds the model of the config given, not the file's
        tracemalloc.start()
        try:
            code, _, err = run_cli(cmd, capsys)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert code == 2
        assert re.search(r"layers.5.weight: shape \(288, 4\) in the file, \(288, 1000000\) in its saved config",
                         one_line(err))
        assert peak < 64 << 20


def test_checkpoint_never_chooses_where_data_goes(tmp_path, capsys, monkeypatch):
    """eval finds data through --data-root, $FASTCNN_DATA or the cache; a checkpoint's data.root is ignored."""
    import fastcnn
    import fastcnn.data
    from fastcnn.config import to_dict, validate

    evil = tmp_path / "evil" / "root"
    cfg = validate({"model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]},
                    "data": {"dataset": "mnist", "root": str(evil)}})
    model = fastcnn.build_model(cfg.model)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, model.state_dict(), None, {"config": to_dict(cfg), "epoch": 1})
    seen = []

    def load_dataset(name, root=None, **kwargs):
        seen.append(root)
        raise DataError("stop here")

    monkeypatch.setattr(fastcnn.data, "load_dataset", load_dataset)
    monkeypatch.setenv("FASTCNN_DATA", str(tmp_path / "data"))
    code, _, err = run_cli(["eval", str(path)], capsys)
    assert code == 2 and seen == [None]
    assert f"the checkpoint's data.root '{evil}' is not used" in err
    code, _, err = run_cli(["eval", str(path), "--data-root", str(tmp_path / "mine")], capsys)
    assert seen[-1] == str(tmp_path / "mine")
    assert not (tmp_path / "evil").exists()


# -- hostile inputs and data files --------------------------------------------------------


def test_npy_input_with_a_hostile_header(small_checkpoint, tmp_path, capsys):
    path = tmp_path / "x.npy"
    path.write_bytes(_npy_bytes(header={"descr": "<f4", "fortran_order": False, "shape": (10 ** 7, 12, 12)},
                                data=bytes(64)))
    code, _, err = run_cli(["predict", small_checkpoint, str(path)], capsys)
    assert code == 2
    assert "its header declares an array of shape (10000000, 12, 12)" in one_line(err)


def test_npz_dataset_with_a_hostile_header(tmp_path):
    from fastcnn.data.arrays import load_npz

    path = tmp_path / "d.npz"
    members = {"x_train.npy": _npy_bytes(header={"descr": "|u1", "fortran_order": False,
                                                 "shape": (10 ** 6, 1000, 1000)}, data=bytes(64))}
    for key in ("y_train", "x_test", "y_test"):
        members[f"{key}.npy"] = _npy_bytes(np.zeros(2, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        for name, value in members.items():
            z.writestr(name, value)
    with pytest.raises(DataError, match="entry 'x_train': its header declares an array of shape"):
        load_npz(path)


def test_idx_gzip_declaring_a_huge_array(tmp_path):
    import gzip

    from fastcnn.data.idx import read_idx

    path = tmp_path / "big-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(s.to_bytes(4, "big") for s in (100_000, 1000, 1000))
    path.write_bytes(gzip.compress(header + bytes(1 << 20)))
    with pytest.raises(DataError, match=r"declares shape \(100000, 1000, 1000\) \(100,000,000,000 bytes\), more"):
        read_idx(path)


def test_fifo_and_devices_are_refused_not_read(tmp_path, small_checkpoint):
    """In a subprocess with a timeout: were the FIFO opened for reading, it would block forever."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    cases = [["train", str(fifo)], ["summary", str(fifo)], ["eval", str(fifo)],
             ["train", "/dev/zero"], ["summary", "/dev/zero"], ["eval", "/dev/zero"],
             ["predict", small_checkpoint, "/dev/zero"], ["train", SMALL_CONFIG, "--resume", str(fifo)]]
    script = ("import sys, json; from fastcnn.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    try:\n        main(argv)\n    except SystemExit as e:\n        print(e.code, flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split() == ["2"] * len(cases), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(cases) and "Traceback" not in proc.stderr
    assert "is a FIFO (named pipe), not a YAML file" in lines[0] and "is a device, not a YAML file" in lines[3]
    assert "a FIFO (named pipe), not a regular file" in lines[2] and "a character device" in lines[5]


def test_a_huge_set_value_is_not_echoed_in_full(capsys):
    code, _, err = run_cli(["summary", SMALL_CONFIG, "--set", "model.layers[0].filters=" + "x" * 100_000], capsys)
    assert code == 2 and len(one_line(err)) < 1000
    assert "model.layers[0].filters" in err and "characters" in err


@pytest.mark.parametrize("yaml_text, words", [
    ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]\n" for p, k in zip("abcdefgh", "bcdefghi")),
     "expands to more than 1,000,000 values"),
    ("a: &a [*a]\n", "recursive structure"),
    ("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "nests too deeply"),
])
def test_hostile_yaml_configs(tmp_path, capsys, yaml_text, words):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    code, _, err = run_cli(["summary", str(path)], capsys)
    assert code == 2 and words in one_line(err)


def test_out_of_memory_message_does_not_guess_the_cause():
    from fastcnn.cli import _out_of_memory_message

    assert "batch_size" not in _out_of_memory_message(["summary", "x.yaml"])
    assert "data.batch_size" not in _out_of_memory_message(["eval", "x.npz"])
    assert "data.batch_size" in _out_of_memory_message(["train", "x.yaml"])


def test_checkpoint_that_is_a_fifo_is_refused_in_process(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "ck.npz"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="a FIFO"):
        load_checkpoint(fifo)



PLATEAU = ["--set", "train.schedule={name: reduce_on_plateau, patience: 1}",
           "--set", "train.early_stopping={patience: 3}"]


@pytest.fixture(scope="module")
def plateau_checkpoint(tmp_path_factory):
    """last.npz of a 1-epoch run with a plateau schedule and early stopping (their state in its meta)."""
    from fastcnn.cli import main

    out = tmp_path_factory.mktemp("plateau") / "run"
    with pytest.raises(SystemExit) as info:
        main(argv(out, "--set", "train.epochs=1", *PLATEAU))
    assert info.value.code == 0
    return out / "last.npz"


@pytest.mark.parametrize("change, words", [
    (lambda c: c.meta["schedule"].update(current="abc"), r"'current' must be a finite number >= 0.0, got 'abc'"),
    (lambda c: c.meta["schedule"].update(current=[1]), r"'current' must be a finite number"),
    (lambda c: c.meta["schedule"].update(current=-5.0), r"'current' must be a finite number >= 0.0, got -5.0"),
    (lambda c: c.meta["schedule"].update(bad_epochs=1.5), r"'bad_epochs' must be a count"),
    (lambda c: c.meta["early_stopping"].update(best="x"), r"'best' must be a finite number, got 'x'"),
    (lambda c: c.optim.update(step=np.array(2 ** 64 - 1, np.uint64)), r"'optim.step' is 18446744073709551615"),
    (lambda c: c.optim.update(step=np.array(-1)), r"'optim.step' is -1, not a step count"),
    (lambda c: c.optim.update(lr=np.array(np.nan)), r"'optim.lr' is nan, not a learning rate"),
    (lambda c: c.optim["0.momentum_buffer"].__setitem__((0, 0, 0, 0), np.nan),
     r"optim.0.momentum_buffer holds NaN or Inf \(a damaged checkpoint\)"),
])
def test_damaged_optimizer_and_schedule_state_is_refused_at_resume(plateau_checkpoint, tmp_path, capsys,
                                                                   change, words):
    checkpoint = load_checkpoint(plateau_checkpoint)
    change(checkpoint)
    path = tmp_path / "damaged.npz"
    save_checkpoint(path, checkpoint.model, checkpoint.optim, checkpoint.meta)
    code, _, err = run_cli(argv(tmp_path / "resumed", "--resume", str(path), "--set", "train.epochs=2", *PLATEAU),
                           capsys)
    assert code == 2, err
    assert one_line(err).startswith(f"Error: --resume {path}: ") and re.search(words, one_line(err)), err
    assert not (tmp_path / "resumed").exists()


def test_resuming_a_finished_run_elsewhere_says_there_is_nothing_to_train(small_checkpoint, tmp_path, capsys):
    last = os.path.join(os.path.dirname(small_checkpoint), "last.npz")
    epochs = load_checkpoint(last).meta["epoch"]
    code, out, err = run_cli(argv(tmp_path / "again", "--resume", last, "--set", f"train.epochs={epochs}"), capsys)
    assert code == 0, err
    assert f"Nothing to train: {last} is at the end of epoch {epochs} and train.epochs is {epochs}" in out
    assert "checkpoints in" not in out and f"no checkpoint written to {tmp_path / 'again'}" in out
