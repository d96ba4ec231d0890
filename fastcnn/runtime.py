"""The kernels' runtime: thread control and kernel warm-up (compile or load from Numba's cache).

Used by every command that runs kernels: ``fastcnn train``, ``eval``, ``bench``, ``predict``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ConfigError
from .stopping import SignalFlag, raise_terminated


def set_threads(threads: int | None, key: str = "train.threads") -> int:
    """Numba's thread count for the kernels (None: all cores). Returns the count in use.

    ``key`` names the setting in errors (``--threads`` for commands without a config).
    """
    import numba

    if threads is None:
        return numba.get_num_threads()
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise ConfigError(key, f"must be between 1 and {limit} (the cores Numba was started with), got {threads}")
    numba.set_num_threads(threads)
    return threads


def kernel_dispatchers() -> list:
    """Every Numba dispatcher in fastcnn.kernels (for compile statistics)."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    from . import kernels

    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        found += [obj for obj in vars(module).values() if isinstance(obj, CPUDispatcher)]
    return found


def compile_stats() -> tuple[int, int]:
    """(compiled from scratch, loaded from the on-disk cache) counts so far, over all kernels."""
    compiled = loaded = 0
    for d in kernel_dispatchers():
        compiled += sum(d.stats.cache_misses.values())
        loaded += sum(d.stats.cache_hits.values())
    return compiled, loaded


def warm_up(model_cfg: Any, batch: int = 2, log: Callable[[str], Any] = print, optimizer: Any = "adam",
            clip: bool = False) -> float:
    """Compile (or load from cache) every kernel a training step uses, on a throwaway copy of the model.

    ``optimizer``: a name or the run's ``train.optimizer`` mapping (its options pick the kernel paths,
    e.g. SGD with momentum). Only that optimizer's kernel (and the clipping kernels if ``clip``) are
    compiled: every kernel costs a second or two of a cold start.

    The real model's state (batch-norm running statistics) is untouched. On a cold start (still
    compiling after a second) helper processes compile part of the kernels beside this one (see
    CompileHelpers below; ``FASTCNN_COMPILE_HELPERS=0`` turns them off).
    Returns seconds spent.
    """
    import threading

    start = time.perf_counter()
    before = compile_stats()
    from .model import build_model

    scratch = build_model(model_cfg, seed=0)  # throwaway: this process's share, then the step
    helpers = CompileHelpers(model_cfg, batch, optimizer, clip, kinds=len(helper_kinds(scratch)))

    # Loading cached kernels takes well under a second; if we are still here after one, Numba is compiling:
    # say so while it happens rather than after a silent pause, and start helper processes that compile
    # the network's other kernels beside this one (Numba compiles one function at a time per process).
    def compiling():
        log("Compiling kernels (first run after an install or upgrade; cached for the next runs)...")
        helpers.start()

    notice = threading.Timer(1.0, compiling)
    notice.daemon = True
    with DeferredSignals(log) as signals:
        notice.start()
        try:
            # This process's share of the kinds first (all of them when no helper will start), then the
            # trainer's own step, which finds the helpers' kernels in the cache and compiles what is left.
            compile_kinds(model_cfg, batch, optimizer, clip, 0, helpers.count + 1, scratch=scratch,
                          check=signals.check)
            signals.check()
            _warm_up_step(model_cfg, batch, optimizer, clip, scratch=scratch)
        finally:
            notice.cancel()
            notice.join()
            helpers.stop()
    seconds = time.perf_counter() - start
    compiled, loaded = (a - b for a, b in zip(compile_stats(), before))
    if compiled:
        alongside = (f" with {helpers.started} helper process(es) alongside ({loaded} more loaded from the cache)"
                     if helpers.started else "")
        log(f"Compiled {compiled} kernel(s) in {seconds:.1f} s{alongside} (first run; cached for the next ones)")
    else:
        log(f"Kernels loaded from cache in {seconds:.2f} s")
    return seconds


