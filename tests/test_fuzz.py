"""Fuzzing: random configs, --set strings and checkpoint bytes get the documented error, never a traceback."""
import os

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcnn.checkpoint import load_checkpoint, save_checkpoint
from fastcnn.config import load_config
from fastcnn.errors import CheckpointError, ConfigError
from fastcnn.evaluate import model_from_checkpoint

from conftest import REPO

SETTINGS = settings(max_examples=int(os.environ.get("FASTCNN_FUZZ_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = ["model", "data", "train", "output", "seed", "layers", "type", "filters", "kernel_size", "stride",
        "padding", "units", "dataset", "batch_size", "epochs", "optimizer", "name", "lr", "input_shape",
        "num_classes", "pool_size", "momentum", "conv2d", "dense", "relu", "flatten", "mnist", "synthetic", "same"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(KEYS), st.text(max_size=6))
structures = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)


def _plausible():
    """Mostly-valid configs with one random part, so validation gets deep before failing."""
    layer = st.fixed_dictionaries({"type": st.sampled_from(["conv2d", "maxpool2d", "relu", "flatten", "dense",
                                                            "batchnorm", "leaky_relu", "bogus"])},
                                  optional={k: scalars for k in ["filters", "kernel_size", "stride", "padding",
                                                                 "units", "pool_size", "dilation"]})
    return st.fixed_dictionaries({
        "model": st.fixed_dictionaries({"layers": st.lists(layer, min_size=1, max_size=6)},
                                       optional={"input_shape": st.lists(st.integers(-1, 30), max_size=4),
                                                 "num_classes": scalars}),
        "data": st.fixed_dictionaries({"dataset": st.sampled_from(["synthetic", "mnist", "x"])},
                                      optional={"batch_size": scalars, "validation": scalars}),
    }, optional={"train": structures, "seed": scalars})


@SETTINGS
@given(raw=st.one_of(structures, _plausible()))
def test_random_config_structures(raw, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_yaml_text(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError:
        pass


@SETTINGS
@given(items=st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
        ["train.epochs", "model.layers[0].filters", "model.layers[9].units", "data.batch_size", "seed",
         "train.optimizer.lr", "train.optimizer.name", "model.layers", "data", "model.layers[0]", "x.y", "a[",
         "model.layers[1].type", "output.dir", "train.optimizer", "model.input_shape[0]"]),
        st.one_of(st.text(max_size=10), st.sampled_from(["1", "-1", "0.5", "[1, 2]", "{a: 1}", "null", "sgd",
                                                         "true", "'[", "1e9"])))), max_size=4))
def test_random_set_overrides(items):
    try:
        load_config(f"{REPO}/configs/synthetic_small.yaml", items)
    except ConfigError as e:
        assert str(e)


def _good_checkpoint_bytes():
    import tempfile

    from fastcnn.config import to_dict
    from fastcnn.model import build_model

    cfg = load_config(f"{REPO}/configs/synthetic_small.yaml")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "c.npz")
        save_checkpoint(path, build_model(cfg.model).state_dict(), {"step": np.array(0)},
                        {"config": to_dict(cfg), "epoch": 1})
        with open(path, "rb") as f:
            return f.read()


GOOD = _good_checkpoint_bytes()


def _load_any(data, tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(data)
    try:
        model_from_checkpoint(load_checkpoint(path))
    except CheckpointError as e:
        assert str(e) and "\n" not in str(e)


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_random_bytes(data, tmp_path):
    _load_any(data, tmp_path)


@SETTINGS
@given(cut=st.integers(0, len(GOOD)), flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1),
                                                                st.integers(0, 255)), max_size=6))
def test_mutated_checkpoints(cut, flips, tmp_path):
    data = bytearray(GOOD)
    for pos, value in flips:
        data[pos] = value
    _load_any(bytes(data[:cut] if cut < len(GOOD) // 2 else data), tmp_path)


def test_the_unmutated_checkpoint_loads(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(GOOD)
    cfg, model = model_from_checkpoint(load_checkpoint(path))
    assert model.num_classes == cfg.model.num_classes


def test_checkpoint_with_wrong_shapes_or_missing_keys(tmp_path):
    ck_path = tmp_path / "c.npz"
    ck_path.write_bytes(GOOD)
    ck = load_checkpoint(ck_path)
    state = dict(ck.model)
    state["layers.0.weight"] = np.zeros((2, 2), np.float32)
    save_checkpoint(ck_path, state, meta=ck.meta)
    try:
        model_from_checkpoint(load_checkpoint(ck_path))
    except CheckpointError as e:
        assert "layers.0.weight" in str(e) and "(2, 2)" in str(e)
    else:
        raise AssertionError("a wrong shape was accepted")
    del state["layers.0.weight"]
    save_checkpoint(ck_path, state, meta=ck.meta)
    try:
        model_from_checkpoint(load_checkpoint(ck_path))
    except CheckpointError as e:
        assert "missing key 'layers.0.weight'" in str(e)
    else:
        raise AssertionError("a missing key was accepted")
