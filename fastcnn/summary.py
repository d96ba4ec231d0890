"""``fastcnn summary``: a per-layer table of a model (Keras ``model.summary()`` style).

Reads shapes, parameter counts, FLOPs and each layer's description from a
built model (each layer type declares them: fastcnn/layers/); needs no data
and compiles no kernel.

>>> info = summarize(build_model(cfg.model), batch_size=64)
>>> print(format_summary(info))
"""
import textwrap

import numpy as np

FLOPS_NOTE = ("FLOPs: forward pass, 2 per multiply-add in conv2d and dense layers; "
              "activations, pooling, batchnorm, flatten and the residual add count as 0; "
              "a residual block's row totals its sub-layers.")
ACTIVATIONS_NOTE = ("Activations: the output of every layer for one image (and the sum each copy "
                    "of a residual block writes), roughly what a training step keeps for the "
                    "backward pass (the input not included).")
PARAMS_NOTE = "Non-trainable parameters: batch-norm running statistics (as in Keras)."


def _walk(index, layer, depth):
    """(index path, layer, depth) for a layer and, depth first, everything nested in it."""
    yield index, layer, depth
    for name, child in layer.children():
        yield from _walk(f"{index}.{name}", child, depth + 1)


def summarize(model, batch_size=None):
    """A dict describing ``model`` layer by layer (JSON-able).

    Keys: ``input_shape``, ``dtype``, ``layers`` (each: ``index``, ``type``,
    ``description``, ``output_shape`` per sample, ``params``, ``trainable_params``,
    ``flops`` per image), ``total_params``, ``trainable_params``,
    ``non_trainable_params``, ``param_bytes``, ``flops_per_image``,
    ``activation_bytes_per_image`` (every layer's output and every residual block's sums, in the
    model's dtype),
    ``batch_size`` with ``flops_per_batch`` and ``activation_bytes_per_batch``
    (when ``batch_size`` is given), and ``notes``.
    """
    itemsize = np.dtype(model.dtype).itemsize
    layers = []
    walk = [row for i, layer in enumerate(model.layers) for row in _walk(str(i), layer, 0)]
    for index, layer, depth in walk:
        # A container (a block with sub-layers) gets a row with its totals, then a row per sub-layer:
        # each row counts its whole subtree, and the totals below add up the top-level rows only.
        trainable = int(sum(p.data.size for _, p in layer.named_parameters()))
        frozen = int(sum(b.size for _, b in layer.named_buffers()))
        out_shape = [int(s) for s in layer.out_shape]
        flops = sum(int(m.flops(1)) for _, m in layer.named_modules())
        layers.append({
            "index": int(index) if index.isdigit() else index,
            "depth": depth,
            "type": layer.kind,
            "description": layer.describe(),
            "output_shape": out_shape,
            "params": trainable + frozen,
            "trainable_params": trainable,
            "flops": flops,
            "activation_elements": int(np.prod(out_shape)),
        })
    top = [r for r in layers if r["depth"] == 0]
    trainable = sum(r["trainable_params"] for r in top)
    total = sum(r["params"] for r in top)
    flops = sum(r["flops"] for r in top)
    # Every leaf's output, plus what a container writes itself (a residual block: its sums, one per copy).
    leaves = [r for r, (_, m, _) in zip(layers, walk) if not m.children()]
    own = [int(np.prod(shape)) for _, m, _ in walk if m.children() and hasattr(m, "own_output_shapes")
           for shape in m.own_output_shapes()]
    act_bytes = (sum(r["activation_elements"] for r in leaves) + sum(own)) * itemsize
    info = {
        "input_shape": [int(s) for s in model.input_shape],
        "num_classes": int(model.num_classes),
        "dtype": str(np.dtype(model.dtype)),
        "layers": layers,
        "total_params": total,
        "trainable_params": trainable,
        "non_trainable_params": total - trainable,
        "param_bytes": total * itemsize,
        "flops_per_image": flops,
        "activation_bytes_per_image": act_bytes,
        "notes": [FLOPS_NOTE, ACTIVATIONS_NOTE],
    }
    if total != trainable:
        info["notes"].append(PARAMS_NOTE)
    if batch_size is not None:
        info["batch_size"] = int(batch_size)
        info["flops_per_batch"] = flops * int(batch_size)
        info["activation_bytes_per_batch"] = act_bytes * int(batch_size)
    return info


def _bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _flops(n):
    for unit, size in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} FLOPs"


def format_summary(info):
    """The text table of a :func:`summarize` dict."""
    header = ("#", "layer", "output shape", "params", "FLOPs/image")
    rows = [(str(r["index"]), "  " * r.get("depth", 0) + r["description"], str(tuple(r["output_shape"])),
             f"{r['params']:,}",
             f"{r['flops']:,}" if r["flops"] else "0") for r in info["layers"]]
    rows.insert(0, ("", "input", str(tuple(info["input_shape"])), "", ""))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    align = ("r", "l", "l", "r", "r")

    def line(cells):
        out = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    dtype = info["dtype"]
    lines = [line(header), rule, *(line(r) for r in rows), rule]
    totals = [
        ("Total params", f"{info['total_params']:,} ({_bytes(info['param_bytes'])} as {dtype})"),
        ("Trainable params", f"{info['trainable_params']:,}"),
        ("Non-trainable params", f"{info['non_trainable_params']:,}"),
        ("Forward FLOPs/image", f"{info['flops_per_image']:,} ({_flops(info['flops_per_image'])})"),
        ("Activations/image", f"{_bytes(info['activation_bytes_per_image'])} ({dtype}, every layer's output)"),
    ]
    if "batch_size" in info:
        totals.append((f"Batch of {info['batch_size']}", f"{_flops(info['flops_per_batch'])} forward, "
                                                         f"{_bytes(info['activation_bytes_per_batch'])} activations"))
    label_width = max(len(k) for k, _ in totals) + 1
    lines += [f"{(k + ':').ljust(label_width)} {v}" for k, v in totals]
    for note in info["notes"]:
        lines += textwrap.wrap(note, width=max(len(rule), 72))
    return "\n".join(lines)