class DeferredSignals(SignalFlag):
    """Ctrl-C and SIGTERM inside the block only record the signal when their handler raises (Python's
    KeyboardInterrupt handler for SIGINT, the CLI's stopping.raise_terminated for SIGTERM); ``check()``
    raises it (KeyboardInterrupt, or errors.Terminated for SIGTERM) where no compiler frame is on the
    stack, and so does leaving the block.

    Why: Python runs a signal handler between two bytecodes of the main thread, and while Numba
    compiles those are often inside a weakref callback or a callback from LLVM through ctypes, which
    print and swallow the handler's exception: the signal was lost (the command ran on, exit 0), or
    the exception left Numba's compiler half-way and a later call failed with "RuntimeError: no
    compiled object yet". A second signal raises at once, as in the training loop (a best effort
    while a kernel compiles). Other handlers are left alone: SIG_DFL (the process dies), SIG_IGN, a
    program's own handler.
    """

    def __init__(self, log: Callable[[str], Any] = print):
        super().__init__()
        self._log = log

    def takes(self, sig, handler) -> bool:
        import signal

        return handler is (signal.default_int_handler if sig == signal.SIGINT else raise_terminated)

    def recorded(self) -> None:
        self._log("Stopping after the kernels being compiled, which can take seconds (again to stop at once)")

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None:
            self.check()
        return False


# -- compile helpers ---------------------------------------------------------------------------
#
# Numba compiles one function at a time in a process, and a cold start of a network compiles 20-30
# kernels (about 50 s for the seed network on a 2-core Zen 3). The warm-up cuts the network's leaf
# blocks (fused blocks and layers, residual bodies and shortcuts opened up) into kinds that run the
# same kernels, plus "head" (the loss and the optimizer), the convolution (groups 1) as two kinds, its
# forward ("conv2d") and its backward ("conv2d:backward": its two gradient kernels, half the cold
# compile of a plain CNN, run after Conv2D.record_forward instead of a forward; not when an input
# gradient runs the forward's kernel: both would compile it), and deals the kinds to 1 + H shares of
# about equal estimated compile time (KIND_COST). This process runs share 0 (forward, backward and
# evaluation forward of those blocks on a throwaway model). When it is still compiling after a
# second, H helper processes (one per further core, at most HELPERS_MAX) start and run shares 1..H
# the same way. What a helper compiles lands in Numba's on-disk cache, where this process's own warm-up
# step, run after its share, finds it (each new signature looks there before compiling). The helpers
# only save time: that step runs whatever happened to them, so a helper that fails, is slow or is
# stopped changes nothing but the time. They are killed (SIGTERM, default action: a KeyboardInterrupt
# raised inside Numba's compiler can be swallowed by an LLVM callback) when the warm-up ends, however
# it ends; die at once on Ctrl-C (same process group); and exit when this process dies any other way
# (their stdin is a pipe from it: end of file). A helper killed while Numba writes a cache file may
# leave a "*.tmp.*" file there; Numba never reads those.

HELPERS_MAX = 3
# Estimated cold compile seconds of a kind's kernels (2-core Zen 3, measured with
# `scripts/profile_compile.py CONFIG --kinds` on configs/mnist.yaml, resnet20_cifar10.yaml and
# mobilenet_cifar10.yaml); only the balance of the shares depends on them.
# A kind whose backward is a kind of its own costs its own figure less its backward's (_kind_cost).
KIND_COST = {"conv2d": 28.0, "conv2d:backward": 16.0, "conv2d/g": 17.0, "relu+maxpool2d": 7.0,
             "leaky_relu+maxpool2d": 7.0, "batchnorm+relu+maxpool2d": 10.0, "batchnorm+relu": 9.0, "dense": 6.5,
             "batchnorm": 5.0, "maxpool2d": 4.0, "avgpool2d": 3.0, "global_avgpool": 3.0, "head": 2.0}


def compile_helper_count() -> int:
    """Helper processes a cold warm-up may start: one per core beyond the first, at most HELPERS_MAX;
    ``FASTCNN_COMPILE_HELPERS=n`` overrides it (clamped to 0..16; not an integer: ignored)."""
    import os

    value = os.environ.get("FASTCNN_COMPILE_HELPERS", "").strip()
    try:
        return min(max(int(value), 0), 16)
    except ValueError:
        pass
    from .distributed import usable_cpu_count

    return max(0, min(HELPERS_MAX, usable_cpu_count() - 1))


