"""fastcnn.runtime: thread control and kernel warm-up."""
import numba
import numpy as np
import pytest

import fastcnn
from fastcnn.config import load_config
from fastcnn.errors import ConfigError
from fastcnn.runtime import compile_stats, kernel_dispatchers, set_threads, warm_up

from conftest import SMALL_CONFIG


def test_set_threads():
    before = numba.get_num_threads()
    try:
        assert set_threads(None) == before
        assert set_threads(1) == 1 and numba.get_num_threads() == 1
        limit = numba.config.NUMBA_NUM_THREADS
        with pytest.raises(ConfigError, match=rf"^train.threads: must be between 1 and {limit}.*got 0$"):
            set_threads(0)
        with pytest.raises(ConfigError, match=r"^--threads: must be between 1"):
            set_threads(limit + 1, key="--threads")
    finally:
        numba.set_num_threads(before)


def test_warm_up_compiles_or_loads_every_kernel_of_a_step_and_touches_no_model():
    cfg = load_config(SMALL_CONFIG)
    model = fastcnn.build_model(cfg.model, seed=0)
    state = model.state_dict()
    lines = []
    seconds = warm_up(cfg.model, log=lines.append, optimizer={"name": "sgd", "momentum": 0.9}, clip=True)
    assert seconds >= 0 and lines
    assert lines[-1].startswith(("Compiled ", "Kernels loaded from cache"))
    # Everything a step and an evaluation need is ready now: another warm-up compiles nothing.
    before = compile_stats()
    lines.clear()
    warm_up(cfg.model, log=lines.append, optimizer={"name": "sgd", "momentum": 0.9}, clip=True)
    assert compile_stats()[0] == before[0] and lines[-1].startswith("Kernels loaded from cache")
    for key, value in model.state_dict().items():
        assert np.array_equal(value, state[key]), key


def test_compile_stats_count_the_kernels():
    dispatchers = kernel_dispatchers()
    assert dispatchers and all(hasattr(d, "stats") for d in dispatchers)
    compiled, loaded = compile_stats()
    assert isinstance(compiled, int) and isinstance(loaded, int) and compiled >= 0 and loaded >= 0


# -- compile helpers ---------------------------------------------------------------------------

def _zoo_model_cfg():
    from test_determinism_training import ZOO

    return ZOO["model"]


def test_leaf_blocks_open_residual_blocks_and_kinds_cover_every_leaf():
    from fastcnn.layers.residual import Residual
    from fastcnn.runtime import helper_kinds, leaf_blocks

    model = fastcnn.build_model(_zoo_model_cfg(), seed=0)
    leaves = leaf_blocks(model)
    assert not any(isinstance(b, Residual) or hasattr(b, "parts") for b in leaves)
    # Every layer once, in forward order: residual bodies and shortcuts, and the convolutions fused
    # with a batch norm or a ReLU, opened up.
    covered = [layer for b in leaves for layer in getattr(b, "layers", (b,))]
    assert covered == [m for _, m in model.named_modules() if not isinstance(m, Residual)]
    assert any(hasattr(b, "parts") for b in model.blocks)
    kinds = helper_kinds(model)
    assert kinds[-1] == "head" and len(set(kinds)) == len(kinds)
    assert {"conv2d", "batchnorm+relu", "batchnorm+relu+maxpool2d", "leaky_relu+maxpool2d", "dropout",
            "dense", "batchnorm"} <= set(kinds)


def test_the_convolution_backward_is_a_kind_of_its_own_unless_it_runs_the_forward_kernel():
    """conv2d:backward (right after conv2d) when no input gradient runs the forward's kernel (64 or
    more filters, a stride, a 1x1 kernel; the first layer computes none); else one conv2d kind, whose
    units would both compile the forward."""
    from fastcnn.runtime import helper_kinds

    def kinds(*convs):
        layers = [{"type": "conv2d", "kernel_size": 3, **c} for c in convs]
        return helper_kinds(fastcnn.build_model({"input_shape": [12, 12, 3], "num_classes": 3, "layers": [
            *layers, {"type": "flatten"}, {"type": "dense", "units": 3}]}, seed=0))

    split = kinds({"filters": 8}, {"filters": 64}, {"filters": 16, "stride": 2}, {"filters": 8, "kernel_size": 1})
    assert split[:2] == ["conv2d", "conv2d:backward"] and split[-1] == "head"
    assert "conv2d:backward" not in kinds({"filters": 8}, {"filters": 16, "padding": 1})
    assert "conv2d:backward" not in kinds({"filters": 64}, {"filters": 63})


