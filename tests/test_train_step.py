"""fastcnn.train_step: a loop of it trains exactly as `fastcnn train`; NaN/Inf faults as the trainer needs them."""
import json
import types

import numpy as np
import pytest

import fastcnn
from fastcnn.config import load_config
from fastcnn.data import BatchLoader, load_dataset
from fastcnn.step import describe_param, first_nonfinite_grad
from fastcnn.train import NanPolicy, Trainer, TrainingDiverged

from conftest import SMALL_CONFIG, run_cli

DROPOUT_LAYERS = ("model.layers=[{type: conv2d, filters: 8, kernel_size: 3, padding: same}, {type: batchnorm}, "
                  "{type: relu}, {type: maxpool2d, pool_size: 2}, {type: dropout, rate: 0.3}, {type: flatten}, "
                  "{type: dense, units: 4}]")


def _small_data(cfg):
    return load_dataset("synthetic", input_shape=tuple(cfg.model.input_shape), num_classes=cfg.model.num_classes,
                        num_train=cfg.data.num_train, num_test=cfg.data.num_test, seed=cfg.seed, progress=False)


@pytest.mark.parametrize("overrides, make_optimizer, clip", [
    ([], lambda params: fastcnn.SGD(params, lr=0.05, momentum=0.9), None),
    (["train.optimizer={name: adam, lr: 0.003}", "train.clip_grad_norm=0.5", DROPOUT_LAYERS],
     lambda params: fastcnn.Adam(params, lr=0.003), 0.5),
], ids=["sgd", "adam-clip-dropout"])
def test_a_train_step_loop_gives_the_weights_of_fastcnn_train(tmp_path, capsys, overrides, make_optimizer, clip):
    out_dir = tmp_path / "run"
    args = ["train", SMALL_CONFIG, "--set", f"output.dir={out_dir}", "--threads", "2", "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err

    cfg = load_config(SMALL_CONFIG, overrides)
    ds = _small_data(cfg)
    model = fastcnn.build_model(cfg.model, seed=cfg.seed)
    opt = make_optimizer(model.parameters())
    loader = BatchLoader(ds.x_train, ds.y_train, cfg.data.batch_size, shuffle=True, seed=cfg.seed)
    train_loss = []
    for epoch in range(cfg.train.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for xb, yb in loader.epoch_batches(epoch):
            result = fastcnn.train_step(model, opt, xb, yb, clip_grad_norm=clip)
            assert result.ok and result.fault is None and result.count == len(yb)
            loss_sum += result.loss * result.count
            correct += result.correct
            seen += result.count
        train_loss.append((loss_sum / seen, correct / seen))

    with np.load(out_dir / "last.npz", allow_pickle=False) as saved:
        trained = {k: saved[k] for k in saved.files if k.startswith("layers.")}
    state = model.state_dict()
    assert state.keys() == trained.keys()
    for key in state:
        assert np.array_equal(state[key], trained[key]), key
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_loss"], r["train_accuracy"]) for r in records] == train_loss


def _model_and_batch(overrides=()):
    cfg = load_config(SMALL_CONFIG, list(overrides))
    ds = _small_data(cfg)
    model = fastcnn.build_model(cfg.model, seed=0)
    return model, fastcnn.Adam(model.parameters()), ds.x_train[:16].copy(), ds.y_train[:16].copy()


def test_a_nan_loss_is_reported_and_no_step_is_taken():
    model, opt, x, y = _model_and_batch()
    before, opt_before = model.state_dict(), {k: np.copy(v) for k, v in opt.state_dict().items()}
    x[3, 2, 2, 0] = np.nan
    result = fastcnn.train_step(model, opt, x, y)
    assert not result.ok and result.fault == "the loss is nan" and result.parameter is None
    assert np.isnan(result.loss) and result.correct == 0 and result.count == 16
    assert opt.step_count == 0
    assert all(np.array_equal(v, opt_before[k]) for k, v in opt.state_dict().items())
    after = model.state_dict()
    for key in before:
        if "running" not in key:  # the forward updated the batch-norm statistics: the trainer's policy restores them
            assert np.array_equal(before[key], after[key]), key


def test_a_nonfinite_gradient_names_the_parameter(monkeypatch):
    model, opt, x, y = _model_and_batch()
    before = {k: p.data.copy() for k, p in model.named_parameters()}
    backward = model.backward

    def poisoned(dlogits, input_grad=True):
        out = backward(dlogits, input_grad=input_grad)
        dict(model.named_parameters())["layers.5.weight"].grad[0, 1] = np.inf
        return out

    monkeypatch.setattr(model, "backward", poisoned)
    result = fastcnn.train_step(model, opt, x, y, clip_grad_norm=1.0)
    assert not result.ok and np.isfinite(result.loss)
    assert result.parameter == "layers.5.weight"
    assert result.fault == "the gradient of layers.5.weight (weight of layer 5 (dense)) holds NaN or Inf"
    assert opt.step_count == 0
    for key, p in model.named_parameters():
        assert np.array_equal(p.data, before[key]), key


def test_nan_policy_skip_restores_the_running_statistics_and_stop_raises():
    model, opt, x, y = _model_and_batch()
    fastcnn.train_step(model, opt, x, y)  # running statistics away from their initial values
    running = {k: b.copy() for k, b in model.named_buffers()}
    assert running
    policy = NanPolicy(model, "skip", skipped=2)
    policy.before_step()
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    result = fastcnn.train_step(model, opt, bad, y)
    assert not result.ok
    assert any(not np.array_equal(b, running[k]) for k, b in model.named_buffers())
    note = policy.on_fault(result.fault, "step 9 (epoch 1, batch 9)")
    assert note == f"skipped step 9 (epoch 1, batch 9): {result.fault} (3 skipped so far)"
    assert policy.skipped == 3
    for key, b in model.named_buffers():
        assert np.array_equal(b, running[key]), key

    stop = NanPolicy(model, "stop")
    stop.before_step()
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4 \(epoch 1, batch 4\): the loss is nan; "
                                               r"the last good checkpoint is kept"):
        stop.on_fault("the loss is nan", "step 4 (epoch 1, batch 4)")


# -- models whose layers nest (residual blocks): keys such as layers.4.0.body.1.gamma -----------------------
def _layer(kind, in_shape=(8,)):
    return types.SimpleNamespace(kind=kind, in_shape=in_shape)


class NestedModel:
    """Just what the trainer's layer walks use: named_modules() with nested prefixes."""

    def __init__(self):
        self.layers = [_layer("conv2d", (12, 12, 1)), _layer("residual")]
        self.modules = [("layers.0", self.layers[0]), ("layers.1", self.layers[1]),
                        ("layers.1.0.body.0", _layer("dense")), ("layers.1.0.body.1", _layer("batchnorm"))]

    def named_modules(self):
        return iter(self.modules)


def test_describe_param_with_nested_and_flat_keys():
    nested = NestedModel()
    assert describe_param(nested, "layers.1.0.body.1.gamma") == "gamma of layer 1.0.body.1 (batchnorm)"
    assert describe_param(nested, "layers.0.weight") == "weight of layer 0 (conv2d)"
    assert describe_param(nested, "layers.7.weight") == "weight of layer 7"  # unknown: no kind, no error
    flat = types.SimpleNamespace(layers=[_layer("conv2d"), _layer("relu"), _layer("dense")])  # no named_modules
    assert describe_param(flat, "layers.2.bias") == "bias of layer 2 (dense)"


def test_first_nonfinite_grad_with_nested_keys():
    grads = {"layers.0.weight": np.zeros(3), "layers.1.0.body.1.gamma": np.array([0.0, np.nan])}
    model = types.SimpleNamespace(named_parameters=lambda: ((k, types.SimpleNamespace(grad=g))
                                                            for k, g in grads.items()))
    assert first_nonfinite_grad(model) == "layers.1.0.body.1.gamma"


def test_drop_last_finds_a_nested_batchnorm():
    messages = []
    trainer = Trainer(load_config(SMALL_CONFIG), progress=False, log=messages.append)
    trainer.model = NestedModel()
    assert trainer._needs_drop_last(33)  # batch 32: a last batch of 1 image, one value per channel
    assert "batch norm cannot normalize" in messages[0]
    assert not trainer._needs_drop_last(34)
    trainer.model.modules = trainer.model.modules[:3]  # no batch norm anywhere
    assert not trainer._needs_drop_last(33)
