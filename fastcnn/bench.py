"""``fastcnn bench``: per-layer forward/backward times, GFLOP/s and the training step.

One row per block the training step runs: a layer, a fused block (e.g. batchnorm+relu), or a whole
residual block, timed with everything inside it and its GFLOP/s computed from the FLOPs of its
whole subtree (``block_flops``). Every figure is a median over ``repeats`` timed runs after warm-up. With
``compare="torch"`` the same layer (same weights, channels_last) and the same
training step are timed in PyTorch, in the same process, right after ours.
"""
import os
import platform
import statistics
import time

import numpy as np


def _median_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak_gflops(threads, torch=None, size=2048, repeats=5):
    """The machine's float32 matmul rate with ``threads`` threads, measured now: (GFLOP/s, source).

    The best of: torch.mm on ``threads`` threads (when torch is installed);
    NumPy's BLAS on one thread (fastcnn keeps BLAS single-threaded) times
    ``threads``; and fastcnn's own GEMM microkernel, run as a 1x1 convolution
    of (16, 16, 16, 512) by (512, 512), which is a plain matrix product.
    """
    from .kernels.conv import conv2d_forward

    rng = np.random.default_rng(0)
    a = rng.normal(size=(size, size)).astype(np.float32)
    b = rng.normal(size=(size, size)).astype(np.float32)
    flops = 2 * size ** 3
    rates = {f"numpy matmul, 1 thread x {threads}": flops / _median_ms(lambda: a @ b, repeats) / 1e6 * threads}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rates[f"torch.mm, {threads} thread(s)"] = flops / _median_ms(lambda: torch.mm(ta, tb), repeats) / 1e6
    x = rng.normal(size=(16, 16, 16, 512)).astype(np.float32)
    w = rng.normal(size=(1, 1, 512, 512)).astype(np.float32)
    bias, y = np.zeros(512, np.float32), np.empty((16, 16, 16, 512), np.float32)
    ms = _median_ms(lambda: conv2d_forward(x, w, bias, y, 1, 1, 0, 0, 1, 1), repeats * 4)
    rates[f"fastcnn GEMM kernel, {threads} thread(s)"] = 2 * 16 * 16 * 16 * 512 * 512 / ms / 1e6
    source = max(rates, key=rates.get)
    return rates[source], source


def block_flops(block, batch):
    """Forward FLOPs of what one bench row runs: a layer with everything nested in it (a residual
    block's sub-layers: its own add counts 0), or a fused block's layers."""
    if hasattr(block, "named_modules"):
        return sum(int(m.flops(batch)) for _, m in block.named_modules())
    return sum(block_flops(layer, batch) for layer in block.layers) if hasattr(block, "layers") else block.flops(batch)


def _gflops(flops, ms):
    return flops / ms / 1e6 if flops and ms > 0 else None


def training_step(model, optimizer, x, labels):
    """The training step every benchmark times, as a no-argument function: the forward in training
    mode, softmax cross-entropy, the backward (no gradient for the input), the optimizer's update.
    The trainer's fastcnn.train_step less its NaN/Inf checks and accuracy count: the same work as
    the PyTorch step it is compared with."""
    from .losses import softmax_cross_entropy

    def step():
        logits = model.forward(x, training=True)
        _, dlogits = softmax_cross_entropy(logits, labels)
        model.backward(dlogits, input_grad=False)
        optimizer.step()

    return step


