"""Where a cold start's compile time goes: each kernel's Numba compile, timed.

Usage:
    python scripts/profile_compile.py configs/mnist.yaml [--cached] [--top 25]
    python scripts/profile_compile.py configs/mnist.yaml --kinds

Runs the trainer's warm-up (fastcnn.runtime.warm_up: one training step and one evaluation forward
on a throwaway copy of the config's model) in this process, without compile helpers, with every
Numba compile timed. By
default Numba's cache is a fresh, empty temporary folder (the project's cache is neither read nor
written), so every kernel compiles as on a first run; ``--cached`` uses the usual cache instead
(then little or nothing compiles). Prints the total with the warm-up's own last line, then per function the
seconds spent compiling it minus the time spent compiling the functions it calls ("self"), the
time including them, and how many signatures were compiled; sorted by self time.

``--kinds`` times the compile helpers' units instead (fastcnn.runtime.helper_kinds: the model's leaf
block kinds, "head"), one after the other in this process in forward order, then the warm-up step
(what the units left to compile): the figures behind runtime.KIND_COST, which deals the kinds to the
helper processes. A kind compiled later finds the helpers it shares with earlier kinds compiled.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def profile(config, top):
    from numba.core import dispatcher

    rows = []
    stack = []
    original = dispatcher.Dispatcher.compile

    def timed(self, sig):
        t0 = time.perf_counter()
        stack.append(0.0)
        try:
            return original(self, sig)
        finally:
            spent = time.perf_counter() - t0
            nested = stack.pop()
            if stack:
                stack[-1] += spent
            rows.append((spent - nested, spent, f"{self.py_func.__module__}.{self.py_func.__qualname__}"))

    dispatcher.Dispatcher.compile = timed
    try:
        from fastcnn import runtime
        from fastcnn.config import load_config

        cfg = load_config(config)
        t0 = time.perf_counter()
        said = []
        runtime.warm_up(cfg.model, log=said.append, optimizer=cfg.train.optimizer,
                        clip=cfg.train.clip_grad_norm is not None)
        total = time.perf_counter() - t0
    finally:
        dispatcher.Dispatcher.compile = original
    per_function = {}
    for own, spent, name in rows:
        entry = per_function.setdefault(name, [0.0, 0.0, 0])
        entry[0] += own
        entry[1] += spent
        entry[2] += 1
    print(f"warm-up {total:.1f} s ({said[-1] if said else 'nothing said'}); compile time by function "
          "(self / including callees / signatures):")
    for name, (own, spent, count) in sorted(per_function.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{own:7.2f} s {spent:7.2f} s  x{count:<3d} {name}")
    return total, per_function


def profile_kinds(config):
    """Each compile kind's seconds (runtime.compile_kinds, one kind per share), then the warm-up step's."""
    from fastcnn import runtime
    from fastcnn.config import load_config
    from fastcnn.model import build_model

    cfg = load_config(config)
    clip = cfg.train.clip_grad_norm is not None
    scratch = build_model(cfg.model, seed=0)
    kinds = runtime.helper_kinds(scratch)
    rows = []
    for kind in kinds:  # one share per kind, in forward order
        t0 = time.perf_counter()
        runtime.compile_kinds(cfg.model, 2, cfg.train.optimizer, clip, runtime.kind_shares(kinds, len(kinds)).index(
            [kind]), len(kinds), scratch=scratch)
        rows.append((kind, time.perf_counter() - t0))
    t0 = time.perf_counter()
    runtime._warm_up_step(cfg.model, 2, cfg.train.optimizer, clip, scratch=scratch)
    rows.append(("(warm-up step after them)", time.perf_counter() - t0))
    print(f"cold compile by kind, {sum(t for _, t in rows):.1f} s in all:")
    for kind, spent in rows:
        print(f"{spent:7.2f} s  {kind}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a model config (e.g. configs/mnist.yaml)")
    ap.add_argument("--cached", action="store_true", help="use Numba's usual cache instead of an empty one")
    ap.add_argument("--top", type=int, default=25, help="functions to list")
    ap.add_argument("--kinds", action="store_true", help="time the compile helpers' units (kinds) instead")
    args = ap.parse_args(argv)
    if "numba" in sys.modules:
        raise SystemExit("error: numba was imported before the cache folder was chosen")
    os.environ["FASTCNN_COMPILE_HELPERS"] = "0"  # every kernel compiled here, none by a helper process
    cache = None
    if not args.cached:
        cache = tempfile.mkdtemp(prefix="fastcnn_cold_compile_")
        os.environ["NUMBA_CACHE_DIR"] = cache
    try:
        if args.kinds:
            profile_kinds(args.config)
        else:
            profile(args.config, args.top)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