def leaf_blocks(model) -> list:
    """The model's blocks in forward order, residual blocks opened up into their copies' body and
    shortcut blocks (recursively), and a convolution fused with what follows it into its ``parts``
    (the convolution, then the rest: the same kernels, so the conv2d kind compiles them once): the
    units a compile helper runs on their own."""
    from .layers.residual import Residual

    out = []

    def visit(block):
        if isinstance(block, Residual):
            for inner in block.branch_blocks():
                visit(inner)
        elif hasattr(block, "parts"):
            for inner in block.parts:
                visit(inner)
        else:
            out.append(block)

    for block in model.blocks:
        visit(block)
    return out


def _leaf_kind(block) -> str:
    """Blocks of one kind run the same kernels: a helper takes all of a kind (conv2d with groups runs
    other kernels than without)."""
    kind = getattr(block, "kind", type(block).__name__)
    groups = getattr(block, "groups", 1)
    return f"{kind}/g" if groups != 1 else kind


def helper_kinds(model) -> list:
    """The kinds of the model's leaf blocks in forward order (first appearance; "conv2d" followed by
    "conv2d:backward" unless an input gradient, the first block's aside, runs the forward's kernel),
    then "head" (the loss and the optimizer). compile_kinds runs a kind "K" with a "K:backward" as the
    forwards alone (training and evaluation), and "K:backward" as the backward after the block's
    record_forward."""
    leaves = leaf_blocks(model)
    first = leaves[0] if leaves else None  # its input gradient is never computed
    split = not any(_leaf_kind(b) == "conv2d" and b is not first and b.input_gradient_runs_forward_kernel()
                    for b in leaves)
    kinds = []
    for block in leaves:
        kind = _leaf_kind(block)
        if kind not in kinds:
            kinds += [kind, kind + ":backward"] if kind == "conv2d" and split else [kind]
    return kinds + ["head"]


def kind_shares(kinds, shares) -> list:
    """The kinds dealt to ``shares`` lists of about equal KIND_COST (largest first, each to the
    lightest share so far; ties to the lower share): deterministic, so every process computes the
    same shares."""
    dealt = [[] for _ in range(max(1, shares))]
    load = [0.0] * len(dealt)
    for kind in sorted(kinds, key=lambda k: -_kind_cost(k, kinds)):  # stable: forward order for ties
        i = load.index(min(load))
        dealt[i].append(kind)
        load[i] += _kind_cost(kind, kinds)
    return dealt


def _kind_cost(kind, kinds) -> float:
    """KIND_COST of ``kind`` among ``kinds`` (2 when unknown): less its backward's when that is a kind
    of its own."""
    cost = KIND_COST.get(kind, 2.0)
    if kind + ":backward" in kinds:
        cost -= KIND_COST.get(kind + ":backward", 0.0)
    return cost


class CompileHelpers:
    """The helper processes of one warm-up (see above): ``start()`` (from the notice timer), ``stop()``."""

    def __init__(self, model_cfg, batch, optimizer, clip, kinds):
        self.args = {"model": model_cfg, "batch": batch, "optimizer": optimizer, "clip": bool(clip)}
        self.count = max(0, min(compile_helper_count(), kinds - 1))  # no share without a kind
        self.procs = []
        self.started = 0

    def start(self) -> None:
        import json
        import os
        import subprocess
        import sys

        count = self.count
        if count < 1:
            return
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # Not the run's fault injection, nor an MPI launcher's handles (a helper is no rank).
        env = {k: v for k, v in os.environ.items() if k != "FASTCNN_FAULT" and not k.startswith("PMI_")}
        env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["NUMBA_NUM_THREADS"] = "1"  # compiling needs no kernel threads
        try:
            payload = json.dumps(self.args)
        except (TypeError, ValueError):
            return  # a model given as something JSON cannot carry: no helpers, only slower
        for helper in range(count):
            try:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", "import sys; from fastcnn.runtime import compile_helper_main; "
                                           "compile_helper_main(sys.argv[1:])", payload, str(helper + 1),
                     str(count + 1)],
                    env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self.started += 1
            except OSError:
                break

    def stop(self) -> None:
        import subprocess

        try:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:  # even when a second Ctrl-C lands in the waits above
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdin is not None:
                    proc.stdin.close()
            self.procs = []