def test_kind_shares_deal_every_kind_once_balanced_and_the_same_every_time():
    from fastcnn.runtime import _kind_cost, kind_shares

    kinds = ["conv2d", "conv2d:backward", "relu+maxpool2d", "flatten", "dense", "relu", "head"]
    for n in (1, 2, 3, 4, 8):
        shares = kind_shares(kinds, n)
        assert len(shares) == n and shares == kind_shares(list(kinds), n)
        assert sorted(k for share in shares for k in share) == sorted(kinds)
    two = kind_shares(kinds, 2)
    cost = [sum(_kind_cost(k, kinds) for k in share) for share in two]
    assert max(cost) <= 1.2 * min(cost)  # 16 + 6.5 + 2 against 12 + 7 + 2 + 2
    assert kind_shares([], 3) == [[], [], []]


def test_compile_kinds_runs_every_share_of_the_layer_zoo():
    """Every leaf kind of the zoo (all layer types and fused blocks, residual bodies and shortcuts)
    runs on its own from zero inputs, and the union of the shares is every kind."""
    from fastcnn.runtime import compile_kinds, helper_kinds

    cfg = _zoo_model_cfg()
    kinds = helper_kinds(fastcnn.build_model(cfg, seed=0))
    done = []
    for share in range(3):
        done += compile_kinds(cfg, 2, {"name": "sgd", "momentum": 0.9, "nesterov": True}, True, share, 3)
    assert sorted(done) == sorted(kinds)


HELPER_SCRIPT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the test runs in the background
from fastcnn.runtime import warm_up
model = {"input_shape": [3, 3, 1], "num_classes": 4,
         "layers": [{"type": "flatten"}, {"type": "dense", "units": 5}, {"type": "relu"},
                    {"type": "dense", "units": 4}]}
warm_up(model, log=lambda line: print(line, flush=True), optimizer={"name": "adamw", "lr": 0.01})
children = "/proc/%d/task/%d/children" % (os.getpid(), os.getpid())
print("CHILDREN", repr(open(children).read().strip()) if os.path.exists(children) else "unknown", flush=True)
if len(sys.argv) > 1:
    time.sleep(60)
"""


def _helper_env(tmp_path, helpers):
    import os

    cache = tmp_path / "numba_cache"
    cache.mkdir(exist_ok=True)
    return dict(os.environ, NUMBA_CACHE_DIR=str(cache), FASTCNN_COMPILE_HELPERS=str(helpers), NUMBA_NUM_THREADS="2")


@pytest.mark.skipif(bool(numba.config.DISABLE_JIT), reason="nothing compiles under NUMBA_DISABLE_JIT")
def test_cold_warm_up_compiles_with_a_helper_then_loads_everything(tmp_path):
    """An empty Numba cache: the warm-up compiles its share while a helper compiles the rest (the
    warm-up then loads those from the cache), every helper is gone when it returns, and a second
    warm-up loads everything."""
    import subprocess
    import sys

    env = _helper_env(tmp_path, 1)
    first = subprocess.run([sys.executable, "-c", HELPER_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[0].startswith("Compiling kernels"), first.stdout
    compiled = [line for line in lines if line.startswith("Compiled ")]
    assert len(compiled) == 1 and "with 1 helper process(es) alongside" in compiled[0], first.stdout
    loaded = int(compiled[0].split("alongside (")[1].split(" more loaded from the cache")[0])
    assert loaded > 0, first.stdout  # the helper's kernels, found in the cache
    assert "CHILDREN ''" in first.stdout or "CHILDREN unknown" in first.stdout, first.stdout
    second = subprocess.run([sys.executable, "-c", HELPER_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0 and second.stdout.startswith("Kernels loaded from cache"), second.stdout


# A model whose helper shares take several seconds of cold compiling each (ReLU + max-pool; dense and
# the optimizer), so that a helper still alive seconds after its warm-up died is caught.
SLOW_HELPERS_SCRIPT = HELPER_SCRIPT.replace(
    '"layers": [{"type": "flatten"},',
    '"layers": [{"type": "conv2d", "filters": 3, "kernel_size": 1}, {"type": "relu"}, '
    '{"type": "maxpool2d", "pool_size": 1}, {"type": "flatten"},')


def _signal_a_cold_warm_up(tmp_path, send):
    """Start a cold warm-up with 2 helpers in a session of its own, call ``send(pid)`` a second after
    the helpers started, then wait up to 4 s after the warm-up's process ended for every process of
    that session to be gone (a live helper has seconds of compiling left): True when they all went."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = _helper_env(tmp_path, 2)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_HELPERS_SCRIPT, "sleep"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("Compiling kernels")  # the helpers start with this line
        time.sleep(1.0)
        send(proc.pid)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
        return False
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.skipif(bool(numba.config.DISABLE_JIT), reason="nothing compiles under NUMBA_DISABLE_JIT")
def test_no_helper_outlives_a_warm_up_stopped_by_ctrl_c(tmp_path):
    """Ctrl-C (SIGINT to the process group) while a cold warm-up compiles with helpers: the process
    and every helper are gone within seconds."""
    import os
    import signal

    assert _signal_a_cold_warm_up(tmp_path, lambda pid: os.killpg(pid, signal.SIGINT)), \
        "a compile helper outlived the warm-up"


