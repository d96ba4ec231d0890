"""Config loading, validation and --set overrides."""
import pytest
import yaml

import fastcnn
from fastcnn.config import load_config, to_yaml, validate
from fastcnn.errors import ConfigError

from conftest import REPO


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def _minimal(**extra):
    raw = {"model": {}, "data": {"dataset": "synthetic"}}
    raw.update(extra)
    return raw


def test_defaults_are_the_design_values():
    cfg = validate({"model": {}, "data": {"dataset": "mnist"}})
    assert cfg.seed == 0
    assert cfg.model.input_shape == [28, 28, 1] and cfg.model.num_classes == 10
    assert [layer["type"] for layer in cfg.model.layers][:3] == ["conv2d", "relu", "maxpool2d"]
    assert cfg.data.batch_size == 64 and cfg.data.validation == "test" and cfg.data.root is None
    assert cfg.train.epochs == 5 and cfg.train.optimizer == {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999],
                                                              "eps": 1e-8, "weight_decay": 0.0}
    assert cfg.train.threads is None and cfg.output.dir == "runs/mnist"


@pytest.mark.parametrize("name", ["mnist.yaml", "mnist_bn.yaml", "synthetic_small.yaml", "fashion_mnist.yaml",
                                  "cifar10.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(f"{REPO}/configs/{name}")
    model = fastcnn.build_model(cfg.model, seed=0)
    assert model.num_classes == cfg.model.num_classes


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(f"{REPO}/configs/mnist.yaml")
    again = validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("raw, path, words", [
    (_minimal(model={"layers": [{"type": "conv2d", "filters": 0, "kernel_size": 3}]}),
     "model.layers[0].filters", ">= 1"),
    (_minimal(model={"layers": [{"type": "conv2d", "filters": 4, "kernel_size": 3, "strides": 2}]}),
     "model.layers[0].strides", "did you mean 'stride'"),
    (_minimal(model={"layers": [{"type": "convolution"}]}), "model.layers[0].type", "unknown layer type"),
    (_minimal(model={"layers": [{"filters": 3}]}), "model.layers[0].type", "missing"),
    (_minimal(model={"layers": [{"type": "conv2d", "filters": 4, "kernel_size": "3"}]}),
     "model.layers[0].kernel_size", "expected an integer"),
    (_minimal(model={"layers": [{"type": "conv2d", "filters": 4, "kernel_size": 30}, {"type": "flatten"},
                                {"type": "dense", "units": 10}]}), "model.layers[0]", "below 1"),
    (_minimal(model={"layers": [{"type": "flatten"}, {"type": "dense", "units": 7}]}), "model.layers",
     "num_classes"),
    (_minimal(model={"layers": [{"type": "dense", "units": 10}]}), "model.layers[0]", "flatten"),
    (_minimal(data={"dataset": "imagenet"}), "data.dataset", "must be one of"),
    (_minimal(data={"dataset": "mnist", "batch_size": 0}), "data.batch_size", ">= 1"),
    (_minimal(data={"dataset": "mnist", "validation": 1.5}), "data.validation", "fraction"),
    (_minimal(train={"epochs": -1}), "train.epochs", ">= 0"),
    (_minimal(train={"optimizer": {"name": "adam", "lr": 0}}), "train.optimizer.lr", "> 0"),
    (_minimal(train={"optimizer": {"name": "rmsprop"}}), "train.optimizer.name", "unknown optimizer"),
    (_minimal(train={"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}), "train.optimizer.betas",
     "unknown key"),
    (_minimal(trainer={}), "trainer", "did you mean 'train'"),
    # Infinities: a learning rate, momentum or decay of Inf makes the first update overflow the weights.
    (_minimal(train={"optimizer": {"name": "sgd", "lr": float("inf")}}), "train.optimizer.lr", "finite"),
    (_minimal(train={"optimizer": {"name": "sgd", "lr": 0.1, "momentum": float("inf")}}),
     "train.optimizer.momentum", "finite"),
    (_minimal(train={"clip_grad_norm": float("inf")}), "train.clip_grad_norm", "finite"),
    # File names: no file system takes a NUL character.
    (_minimal(output={"dir": "runs/a\0b"}), "output.dir", "NUL"),
    (_minimal(data={"dataset": "mnist", "root": "/tmp/x\0"}), "data.root", "NUL"),
    # A block of 10**8 copies would be planned (and hang) before any other check.
    (_minimal(model={"layers": [{"type": "residual", "repeat": 10 ** 8, "body": [{"type": "relu"}]},
                                {"type": "flatten"}, {"type": "dense", "units": 10}]}),
     "model.layers[0].repeat", "more than 10,000"),
    (_minimal(model={"layers": [{"type": "residual", "repeat": 200, "body": [
        {"type": "residual", "repeat": 200, "body": [{"type": "relu"}]}]},
                                {"type": "flatten"}, {"type": "dense", "units": 10}]}),
     "model.layers[0].repeat", "40,000 layers"),
    ({"data": {"dataset": "mnist"}}, "model", "missing"),
    ({"model": {}}, "data.dataset", "missing"),
])
def test_errors_name_the_key_path(raw, path, words):
    with pytest.raises(ConfigError) as info:
        validate(raw)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert words in message


def test_missing_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(_write(tmp_path, "model:\n  layers: []\ndata: {dataset: [mnist\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="empty"):
        load_config(_write(tmp_path, ""))


def test_set_overrides(tmp_path):
    path = f"{REPO}/configs/mnist.yaml"
    cfg = load_config(path, ["train.epochs=1", "model.layers[0].filters=8", "data.root=/tmp/x",
                             "train.optimizer.lr=0.01", "seed=3"])
    assert cfg.train.epochs == 1 and cfg.model.layers[0]["filters"] == 8
    assert cfg.data.root == "/tmp/x" and cfg.train.optimizer["lr"] == 0.01 and cfg.seed == 3
    # A key the file leaves out but the schema has.
    cfg = load_config(_write(tmp_path, "model: {}\ndata: {dataset: synthetic}\n"), ["train.threads=1"])
    assert cfg.train.threads == 1


@pytest.mark.parametrize("item, path", [
    ("train.epoch=1", "train.epoch"),
    ("model.layers[99].filters=1", "model.layers[99]"),
    ("train.epochs=many", "train.epochs"),
    ("nonsense", "--set"),
])
def test_set_errors(item, path):
    with pytest.raises(ConfigError) as info:
        load_config(f"{REPO}/configs/mnist.yaml", [item])
    assert str(info.value).startswith(f"{path}:")


def test_yaml_12_floats_duplicates_aliases_and_binary(tmp_path):
    cfg = load_config(_write(tmp_path, "model: {}\ndata: {dataset: mnist, batch_size: 1e2}\n"
                                       "train: {optimizer: {name: adam, lr: 1e-3}}\n"))
    assert cfg.train.optimizer["lr"] == 0.001 and cfg.data.batch_size == 100
    with pytest.raises(ConfigError, match="duplicate key 'seed' at line 3"):
        load_config(_write(tmp_path, "seed: 1\nmodel: {}\nseed: 2\ndata: {dataset: mnist}\n"))
    text = ("model:\n  input_shape: [8, 8, 1]\n  num_classes: 2\n  layers:\n"
            "    - &c {type: conv2d, filters: 4, kernel_size: 3}\n    - *c\n    - {type: flatten}\n"
            "    - {type: dense, units: 2}\ndata: {dataset: synthetic}\n")
    cfg = load_config(_write(tmp_path, text), ["model.layers[0].filters=2"])
    assert [layer["filters"] for layer in cfg.model.layers[:2]] == [2, 4]  # the alias is an independent copy
    binary = tmp_path / "b.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ConfigError, match="not a text"):
        load_config(binary)
    with pytest.raises(ConfigError, match="empty"):
        load_config(_write(tmp_path, "model:\ndata: {dataset: mnist}\n"))


def test_yaml_12_booleans(tmp_path):
    """Only true/false are booleans (YAML 1.2): YAML 1.1's yes/no/on/off stay strings, so a mistyped boolean
    is named rather than silently read."""
    cfg = load_config(_write(tmp_path, "model: {}\ndata: {dataset: mnist, augment: {horizontal_flip: True}}\n"))
    assert cfg.data.augment["horizontal_flip"] is True
    for word in ("yes", "on", "n"):
        with pytest.raises(ConfigError, match=f"data.augment.horizontal_flip: expected true or false, got .*'{word}'"):
            text = f"model: {{}}\ndata: {{dataset: mnist, augment: {{horizontal_flip: {word}}}}}\n"
            load_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(f"{REPO}/configs/mnist.yaml", ["data.augment.horizontal_flip=yes"])


def test_set_switches_an_optional_section_on(tmp_path):
    cfg = load_config(f"{REPO}/configs/mnist.yaml", ["train.early_stopping.patience=3"])
    assert cfg.train.early_stopping == {"monitor": "val_loss", "patience": 3, "min_delta": 0.0}
    with pytest.raises(ConfigError, match="train.early_stopping.patiense: no such key"):
        load_config(f"{REPO}/configs/mnist.yaml", ["train.early_stopping.patiense=3"])