def compile_helper_main(argv) -> None:
    """A compile helper's body (a fresh ``python -c`` process): argv = [json args, share, shares]."""
    import json
    import os
    import signal
    import sys
    import threading

    # SIGTERM (the warm-up is done) and SIGINT (Ctrl-C) end it at once: their default actions, SIGINT's
    # even when the parent was started with it ignored (a background job), which a child inherits.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    def exit_with_parent():  # stdin is a pipe from the warm-up's process: end of file when it is gone
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    args = json.loads(argv[0])
    share, shares = int(argv[1]), int(argv[2])
    compile_kinds(args["model"], args["batch"], args["optimizer"], args["clip"], share, shares)


def compile_kinds(model_cfg, batch, optimizer, clip, share, shares, scratch=None, check=None) -> list:
    """Run, on a throwaway model, the leaf blocks of the kinds of share ``share`` of ``shares``
    (kind_shares; training forward, backward, evaluation forward, from zero inputs) and, for "head",
    the loss and one optimizer step on zero gradients: what compiles their kernels. Returns the kinds
    done, in order. ``scratch``: the throwaway model, when the caller built it already; ``check``: called
    after each call that compiles (DeferredSignals.check)."""
    from .losses import softmax_cross_entropy
    from .model import build_model
    from .optim import build_optimizer, clip_grad_norm

    scratch = build_model(model_cfg, seed=0) if scratch is None else scratch
    check = check or (lambda: None)
    for _, module in scratch.named_modules():
        if getattr(module, "uses_step", False):
            module.step = 0
    leaves = leaf_blocks(scratch)
    first = leaves[0] if leaves else None
    done = []
    kinds = helper_kinds(scratch)
    for kind in kind_shares(kinds, shares)[share]:
        if kind == "head":
            logits = np.zeros((batch, scratch.num_classes), scratch.dtype)
            softmax_cross_entropy(logits, np.zeros(batch, np.int64))
            params = scratch.parameters()
            for p in params:
                p.grad[...] = 0
            if clip:
                clip_grad_norm(params, 1.0)
            build_optimizer(_optimizer_options(optimizer), params).step()
            check()
        else:
            leaf_kind, _, part = kind.partition(":")
            split = leaf_kind + ":backward" in kinds
            for block in leaves:
                if _leaf_kind(block) != leaf_kind:
                    continue
                x = np.zeros((batch, *_block_in_shape(block)), scratch.dtype)
                # Each call compiles its kernels; a recorded signal is raised between them.
                if part == "backward":
                    block.record_forward(x)
                    block.backward(np.zeros((batch, *block.out_shape), scratch.dtype),
                                   need_input_grad=block is not first)
                    check()
                    continue
                y = block.forward(x, True)
                check()
                if not split:
                    block.backward(np.zeros_like(y), need_input_grad=block is not first)
                    check()
                block.forward(x, False)
                check()
        done.append(kind)
    return done


def _block_in_shape(block):
    """The per-sample input shape of a layer or a fused block (its first layer's)."""
    layers = getattr(block, "layers", None)
    return tuple((layers[0] if layers else block).in_shape)


def _optimizer_options(optimizer):
    """The warm-up's ``optimizer`` (a name or a ``train.optimizer`` mapping) as options."""
    return dict(optimizer) if isinstance(optimizer, dict) else {"name": optimizer}


def _warm_up_step(model_cfg, batch, optimizer, clip, scratch=None):
    """One training step (the trainer's own) and one evaluation forward on a throwaway model
    (``scratch``, else one built here)."""
    from .model import build_model
    from .optim import build_optimizer
    from .step import train_step

    scratch = build_model(model_cfg, seed=0) if scratch is None else scratch
    opt = build_optimizer(_optimizer_options(optimizer), scratch.parameters())
    x = np.zeros((batch, *scratch.input_shape), scratch.dtype)
    labels = np.zeros(batch, np.int64)
    train_step(scratch, opt, x, labels, clip_grad_norm=1.0 if clip else None)
    scratch.forward(x, training=False)
