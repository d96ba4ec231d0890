"""Optimizers: SGD, Adam and AdamW against their torch.optim twins on the same gradients, state round trip,
validation (the options each class declares)."""
import zlib

import numpy as np
import pytest

import fastcnn
from fastcnn.layers import Parameter
from fastcnn.optim import OPTIMIZERS, build_optimizer

SHAPES = [(3, 3, 2, 4), (4,), (6, 5), (1,)]
STEPS = 5
# (rtol, atol relative to the largest parameter magnitude)
TOL = {"float64": (1e-10, 1e-12), "float32": (1e-5, 1e-6)}

CASES = {
    "sgd": ("sgd", dict(lr=0.1)),
    "sgd_momentum": ("sgd", dict(lr=0.1, momentum=0.9)),
    "sgd_momentum_dampening": ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1)),
    "sgd_nesterov": ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgd_momentum_weight_decay": ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "sgd_nesterov_weight_decay": ("sgd", dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=1e-2)),
    "adam": ("adam", dict(lr=1e-3)),
    "adam_weight_decay_betas_eps": ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    "adamw": ("adamw", dict(lr=1e-3)),
    "adamw_weight_decay_betas_eps": ("adamw", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
}


def make_optimizer(kind, params, options):
    return OPTIMIZERS[kind](params, **options)


def make_params(rng, dtype):
    return [Parameter(rng.normal(size=shape).astype(dtype)) for shape in SHAPES]


def new_grads(rng, dtype, params):
    return [rng.normal(scale=0.5, size=p.data.shape).astype(dtype) for p in params]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lr_change", [False, True], ids=["const_lr", "lr_change"])
def test_matches_torch(case, dtype, lr_change):
    torch = pytest.importorskip("torch", reason="torch not installed: optimizer comparison skipped")
    kind, options = CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{case}-{dtype}".encode()))
    params = make_params(rng, dtype)
    originals = [p.data for p in params]
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    opt = make_optimizer(kind, params, options)
    topt = OPTIMIZERS[kind].torch_optimizer(torch, tparams, options)  # the one fastcnn -> torch.optim mapping
    rtol, atol = TOL[dtype]
    for step in range(STEPS):
        if lr_change and step == 2:  # what a schedule does between steps
            opt.lr = options["lr"] * 0.3
            for group in topt.param_groups:
                group["lr"] = options["lr"] * 0.3
        for p, t, g in zip(params, tparams, new_grads(rng, dtype, params)):
            p.grad[...] = g
            t.grad = torch.tensor(g.copy())
        opt.step()
        topt.step()
        for i, (p, t) in enumerate(zip(params, tparams)):
            expected = t.detach().numpy()
            assert p.data.dtype == np.dtype(dtype)
            assert p.data is originals[i], "the optimizer must update p.data in place"
            np.testing.assert_allclose(p.data, expected, rtol=rtol, atol=atol * np.max(np.abs(expected)),
                                       err_msg=f"{case} {dtype}: parameter {i} after step {step + 1}")
    assert opt.step_count == STEPS


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_state_dict_round_trip_continues_bit_identically(case, dtype, tmp_path):
    kind, options = CASES[case]
    rng = np.random.default_rng(5)
    a_params = make_params(rng, dtype)
    grads = [new_grads(rng, dtype, a_params) for _ in range(6)]
    a = make_optimizer(kind, a_params, options)
    for g in grads[:3]:
        for p, gi in zip(a_params, g):
            p.grad[...] = gi
        a.step()

    state = a.state_dict()
    # The state is plain arrays: it survives an .npz file without pickling, dtype and all.
    np.savez(tmp_path / "optim.npz", **state)
    with np.load(tmp_path / "optim.npz", allow_pickle=False) as f:
        loaded = {k: f[k] for k in f.files}
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        if key not in ("step", "lr"):
            assert value.dtype == np.dtype(dtype), key
    assert int(loaded["step"]) == 3

    # A fresh optimizer on copies of the parameters (as after loading a model checkpoint), then the state.
    b_params = [Parameter(p.data.copy()) for p in a_params]
    b = make_optimizer(kind, b_params, options)
    b.load_state_dict(loaded)
    assert b.step_count == 3 and b.lr == a.lr

    # state_dict() gave copies: scribbling over them leaves the optimizer alone.
    for key in state:
        if key not in ("step", "lr"):
            state[key][...] = 123.0

    for g in grads[3:]:
        for pa, pb, gi in zip(a_params, b_params, g):
            pa.grad[...] = gi
            pb.grad[...] = gi
        a.step()
        b.step()
        for pa, pb in zip(a_params, b_params):
            np.testing.assert_array_equal(pb.data, pa.data)
            assert pb.data.dtype == np.dtype(dtype)
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value, err_msg=key)


