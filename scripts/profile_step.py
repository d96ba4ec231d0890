"""Where a training step's time goes: every kernel call of the step, timed.

Usage:
    python scripts/profile_step.py CONFIG [--batch N] [--threads T] [--steps S] [--by-shape]

Builds the config's model and optimizer, wraps every kernel entry point the layers call with a
timer (a kernel called from inside another kernel counts in its caller; the loss, imported
directly, is not listed), runs
3 warm-up steps (forward, softmax cross-entropy, backward, optimizer update) on random inputs, then
times ``--steps`` steps. Prints the median step time and, per kernel, its time and calls per step,
sorted by time; with ``--by-shape`` one row per kernel and shapes of its first two arguments (e.g.
the input and weights of a convolution), so the same kernel on different layers shows apart. The
kernel times add up to a little less than the step (Python between the calls).
"""
import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def wrap_kernels(totals, counts, by_shape, enabled):
    """Make every kernel the layers, blocks and optimizers call (through their lazy
    ``layers.base.kernel_module`` imports) a timing wrapper that adds into ``totals``/``counts``
    (keyed "module.function", plus argument shapes when ``by_shape``) while ``enabled[0]`` is true.
    Only those lookups are wrapped, not the kernel modules themselves: kernels compiled later still
    see the real functions they call. Must run before the layers' first kernel lookup."""
    from fastcnn.layers.base import kernel_module

    lookup = kernel_module.__getattr__

    def timed_lookup(self, attr):
        kernel = lookup(self, attr)  # the real function (cached on the instance by the lookup)
        if not callable(kernel):
            return kernel
        name = f"{self._name.rsplit('.', 1)[-1]}.{attr}"

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            result = kernel(*args, **kwargs)
            if enabled[0]:
                key = name
                if by_shape:
                    key += " " + " ".join(str(getattr(a, "shape", a)) for a in args[:2])
                totals[key] += time.perf_counter() - t0
                counts[key] += 1
            return result

        setattr(self, attr, timed)
        return timed

    kernel_module.__getattr__ = timed_lookup


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a network config (YAML)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: the config's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    ap.add_argument("--by-shape", action="store_true", help="one row per kernel and argument shapes")
    args = ap.parse_args(argv)
    if args.steps < 1 or (args.batch is not None and args.batch < 1):
        ap.error("--steps and --batch must be at least 1")

    from fastcnn.bench import training_step
    from fastcnn.config import load_config
    from fastcnn.errors import UserError
    from fastcnn.model import build_model
    from fastcnn.optim import build_optimizer
    from fastcnn.runtime import set_threads, warm_up

    try:
        cfg = load_config(args.config)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    threads = set_threads(args.threads if args.threads is not None else cfg.train.threads)
    batch = args.batch or cfg.data.batch_size
    totals, counts, enabled = collections.defaultdict(float), collections.Counter(), [False]
    wrap_kernels(totals, counts, args.by_shape, enabled)
    warm_up(cfg.model, log=lambda *a: None, optimizer=cfg.train.optimizer)

    model = build_model(cfg.model, seed=cfg.seed)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *model.input_shape)).astype(model.dtype)
    labels = rng.integers(0, model.num_classes, size=batch)
    step = training_step(model, build_optimizer(cfg.train.optimizer, model.parameters()), x, labels)

    for _ in range(3):
        step()
    enabled[0] = True
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_ms = float(np.median(times)) * 1e3
    print(f"{args.config}: batch {batch}, {threads} thread(s), {args.steps} steps")
    print(f"step median {step_ms:.2f} ms ({batch / step_ms * 1e3:.0f} images/s); "
          f"kernels {sum(totals.values()) / args.steps * 1e3:.2f} ms per step")
    print(f"{'ms/step':>9} {'% step':>7} {'calls':>6}  kernel")
    for key, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        ms = seconds / args.steps * 1e3
        print(f"{ms:9.3f} {100 * ms / step_ms:6.1f}% {counts[key] // args.steps:6d}  {key}")


if __name__ == "__main__":
    main()
