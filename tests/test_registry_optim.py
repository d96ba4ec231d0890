"""Every registered optimizer, schedule and dataset is complete.

Walks ``fastcnn.optim.OPTIMIZERS``, ``fastcnn.schedules.SCHEDULES`` and
``fastcnn.data.DATASET_SPECS``: each entry declares its options, the README
documents every option in the entry's table row, config validation and
``--set`` read the declarations, and each optimizer has a PyTorch twin
(``torch_optimizer``) whose update matches fastcnn's to 1e-12 in float64.
Adding an optimizer or a schedule without its README row, its twin or its test
options fails here.
"""
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

from fastcnn.config import apply_override, validate
from fastcnn.data import DATASET_SPECS, DATASETS
from fastcnn.errors import ConfigError
from fastcnn.layers import Parameter
from fastcnn.optim import OPTIMIZERS, build_optimizer, torch_optimizer
from fastcnn.schedules import SCHEDULES, EarlyStopping, build_schedule
from fastcnn.schema import REQUIRED, check_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Non-default values for every declared option, per entry: together with the defaults they exercise each
# option of the torch mapping. A new optimizer or schedule adds its line here (test_cases_cover_every_option).
OPTIMIZER_CASES = {
    "adam": [dict(lr=1e-2, betas=[0.8, 0.99], eps=1e-6, weight_decay=1e-2)],
    "adamw": [dict(lr=1e-2, betas=[0.85, 0.995], eps=1e-7, weight_decay=0.1)],
    "sgd": [dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
            dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=1e-3)],
}
SCHEDULE_CASES = {
    "none": [{}],
    "step": [dict(step_size=2, gamma=0.5)],
    "multistep": [dict(milestones=[1, 3], gamma=0.2)],
    "cosine": [dict(warmup_epochs=0.5, min_lr=1e-4)],
    "reduce_on_plateau": [dict(monitor="val_accuracy", factor=0.5, patience=1, threshold=1e-3, min_lr=1e-5)],
}

SHAPES = [(3, 3, 2, 4), (4,), (6, 5), (1,)]
STEPS = 6
RTOL = 1e-12


# --------------------------------------------------------------------------
# README tables