def test_load_state_dict_rejects_missing_and_misshapen_state():
    from fastcnn.errors import CheckpointError

    rng = np.random.default_rng(0)
    params = make_params(rng, "float64")
    opt = fastcnn.Adam(params)
    state = opt.state_dict()
    missing = {k: v for k, v in state.items() if k != "1.exp_avg"}
    with pytest.raises(CheckpointError, match="exp_avg"):
        fastcnn.Adam(params).load_state_dict(missing)
    bad = dict(state)
    bad["0.exp_avg_sq"] = np.zeros((2, 2))
    with pytest.raises(CheckpointError, match="exp_avg_sq"):
        fastcnn.Adam(params).load_state_dict(bad)


def test_float32_stays_float32():
    rng = np.random.default_rng(1)
    for cls, options in ((fastcnn.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                         (fastcnn.Adam, dict(lr=1e-3, weight_decay=1e-2))):
        params = make_params(rng, "float32")
        opt = cls(params, **options)
        for p in params:
            p.grad[...] = rng.normal(size=p.data.shape)
        opt.step()
        for p in params:
            assert p.data.dtype == np.float32 and p.grad.dtype == np.float32
        for key, value in opt.state_dict().items():
            if key not in ("step", "lr"):
                assert value.dtype == np.float32, key


@pytest.mark.parametrize("options", [
    dict(lr=0.0), dict(lr=-0.1), dict(lr=float("nan")),
    dict(lr=0.1, momentum=-0.5),
    dict(lr=0.1, weight_decay=-1e-2),
    dict(lr=0.1, nesterov=True),
    dict(lr=0.1, momentum=0.0, nesterov=True),
    dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_rejects_invalid_hyperparameters(options):
    params = make_params(np.random.default_rng(0), "float64")
    with pytest.raises(ValueError):
        fastcnn.SGD(params, **options)


@pytest.mark.parametrize("options", [
    dict(lr=0.0), dict(lr=-1e-3),
    dict(lr=1e-3, betas=(1.0, 0.999)), dict(lr=1e-3, betas=(0.9, -0.1)),
    dict(lr=1e-3, eps=0.0), dict(lr=1e-3, eps=-1e-8),
    dict(lr=1e-3, weight_decay=-1e-2),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_adam_rejects_invalid_hyperparameters(options):
    params = make_params(np.random.default_rng(0), "float64")
    with pytest.raises(ValueError):
        fastcnn.Adam(params, **options)


def test_empty_parameter_list_is_an_error():
    with pytest.raises(ValueError):
        fastcnn.SGD([], lr=0.1)
    with pytest.raises(ValueError):
        fastcnn.Adam([], lr=0.1)


def test_registry_names_the_classes():
    assert OPTIMIZERS == {"adam": fastcnn.Adam, "adamw": fastcnn.AdamW, "sgd": fastcnn.SGD}
    for name, cls in OPTIMIZERS.items():
        assert cls.name == name


def test_options_positional_in_declaration_order_or_by_name_with_defaults():
    params = make_params(np.random.default_rng(0), "float64")
    opt = fastcnn.SGD(params, 0.1, 0.9)
    assert opt.config == {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
    assert (opt.lr, opt.momentum) == (0.1, 0.9)
    opt = fastcnn.Adam(params, betas=(0.8, 0.99))
    assert opt.config["betas"] == [0.8, 0.99] and (opt.beta1, opt.beta2) == (0.8, 0.99) and opt.lr == 0.001
    assert fastcnn.AdamW(params).weight_decay == 0.01 and fastcnn.AdamW(params).decoupled
    assert fastcnn.SGD(params).lr == 0.01
    with pytest.raises(TypeError, match="at most 4 positional"):
        fastcnn.Adam(params, 0.1, (0.9, 0.99), 1e-8, 0.0, 1)
    with pytest.raises(TypeError, match="twice"):
        fastcnn.SGD(params, 0.1, lr=0.2)
    with pytest.raises(ValueError, match=r"SGD.lr: must be > 0"):
        fastcnn.SGD(params, lr=0.0)
    with pytest.raises(ValueError, match=r"Adam.betas\[0\]: must be < 1"):
        fastcnn.Adam(params, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"SGD.momentun: unknown key \(did you mean 'momentum'\?\)"):
        fastcnn.SGD(params, momentun=0.9)


def test_build_optimizer_fills_defaults_and_rejects_unknown_names():
    params = make_params(np.random.default_rng(0), "float64")
    opt = build_optimizer({"name": "sgd", "lr": 0.5, "momentum": 0.9}, params)
    assert type(opt) is fastcnn.SGD and opt.config["nesterov"] is False and opt.momentum == 0.9
    assert type(build_optimizer({"name": "adamw"}, params)) is fastcnn.AdamW
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'; known: adam, adamw, sgd"):
        build_optimizer({"name": "adagrad"}, params)