def run_bench(config=None, batch_size=64, threads=None, repeats=20, compare=None, log=print, peak=None):
    """Measure and return a report dict (see ``print_report``).

    ``peak``: a (GFLOP/s, source) pair measured beforehand (e.g. once for a whole benchmark suite) to
    use instead of measuring ``matmul_peak_gflops`` here.
    """
    from .config import load_config, validate
    from .model import build_model
    from .optim import build_optimizer
    from .runtime import set_threads, warm_up
    from .torch_reference import import_torch, to_torch_input, torch_layer

    cfg = load_config(config) if config else validate({"model": {}, "data": {"dataset": "mnist"}})
    n_threads = (set_threads(threads, key="--threads") if threads is not None else set_threads(cfg.train.threads))
    torch = None
    if compare == "torch":
        torch = import_torch()
        if torch is None:
            log("PyTorch is not installed: --compare torch skipped (pip install torch==2.13.0)")
        else:
            torch.set_num_threads(n_threads)
    log(f"fastcnn bench: batch {batch_size}, {n_threads} thread(s), {cpu_name()}")
    warm_up(cfg.model, log=log, optimizer=cfg.train.optimizer)

    model = build_model(cfg.model, seed=cfg.seed)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, *model.input_shape)).astype(model.dtype)
    labels = rng.integers(0, model.num_classes, size=batch_size)
    # All of fastcnn's timings come first: PyTorch's OpenMP threads keep spinning for a while after
    # each of its calls and would steal the cores from ours.
    # Time what a training step runs: the fused blocks (e.g. relu+maxpool2d) as one row each.
    rows, saved = [], []
    act = x
    index = 0
    for layer in model.blocks:
        i, index = index, index + len(getattr(layer, "layers", (layer,)))
        inp = act.copy()
        out = layer.forward(inp, True)
        fwd_ms = _median_ms(lambda: layer.forward(inp, True), repeats)
        act = layer.forward(inp, True).copy()
        dy = rng.normal(size=out.shape).astype(model.dtype)
        layer.forward(inp, True)
        # As in training, the first layer computes no input gradient (nothing upstream needs it).
        input_grad = i > 0
        bwd_ms = _median_ms(lambda: layer.backward(dy, input_grad), repeats)
        f = block_flops(layer, batch_size)
        row = {"index": i, "layer": repr(layer), "kind": layer.kind, "output_shape": list(out.shape[1:]),
               "flops": f, "forward_ms": fwd_ms, "backward_ms": bwd_ms,
               "forward_gflops": _gflops(f, fwd_ms), "backward_gflops": _gflops((2 if input_grad else 1) * f, bwd_ms),
               "backward_input_grad": input_grad}
        rows.append(row)
        saved.append((layer, inp, dy, input_grad))

    step = training_step(model, build_optimizer(cfg.train.optimizer, model.parameters()), x, labels)
    step_ms = _median_ms(step, repeats)
    infer_x = rng.normal(size=(256, *model.input_shape)).astype(model.dtype)
    infer_ms = _median_ms(lambda: model.forward(infer_x, training=False), max(3, repeats // 2))
    peak, peak_source = peak if peak is not None else matmul_peak_gflops(n_threads, torch)
    for row in rows:
        for key in ("forward", "backward"):
            g = row[f"{key}_gflops"]
            row[f"{key}_peak_pct"] = 100 * g / peak if g else None
    if torch is not None:
        for row, (layer, inp, dy, input_grad) in zip(rows, saved):
            row.update(_torch_layer_times(layer, inp, dy, torch, repeats, to_torch_input, torch_layer, input_grad))
    report = {
        "batch_size": batch_size, "threads": n_threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "matmul_peak_gflops": peak, "matmul_peak_source": peak_source, "layers": rows,
        "step": {"ms": step_ms, "images_per_sec": batch_size / step_ms * 1e3},
        "inference_b256": {"ms": infer_ms, "images_per_sec": 256 / infer_ms * 1e3},
    }
    if torch is not None:
        report["step"].update(_torch_step(model, x, labels, cfg, torch, repeats))
        report["inference_b256"].update(_torch_inference(model, infer_x, torch, max(3, repeats // 2)))
    return report


def _torch_layer_times(layer, inp, dy, torch, repeats, to_torch_input, torch_layer, input_grad=True):
    parts = getattr(layer, "layers", (layer,))  # a fused block: its layers in sequence, as PyTorch runs them
    mod = torch.nn.Sequential(*[torch_layer(part, torch) for part in parts])
    four_d = inp.ndim == 4
    t_in = to_torch_input(inp, torch) if four_d else torch.from_numpy(inp.copy())
    t_in = t_in.detach().requires_grad_(input_grad)
    if four_d:
        mod = mod.to(memory_format=torch.channels_last)
    mod.train()
    out = mod(t_in)
    t_dy = torch.from_numpy(dy.copy())
    if t_dy.dim() == 4:
        t_dy = t_dy.permute(0, 3, 1, 2)
    t_dy = t_dy.reshape(out.shape) if t_dy.shape != out.shape else t_dy

    def fwd():
        with torch.no_grad():
            mod(t_in)

    def fwd_bwd():
        o = mod(t_in)
        o.backward(t_dy)

    fwd_ms = _median_ms(fwd, repeats)
    if not out.requires_grad:  # a first block without parameters: no backward pass in training
        return {"torch_forward_ms": fwd_ms, "torch_backward_ms": 0.0}
    both_ms = _median_ms(fwd_bwd, repeats)
    return {"torch_forward_ms": fwd_ms, "torch_backward_ms": max(both_ms - fwd_ms, 0.0)}


def _torch_step(model, x, labels, cfg, torch, repeats):
    from .optim import torch_optimizer
    from .torch_reference import to_torch_input, torch_model

    net = torch_model(model, torch, channels_last=True)
    opt = torch_optimizer(torch, net.parameters(), cfg.train.optimizer)
    tx = to_torch_input(x, torch).contiguous(memory_format=torch.channels_last)
    ty = torch.from_numpy(labels)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(tx), ty)
        loss.backward()
        opt.step()

    ms = _median_ms(step, repeats)
    return {"torch_ms": ms, "torch_images_per_sec": len(x) / ms * 1e3}


def _torch_inference(model, x, torch, repeats):
    from .torch_reference import to_torch_input, torch_model

    net = torch_model(model, torch, channels_last=True).eval()
    tx = to_torch_input(x, torch).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad():
            net(tx)

    ms = _median_ms(run, repeats)
    return {"torch_ms": ms, "torch_images_per_sec": len(x) / ms * 1e3}


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_report(report, echo=print):
    """A human-readable table of a bench report."""
    has_torch = "torch_ms" in report["step"]
    echo(f"\nbatch {report['batch_size']}, {report['threads']} thread(s), {report['cpu']}; "
         f"matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s ({report['matmul_peak_source']})")
    head = f"{'#':>2} {'layer':<24} {'fwd ms':>8} {'GFLOP/s':>8} {'%peak':>6} {'bwd ms':>8} {'GFLOP/s':>8} {'%peak':>6}"
    if has_torch:
        head += f" {'torch fwd':>10} {'torch bwd':>10}"
    echo(head)
    for r in report["layers"]:
        line = (f"{r['index']:>2} {r['kind']:<24} {r['forward_ms']:>8.3f} {_fmt(r['forward_gflops'], '8.1f'):>8} "
                f"{_fmt(r['forward_peak_pct'], '5.0f'):>6} {r['backward_ms']:>8.3f} "
                f"{_fmt(r['backward_gflops'], '8.1f'):>8} {_fmt(r['backward_peak_pct'], '5.0f'):>6}")
        if has_torch:
            line += f" {r['torch_forward_ms']:>10.3f} {r['torch_backward_ms']:>10.3f}"
        echo(line)
    if report["layers"] and not report["layers"][0]["backward_input_grad"]:
        echo("(row 0's backward is its weight gradient only: training never needs the input's gradient)")
    s, inf = report["step"], report["inference_b256"]
    line = f"training step (fwd + loss + bwd + optimizer): {s['ms']:.2f} ms, {s['images_per_sec']:.0f} images/s"
    if has_torch:
        line += (f"; PyTorch channels_last {s['torch_ms']:.2f} ms, {s['torch_images_per_sec']:.0f} images/s "
                 f"(fastcnn/PyTorch = {s['images_per_sec'] / s['torch_images_per_sec']:.2f}x)")
    echo(line)
    line = f"inference, batch 256: {inf['ms']:.2f} ms, {inf['images_per_sec']:.0f} images/s"
    if has_torch:
        line += (f"; PyTorch {inf['torch_images_per_sec']:.0f} images/s "
                 f"({inf['images_per_sec'] / inf['torch_images_per_sec']:.2f}x)")
    echo(line)