def test_compile_helper_count_follows_the_cores_and_the_variable(monkeypatch):
    import os

    from fastcnn.runtime import HELPERS_MAX, compile_helper_count

    monkeypatch.delenv("FASTCNN_COMPILE_HELPERS", raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert compile_helper_count() == max(0, min(HELPERS_MAX, cores - 1))
    default = max(0, min(HELPERS_MAX, cores - 1))
    for value, want in (("0", 0), ("2", 2), (" 3 ", 3), ("999", 16), ("-1", 0), ("x", default), ("\u00b2", default),
                        ("", default)):
        monkeypatch.setenv("FASTCNN_COMPILE_HELPERS", value)
        assert compile_helper_count() == want, value


@pytest.mark.skipif(bool(numba.config.DISABLE_JIT), reason="nothing compiles under NUMBA_DISABLE_JIT")
def test_no_helper_outlives_a_killed_warm_up(tmp_path):
    """SIGKILL to the warm-up's process alone (no cleanup runs there): its helpers see their stdin pipe
    close and exit within seconds."""
    import os
    import signal

    assert _signal_a_cold_warm_up(tmp_path, lambda pid: os.kill(pid, signal.SIGKILL)), \
        "a compile helper outlived its killed warm-up"



# The handler of a signal that lands in a weakref callback (or a ctypes callback of LLVM) runs inside
# it, and Python prints and ignores what the callback raises: that is how a Ctrl-C or SIGTERM during
# a cold compile was lost (the command ran on and exited 0). This script makes it happen every time:
# the signal is sent from inside a weakref callback as the warm-up starts compiling.
SIGNAL_IN_CALLBACK_SCRIPT = """
import os, signal, sys, weakref
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the test runs in the background
import fastcnn.runtime as runtime
compile_kinds = runtime.compile_kinds
class Victim:
    pass
def signal_inside_a_callback(*args, **kwargs):
    victim = Victim()
    def callback(_):
        os.kill(os.getpid(), int(sys.argv[2]))
        for _ in range(100000):  # the handler runs here, and what it raises is ignored
            pass
    ref = weakref.ref(victim, callback)
    del victim
    return compile_kinds(*args, **kwargs)
runtime.compile_kinds = signal_inside_a_callback
from fastcnn.cli import main
main(["bench", sys.argv[1], "--batch-size", "2", "--repeats", "1", "--threads", "1"])
"""


@pytest.mark.skipif(bool(numba.config.DISABLE_JIT), reason="no warm-up under NUMBA_DISABLE_JIT")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_warm_up_is_never_lost(tmp_path, sig):
    """Ctrl-C or SIGTERM while the warm-up compiles, delivered where Python swallows exceptions: the
    warm-up only records it and raises it after the block in hand, so `fastcnn bench` stops with one
    line and 130 or 143 before timing anything."""
    import signal
    import subprocess
    import sys

    config = tmp_path / "net.yaml"
    config.write_text("model:\n  input_shape: [6, 6, 2]\n  num_classes: 3\n  layers:\n"
                      "    - {type: conv2d, filters: 3, kernel_size: 3}\n    - {type: relu}\n"
                      "    - {type: flatten}\n    - {type: dense, units: 3}\ndata: {dataset: synthetic}\n")
    signum = getattr(signal, sig)
    out = subprocess.run([sys.executable, "-c", SIGNAL_IN_CALLBACK_SCRIPT, str(config), str(int(signum))],
                         capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    want = 130 if signum == signal.SIGINT else 143
    assert out.returncode == want, text
    assert out.stderr.rstrip().splitlines()[-1] == ("Error: interrupted" if want == 130 else "Error: terminated"), text
    assert "Stopping after the kernels being compiled" in text, text
    assert "Traceback" not in text and "Exception ignored" not in text and "images/s" not in text, text


def test_deferred_signals_record_raise_at_check_and_leave_other_handlers_alone():
    """In the block a signal whose handler raises (Python's Ctrl-C handler, the CLI's SIGTERM handler)
    is only recorded; check() and leaving raise it (errors.Terminated for SIGTERM); a second signal
    raises at once; an ignored signal stays ignored and a program's own handler keeps being called;
    the handlers are restored."""
    import os
    import signal

    from fastcnn.errors import Terminated
    from fastcnn.runtime import DeferredSignals
    from fastcnn.stopping import raise_terminated

    def deliver(sig):
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs here
            pass

    lines = []
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            with DeferredSignals(lines.append) as deferred:
                deliver(signal.SIGINT)  # recorded, not raised
                assert deferred.signum == signal.SIGINT and len(lines) == 1
                deliver(signal.SIGTERM)  # ignored before the block: stays ignored
                assert deferred.signum == signal.SIGINT
                with pytest.raises(KeyboardInterrupt):
                    deferred.check()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN

        signal.signal(signal.SIGTERM, raise_terminated)
        with pytest.raises(Terminated):
            with DeferredSignals(lines.append):
                deliver(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is raise_terminated
        with pytest.raises(KeyboardInterrupt) as second:
            with DeferredSignals(lines.append):
                deliver(signal.SIGTERM)
                deliver(signal.SIGINT)  # a second signal: raised at once, here
                pytest.fail("the second signal did not raise")
        assert not isinstance(second.value, Terminated)

        calls = []
        signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
        with DeferredSignals(lines.append) as deferred:  # a program's own handler: left alone
            deliver(signal.SIGTERM)
            assert calls == [signal.SIGTERM] and deferred.signum is None
        with DeferredSignals(lines.append):  # no signal: nothing raised
            pass
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


HELPER_COVERAGE = """
import json, sys
import fastcnn
from fastcnn import runtime

cfg = json.loads(sys.argv[1])
def signatures():
    return {(d.py_func.__module__ + "." + d.__name__, str(s)) for d in runtime.kernel_dispatchers()
            for s in d.signatures}
for share in range(2):
    runtime.compile_kinds(cfg, 2, "adam", False, share, 2)
before = signatures()
runtime._warm_up_step(cfg, 2, "adam", False)
print(json.dumps(sorted(map(list, signatures() - before))))
"""


def test_compile_helpers_run_every_kernel_of_the_fused_blocks():
    """What the helpers' shares run (compile_kinds, every share) holds every kernel signature the
    warm-up step then needs for conv + ReLU, conv + batch norm (+ ReLU) and batch norm + ReLU +
    max-pool blocks: none is left to compile one after the other in the main process. A fresh
    process (its dispatchers start empty; the kernels load from Numba's cache)."""
    import json
    import subprocess
    import sys

    conv = {"type": "conv2d", "kernel_size": 3}
    cfg = {"input_shape": [9, 8, 1], "num_classes": 3, "layers": [
        {**conv, "filters": 5, "padding": 1}, {"type": "batchnorm"}, {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 2},
        {**conv, "filters": 16}, {"type": "relu"},
        {**conv, "filters": 7, "padding": "same", "bias": False}, {"type": "batchnorm"}, {"type": "relu"},
        {**conv, "filters": 6, "kernel_size": 1}, {"type": "batchnorm"},
        {"type": "flatten"}, {"type": "dense", "units": 3}]}
    kinds = [type(b).__name__ for b in fastcnn.build_model(cfg, seed=0).blocks]
    assert {"ConvReLU", "ConvBatchNorm", "BatchNormReLU"} <= set(kinds), kinds
    proc = subprocess.run([sys.executable, "-c", HELPER_COVERAGE, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert missing == [], f"compiled only by the warm-up step: {missing}"


def test_compile_helpers_run_every_kernel_with_the_convolution_backward_apart():
    """The same with the convolution's backward a unit of its own (conv2d:backward, after
    Conv2D.record_forward): its gradient kernels' signatures are those the warm-up step needs."""
    import json
    import subprocess
    import sys

    from fastcnn.runtime import helper_kinds

    conv = {"type": "conv2d", "kernel_size": 3}
    cfg = {"input_shape": [9, 8, 3], "num_classes": 3, "layers": [
        {**conv, "filters": 8, "padding": 1}, {"type": "relu"},
        {**conv, "filters": 64, "padding": 1}, {"type": "batchnorm"}, {"type": "relu"},
        {**conv, "filters": 12, "stride": 2}, {"type": "relu"},
        {**conv, "filters": 16, "kernel_size": 1},
        {"type": "flatten"}, {"type": "dense", "units": 3}]}
    assert "conv2d:backward" in helper_kinds(fastcnn.build_model(cfg, seed=0))
    proc = subprocess.run([sys.executable, "-c", HELPER_COVERAGE, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert missing == [], f"compiled only by the warm-up step: {missing}"
