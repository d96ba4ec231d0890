"""Schedules, early stopping, AdamW and gradient clipping, against PyTorch where it has the same thing."""
import math

import numpy as np
import pytest

from fastcnn.layers import Parameter
from fastcnn.optim import AdamW, clip_grad_norm
from fastcnn.schedules import (
    SCHEDULES,
    CosineSchedule,
    EarlyStopping,
    MultiStepSchedule,
    PlateauSchedule,
    Schedule,
    StepSchedule,
    build_schedule,
)

torch = pytest.importorskip("torch", reason="PyTorch (torch==2.13.0) is the reference for these tests")


def _torch_lrs(make_scheduler, epochs, metrics=None):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = make_scheduler(opt)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metrics[epoch]) if metrics is not None else sched.step()
    return lrs


def test_step_and_multistep_match_torch():
    ours = StepSchedule(0.5, 20, step_size=3, gamma=0.5)
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), 20)
    np.testing.assert_allclose([ours.lr(e) for e in range(20)], theirs, rtol=1e-12)
    assert ours.lr(2.99) == ours.lr(2) and ours.lr(3.0) == ours.lr(3)  # changes at epoch boundaries only
    ours = MultiStepSchedule(0.5, 20, milestones=[2, 5, 11], gamma=0.1)
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5, 11], gamma=0.1), 20)
    np.testing.assert_allclose([ours.lr(e) for e in range(20)], theirs, rtol=1e-12)


def test_cosine_without_warmup_matches_torch_per_epoch():
    ours = CosineSchedule(0.5, 10, warmup_epochs=0, min_lr=0.01)
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.01), 10)
    np.testing.assert_allclose([ours.lr(e) for e in range(10)], theirs, rtol=1e-10)


def test_cosine_warmup_shape():
    s = CosineSchedule(1.0, 10, warmup_epochs=2, min_lr=0.0)
    assert s.lr(0) == 0 and s.lr(1) == pytest.approx(0.5) and s.lr(2) == pytest.approx(1.0)
    assert s.lr(6) == pytest.approx(0.5) and s.lr(10) == pytest.approx(0.0, abs=1e-12)
    values = [s.lr(e / 10) for e in range(20, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decreasing after the warm-up


@pytest.mark.parametrize("monitor, mode", [("val_loss", "min"), ("val_accuracy", "max")])
def test_plateau_matches_torch(monitor, mode):
    rng = np.random.default_rng(0)
    values = list(np.round(rng.uniform(0.5, 1.0, size=30), 2))
    ours = PlateauSchedule(0.5, 30, monitor=monitor, factor=0.5, patience=2, threshold=1e-4, min_lr=0.01)
    mine = []
    for v in values:
        mine.append(ours.lr(0))
        ours.epoch_end({monitor: v})
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, mode=mode, factor=0.5, patience=2, threshold=1e-4, min_lr=0.01), 30, metrics=values)
    np.testing.assert_allclose(mine, theirs, rtol=1e-12)
    clone = PlateauSchedule(0.5, 30, monitor=monitor, factor=0.5, patience=2, min_lr=0.01)
    clone.load_state_dict(ours.state_dict())
    assert clone.lr(0) == ours.lr(0) and clone.state_dict() == ours.state_dict()


def test_early_stopping():
    es = EarlyStopping("val_loss", patience=2, min_delta=0.01)
    assert [es.should_stop({"val_loss": v}) for v in (1.0, 0.95, 0.945, 0.96, 0.9)] == [False, False, False,
                                                                                        True, False]
    es = EarlyStopping("val_accuracy", patience=1)
    assert [es.should_stop({"val_accuracy": v}) for v in (0.5, 0.6, 0.6)] == [False, False, True]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_adamw_matches_torch(dtype, rtol):
    rng = np.random.default_rng(1)
    data = [rng.normal(size=s).astype(dtype) for s in [(3, 4), (5,)]]
    ours = [Parameter(d.copy()) for d in data]
    theirs = [torch.nn.Parameter(torch.from_numpy(d.copy())) for d in data]
    opt = AdamW(ours, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    topt = torch.optim.AdamW(theirs, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for _ in range(5):
        for p, t in zip(ours, theirs):
            g = rng.normal(size=p.data.shape).astype(dtype)
            p.grad[...] = g
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for p, t in zip(ours, theirs):
            np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=rtol, atol=rtol * 1e-2)
            assert p.data.dtype == dtype


@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    rng = np.random.default_rng(2)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(30, 40), (7,), (3, 3, 2, 4)]]
    ours = [Parameter(np.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, t, g in zip(ours, theirs, grads):
        p.grad[...] = g
        t.grad = torch.from_numpy(g.copy())
    norm = clip_grad_norm(ours, max_norm)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(float(tnorm), rel=1e-6)
    assert math.isclose(norm, math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)), rel_tol=1e-9)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-9)


def test_registry_names_the_classes():
    assert SCHEDULES == {"none": Schedule, "step": StepSchedule, "multistep": MultiStepSchedule,
                         "cosine": CosineSchedule, "reduce_on_plateau": PlateauSchedule}
    for name, cls in SCHEDULES.items():
        assert cls.name == name


def test_options_resolved_with_defaults_and_checks():
    assert StepSchedule(0.1, 10, 3).config == {"step_size": 3, "gamma": 0.1}
    assert PlateauSchedule(0.1, 10).config == {"monitor": "val_loss", "factor": 0.1, "patience": 10,
                                               "threshold": 1e-4, "min_lr": 0.0}
    assert CosineSchedule(0.1, 10).lr(0) == 0.1 and Schedule(0.1, 10).config == {}
    with pytest.raises(ValueError, match="StepSchedule.step_size: required key is missing"):
        StepSchedule(0.1, 10)
    with pytest.raises(ValueError, match=r"MultiStepSchedule.milestones: must be strictly increasing"):
        MultiStepSchedule(0.1, 10, [5, 2])
    with pytest.raises(ValueError, match="PlateauSchedule.monitor: must be one of val_loss, val_accuracy"):
        PlateauSchedule(0.1, 10, monitor="loss")


def test_build_schedule_reads_the_registry():
    s = build_schedule({"name": "multistep", "milestones": [2, 4]}, 1.0, 6)
    assert type(s) is MultiStepSchedule and s.gamma == 0.1 and s.lr(4) == pytest.approx(0.01)
    assert type(build_schedule({"name": "none"}, 1.0, 6)) is Schedule
    with pytest.raises(ValueError, match="unknown schedule 'linear'; known: none, step, multistep, cosine, "
                                         "reduce_on_plateau"):
        build_schedule({"name": "linear"}, 1.0, 6)


def test_early_stopping_options():
    assert EarlyStopping().config == {"monitor": "val_loss", "patience": 5, "min_delta": 0.0}
    assert EarlyStopping("val_accuracy", 2).patience == 2
    with pytest.raises(ValueError, match="EarlyStopping.patience: must be >= 1"):
        EarlyStopping(patience=0)