def readme_rows(heading):
    """{name: row text} of the first table after the line starting with ``heading``. A row saying
    ``as <other>`` documents the other row's options too (``adamw``: "as adam, ...")."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows, in_table = {}, False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = " | ".join(cells[1:])
        elif in_table:
            break
    for name, text in list(rows.items()):
        for other in re.findall(r"\bas `?([\w-]+)`?", text):
            if other in rows and other != name:
                rows[name] = text + " | " + rows[other]
    return rows


def documented(row, option):
    return f"`{option}`" in row


@pytest.mark.parametrize("registry, heading", [(OPTIMIZERS, "Optimizers"), (SCHEDULES, "Schedules")],
                         ids=["optimizers", "schedules"])
def test_every_entry_is_declared_and_documented(registry, heading):
    rows = readme_rows(heading)
    assert set(rows) == set(registry), f"README's {heading} table lists {sorted(rows)}, the registry {sorted(registry)}"
    for name, cls in registry.items():
        assert cls.name == name
        assert isinstance(cls.options, dict)
        for option, spec in cls.options.items():
            assert isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0]), f"{name}.{option}"
            assert documented(rows[name], option), f"README's {heading} row for {name!r} does not name `{option}`"
        # The defaults pass their own checks.
        optional = {k: spec for k, spec in cls.options.items() if spec[1] is not REQUIRED}
        defaults = {k: d for k, (_, d) in optional.items()}
        assert check_section(defaults, optional, name) == defaults, name


def test_optimizers_declare_a_learning_rate_and_a_torch_twin():
    for name, cls in OPTIMIZERS.items():
        assert "lr" in cls.options, name
        assert cls.torch_class, f"{name} names no torch.optim class"


def test_early_stopping_options_are_documented():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    sentence = text[text.index("`early_stopping` stops"):][:300]
    for option in EarlyStopping.options:
        assert documented(sentence, option), option


def test_cases_cover_every_option():
    for registry, cases in ((OPTIMIZERS, OPTIMIZER_CASES), (SCHEDULES, SCHEDULE_CASES)):
        assert set(cases) == set(registry)
        for name, cls in registry.items():
            varied = {k for case in cases[name] for k, v in case.items() if v != cls.options[k][1]}
            assert varied == set(cls.options), f"{name}: no test case sets {sorted(set(cls.options) - varied)}"


# --------------------------------------------------------------------------
# Config validation and --set read the declarations


def _raw(train):
    return {"model": {}, "data": {"dataset": "mnist"}, "train": train}


@pytest.mark.parametrize("section, registry, cases", [("optimizer", OPTIMIZERS, OPTIMIZER_CASES),
                                                      ("schedule", SCHEDULES, SCHEDULE_CASES)])
def test_config_and_overrides_read_the_registry(section, registry, cases):
    for name, cls in registry.items():
        case = cases[name][0]
        cfg = validate(_raw({section: {"name": name, **case}}))
        resolved = cfg.train[section]
        assert resolved["name"] == name and set(resolved) == {"name", *cls.options}
        for option, value in case.items():
            assert resolved[option] == value
        # Each option can be set from the command line, even when the file does not give it.
        for option, value in case.items():
            raw = _raw({section: {"name": name, **{k: v for k, v in case.items() if cls.options[k][1] is REQUIRED}}})
            text = str(value).lower() if isinstance(value, bool) else str(value)
            apply_override(raw, f"train.{section}.{option}={text}")
            assert validate(raw).train[section][option] == value
        raw = _raw({section: {"name": name, **case}})
        with pytest.raises(ConfigError, match=f"train.{section}.no_such_option: no such key to override"):
            apply_override(raw, f"train.{section}.no_such_option=1")
    with pytest.raises(ConfigError, match=f"train.{section}.name: unknown {section} 'xyzzy'; known: "
                                          f"{', '.join(map(re.escape, registry))}"):
        validate(_raw({section: {"name": "xyzzy"}}))


def test_early_stopping_reads_its_declaration():
    cfg = validate(_raw({"early_stopping": {}}))
    assert cfg.train.early_stopping == {k: d for k, (_, d) in EarlyStopping.options.items()}
    raw = _raw({})
    apply_override(raw, "train.early_stopping.patience=3")
    assert validate(raw).train.early_stopping["patience"] == 3
    assert EarlyStopping(**validate(raw).train.early_stopping).patience == 3


def test_schedules_build_from_their_config():
    for name, cls in SCHEDULES.items():
        for case in SCHEDULE_CASES[name]:
            section = validate(_raw({"schedule": {"name": name, **case}})).train.schedule
            schedule = build_schedule(section, 0.1, 4)
            assert type(schedule) is cls and schedule.config == {k: v for k, v in section.items() if k != "name"}
            assert schedule.lr(0.0) >= 0.0


def test_validation_imports_no_numba():
    code = ("import sys, fastcnn.config, fastcnn.optim, fastcnn.schedules, fastcnn.data; "
            "assert 'numba' not in sys.modules, 'numba imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------
# Each optimizer against its torch twin


def _optimizer_cases():
    for name, cases in OPTIMIZER_CASES.items():
        yield pytest.param(name, {}, id=f"{name}-defaults")
        for i, case in enumerate(cases):
            yield pytest.param(name, case, id=f"{name}-{i}")


@pytest.mark.parametrize("name, case", list(_optimizer_cases()))
def test_torch_twin_matches(name, case):
    torch = pytest.importorskip("torch", reason="torch not installed: the torch twins are not checked")
    cls = OPTIMIZERS[name]
    section = validate(_raw({"optimizer": {"name": name, **case}})).train.optimizer
    rng = np.random.default_rng(zlib.crc32(f"{name}-{sorted(case.items())}".encode()))
    params = [Parameter(rng.normal(size=shape)) for shape in SHAPES]
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    ours = build_optimizer(section, params)
    theirs = torch_optimizer(torch, tparams, section)
    assert type(ours) is cls and type(theirs) is getattr(torch.optim, cls.torch_class)
    # The twin got every declared option (nothing dropped or renamed on the way).
    group = theirs.param_groups[0]
    for option in cls.options:
        expected = section[option]
        assert group[option] == (tuple(expected) if isinstance(expected, list) else expected), option
    for step in range(STEPS):
        if step == 3:  # what a schedule does between steps
            ours.lr = section["lr"] * 0.3
            group["lr"] = section["lr"] * 0.3
        for p, t in zip(params, tparams):
            g = rng.normal(scale=0.5, size=p.data.shape)
            p.grad[...] = g
            t.grad = torch.tensor(g.copy())
        ours.step()
        theirs.step()
        for i, (p, t) in enumerate(zip(params, tparams)):
            expected = t.detach().numpy()
            np.testing.assert_allclose(p.data, expected, rtol=RTOL, atol=RTOL * np.max(np.abs(expected)),
                                       err_msg=f"{name} {case}: parameter {i} after step {step + 1}")


def test_torch_optimizer_fills_defaults_and_rejects_unknown_names():
    torch = pytest.importorskip("torch", reason="torch not installed: the torch twins are not checked")
    for name, cls in OPTIMIZERS.items():
        opt = torch_optimizer(torch, [torch.zeros(2, requires_grad=True)], {"name": name})
        for option, (_, default) in cls.options.items():
            assert opt.param_groups[0][option] == (tuple(default) if isinstance(default, list) else default)
    with pytest.raises(ValueError, match="unknown optimizer 'nope'; known: adam, adamw, sgd"):
        torch_optimizer(torch, [torch.zeros(2, requires_grad=True)], {"name": "nope"})


# --------------------------------------------------------------------------
# Datasets: one declaration each, read by config validation and load_dataset


def test_dataset_declarations():
    assert DATASETS == tuple(DATASET_SPECS)
    for name, spec in DATASET_SPECS.items():
        assert spec.name == name and callable(spec.load)
        assert (spec.input_shape is None) == (spec.num_classes is None), name
        raw = {"model": {}, "data": {"dataset": name}}
        if spec.path is not None:
            with pytest.raises(ConfigError, match=f"data.path: required for dataset '{name}' "
                                                  f"\\(the {re.escape(spec.path)}\\)"):
                validate(raw)
            raw["data"]["path"] = "somewhere"
        if spec.input_shape is not None:
            raw["model"]["input_shape"] = list(spec.input_shape)
            raw["model"]["num_classes"] = spec.num_classes
            assert validate(raw).model.input_shape == list(spec.input_shape)
            wrong = dict(raw, model=dict(raw["model"], input_shape=[spec.input_shape[0] + 1, *spec.input_shape[1:]]))
            with pytest.raises(ConfigError, match="model.input_shape: is .* but .* images are"):
                validate(wrong)
            wrong = dict(raw, model=dict(raw["model"], num_classes=spec.num_classes + 1))
            with pytest.raises(ConfigError, match=f"model.num_classes: is {spec.num_classes + 1} but"):
                validate(wrong)


def test_mnist_declaration_matches_the_files():
    from fastcnn.data import load_dataset

    from conftest import mnist_root

    root = mnist_root()
    if root is None:
        pytest.skip("no MNIST files ($FASTCNN_DATA)")
    spec = DATASET_SPECS["mnist"]
    ds = load_dataset("mnist", root, num_train=8, num_test=8, download=False, progress=False)
    assert ds.input_shape == spec.input_shape and ds.num_classes == spec.num_classes
