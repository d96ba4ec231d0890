"""Bar chart of a ``fastcnn bench --json`` report: per-layer forward/backward, fastcnn vs PyTorch.

Usage (from the repository root, with the venv's python; needs matplotlib:
``pip install 'fastcnn[plot]'`` or ``pip install matplotlib``):

    fastcnn bench configs/mnist.yaml --compare torch --json > bench.json
    python scripts/plot_bench.py bench.json                   # writes docs/bench_layers.png
    python scripts/plot_bench.py bench.json --out chart.png --log

Left panel: for each layer (``index kind`` and its output shape), forward and
backward milliseconds, fastcnn and PyTorch (channels_last) side by side, with
the ratio of their total (forward + backward) times above the group. Right
panel: the whole training step (forward + loss + backward + optimizer) and
batch-256 inference, in ms, with images/s on each bar. A report made without
``--compare torch`` plots fastcnn alone.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("docs", "bench_layers.png")

FASTCNN_COLOR = "#1f77b4"
TORCH_COLOR = "#ff7f0e"


def load_report(path):
    """The report dict; tolerates log lines before the JSON object (e.g. a bench run without --json's quiet)."""
    with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        for line in reversed(text.splitlines()):
            if line.lstrip().startswith("{"):
                return json.loads(line)
        raise SystemExit(f"{path}: no JSON report found "
                         f"(make it with: fastcnn bench --compare torch --json > {path})") from None


def _check(report, path):
    missing = [k for k in ("layers", "step", "batch_size") if k not in report]
    if missing:
        raise SystemExit(f"{path}: not a fastcnn bench report (missing {', '.join(missing)})")


def _ratio(r):
    """A ratio for a label; extreme ones (a layer that is almost free in one framework) are capped."""
    if r >= 100:
        return ">100x"
    if r < 0.01:
        return "<0.01x"
    return f"{r:.2f}x"


def has_torch(report):
    layers = report["layers"]
    return bool(layers) and all("torch_forward_ms" in r and "torch_backward_ms" in r for r in layers)


def plot(report, out, log_scale=False, title=None, dpi=120):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = report["layers"]
    torch_ok = has_torch(report)
    labels = []
    for r in layers:
        shape = "x".join(str(s) for s in r.get("output_shape", []))
        labels.append(f"{r['index']} {r['kind']}" + (f"\n{shape}" if shape else ""))

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(9.0, 1.1 * len(layers) + 4.5), 5.2),
                                  gridspec_kw={"width_ratios": [max(len(layers), 3), 2.2]})
    x = np.arange(len(layers))
    series = [("fastcnn forward", [r["forward_ms"] for r in layers], FASTCNN_COLOR, None),
              ("fastcnn backward", [r["backward_ms"] for r in layers], FASTCNN_COLOR, "//")]
    if torch_ok:
        series = [series[0], ("PyTorch forward", [r["torch_forward_ms"] for r in layers], TORCH_COLOR, None),
                  series[1], ("PyTorch backward", [r["torch_backward_ms"] for r in layers], TORCH_COLOR, "//")]
    width = 0.8 / len(series)
    for k, (name, values, color, hatch) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar(x + offset, values, width, label=name, color=color if hatch is None else "white",
               edgecolor=color, hatch=hatch, linewidth=1.0)
    if torch_ok:
        tops = [max(r["forward_ms"], r["backward_ms"], r["torch_forward_ms"], r["torch_backward_ms"]) for r in layers]
        for i, r in enumerate(layers):
            ours = r["forward_ms"] + r["backward_ms"]
            theirs = r["torch_forward_ms"] + r["torch_backward_ms"]
            if ours > 0 and theirs > 0:
                ax.annotate(_ratio(theirs / ours), (x[i], tops[i]), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=8, color="0.25")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ms (median)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title("per layer" + (" (label: PyTorch time / fastcnn time, fwd+bwd)" if torch_ok else ""), fontsize=10)
    ax.legend(fontsize=8, frameon=False, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.12)

    groups = [("training step\nbatch %d" % report["batch_size"], report["step"])]
    if "inference_b256" in report:
        groups.append(("inference\nbatch 256", report["inference_b256"]))
    gx = np.arange(len(groups))
    w = 0.38 if torch_ok else 0.6
    for j, (_name, d) in enumerate(groups):
        bars = [(d["ms"], d["images_per_sec"], FASTCNN_COLOR, "fastcnn", -w / 2 if torch_ok else 0.0)]
        if torch_ok and "torch_ms" in d:
            bars.append((d["torch_ms"], d["torch_images_per_sec"], TORCH_COLOR, "PyTorch", w / 2))
        for ms, ips, color, who, off in bars:
            ax2.bar(gx[j] + off, ms, w, color=color, label=who if j == 0 else None)
            ax2.annotate(f"{ips:,.0f}\nimg/s", (gx[j] + off, ms), textcoords="offset points", xytext=(0, 3),
                         ha="center", fontsize=8)
    ax2.set_xticks(gx)
    ax2.set_xticklabels([g[0] for g in groups], fontsize=8)
    ax2.set_ylabel("ms (median)")
    ax2.set_title("whole step", fontsize=10)
    ax2.legend(fontsize=8, frameon=False, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax2.grid(axis="y", alpha=0.3)
    ax2.margins(y=0.2)

    if title is None:
        who = "fastcnn vs PyTorch (channels_last)" if torch_ok else "fastcnn"
        title = (f"{who}: batch {report['batch_size']}, {report.get('threads', '?')} thread(s), "
                 f"{report.get('cpu', '')}")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="JSON of `fastcnn bench --compare torch --json` ('-': stdin)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    ap.add_argument("--log", action="store_true", help="logarithmic y axis for the per-layer panel")
    ap.add_argument("--title", default=None)
    ap.add_argument("--dpi", type=int, default=120)
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("Error: plot_bench.py needs matplotlib: pip install 'fastcnn[plot]' (or pip install matplotlib)",
              file=sys.stderr)
        return 2
    report = load_report(args.report)
    _check(report, args.report)
    if not has_torch(report):
        print("note: the report has no PyTorch times (made without --compare torch): plotting fastcnn alone",
              file=sys.stderr)
    out = plot(report, args.out, log_scale=args.log, title=args.title, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
