"""Trainer options end to end: schedules, clipping, early stopping, augmentation, AdamW; resume stays exact."""
import json
import os

import numpy as np
import pytest

from fastcnn.checkpoint import load_checkpoint
from fastcnn.config import load_config
from fastcnn.data import loader as loader_module
from fastcnn.train import Interrupted, Trainer

from conftest import REPO

SMALL = os.path.join(REPO, "configs", "synthetic_small.yaml")
OPTIONS = ["train.optimizer={name: adamw, lr: 0.01, weight_decay: 0.05}",
           "train.schedule={name: cosine, warmup_epochs: 0.5, min_lr: 0.0001}",
           "train.clip_grad_norm=0.5",
           "data.augment={crop_padding: 2, horizontal_flip: true}",
           "model.layers=[{type: conv2d, filters: 8, kernel_size: 3, padding: same}, {type: batchnorm}, "
           "{type: relu}, {type: avgpool2d}, {type: dropout, rate: 0.2}, {type: conv2d, filters: 8, kernel_size: 3}, "
           "{type: relu}, {type: global_avgpool}, {type: dense, units: 4}]"]


def _run(out_dir, *extra, **kw):
    cfg = load_config(SMALL, [f"output.dir={out_dir}", "train.epochs=3", "data.batch_size=16", *OPTIONS, *extra])
    return Trainer(cfg, progress=False, log=lambda *a: None, **kw).run()


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_options_train_and_schedule_the_lr(tmp_path):
    result = _run(tmp_path / "a")
    records = _records(tmp_path / "a")
    assert len(records) == 3 and result["best_accuracy"] > 0.3  # 4 classes: chance is 0.25
    assert records[0]["train_loss"] > records[1]["train_loss"] > records[2]["train_loss"]
    lrs = [r["lr"] for r in records]  # the rate of each epoch's last step: cosine decreasing
    assert lrs[0] > lrs[1] > lrs[2] >= 0.0001


def test_resume_is_bit_exact_with_every_option(tmp_path, monkeypatch):
    import signal

    _run(tmp_path / "ref", "train.schedule={name: reduce_on_plateau, patience: 0, factor: 0.5}")
    original = loader_module.BatchLoader.epoch_batches

    def interrupting(self, e, start=0):
        for i, item in enumerate(original(self, e, start=start), start=start):
            if (e, i) == (1, 6):
                signal.raise_signal(signal.SIGTERM)
            yield item

    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", interrupting)
    with pytest.raises(Interrupted):
        _run(tmp_path / "run", "train.schedule={name: reduce_on_plateau, patience: 0, factor: 0.5}")
    monkeypatch.setattr(loader_module.BatchLoader, "epoch_batches", original)
    _run(tmp_path / "run", "train.schedule={name: reduce_on_plateau, patience: 0, factor: 0.5}",
         resume=str(tmp_path / "run" / "last.npz"))
    ref, got = load_checkpoint(tmp_path / "ref" / "last.npz"), load_checkpoint(tmp_path / "run" / "last.npz")
    for key in ref.model:
        np.testing.assert_array_equal(ref.model[key], got.model[key], err_msg=key)
    assert ref.meta["schedule"] == got.meta["schedule"]
    assert [r["lr"] for r in _records(tmp_path / "ref")] == [r["lr"] for r in _records(tmp_path / "run")]


def test_early_stopping_stops(tmp_path):
    _run(tmp_path / "es", "train.epochs=30", "train.early_stopping={monitor: val_accuracy, patience: 1}",
         "train.optimizer={name: sgd, lr: 0.0000001}")
    records = _records(tmp_path / "es")
    assert 2 <= len(records) < 30
    assert load_checkpoint(tmp_path / "es" / "last.npz").meta["stopped_early"] is True


def test_label_smoothing_reaches_the_training_step(tmp_path):
    """train.label_smoothing changes the training loss (and so the weights) exactly as train_step with the
    same eps does; the validation loss stays the plain cross-entropy."""
    import fastcnn
    from fastcnn.data import BatchLoader, load_dataset
    from fastcnn.optim import build_optimizer

    cfg = load_config(SMALL, [f"output.dir={tmp_path / 's'}", "train.epochs=1", "train.label_smoothing=0.2"])
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    trained = load_checkpoint(str(tmp_path / "s" / "last.npz")).model
    model = fastcnn.build_model(cfg.model, seed=cfg.seed)
    opt = build_optimizer(cfg.train.optimizer, model.parameters())
    d = cfg.data
    ds = load_dataset(d.dataset, d.root, input_shape=tuple(cfg.model.input_shape), num_classes=cfg.model.num_classes,
                      num_train=d.num_train, num_test=d.num_test, seed=cfg.seed, progress=False)
    loader = BatchLoader(ds.x_train, ds.y_train, d.batch_size, shuffle=True, seed=cfg.seed)
    for b, (xb, yb) in enumerate(loader.epoch_batches(0)):
        model.step = b
        assert fastcnn.train_step(model, opt, xb, yb, label_smoothing=0.2).ok
    assert all(np.array_equal(v, trained[k]) for k, v in model.state_dict().items())
    plain = load_config(SMALL, [f"output.dir={tmp_path / 'p'}", "train.epochs=1"])
    Trainer(plain, progress=False, log=lambda *a: None).run()
    other = load_checkpoint(str(tmp_path / "p" / "last.npz")).model
    assert not np.array_equal(other["layers.0.weight"], trained["layers.0.weight"])
