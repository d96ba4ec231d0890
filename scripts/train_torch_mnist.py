"""Train the seed network in plain PyTorch, the way ``fastcnn train configs/mnist.yaml`` does.

Usage (from the repository root, with the venv's python):

    python scripts/train_torch_mnist.py                       # 5 epochs, all cores, $FASTCNN_DATA
    python scripts/train_torch_mnist.py --epochs 1 --threads 2 --data-root ../shared/data
    python scripts/train_torch_mnist.py --config configs/mnist_bn.yaml --metrics-jsonl runs/torch_bn.jsonl

What is the same as fastcnn's trainer: the network of the config (its layers,
with ``flatten`` in NHWC order), the data (``fastcnn.data.load_dataset``: same
files, same normalization (x/255 - 0.1307)/0.3081), the batches
(``fastcnn.data.BatchLoader`` with the config's batch size (64) and seed, so
the very same shuffling order, epoch by epoch), the optimizer (the config's:
Adam, lr 0.001), float32, channels_last activations (the NHWC bytes of the
batch are used as they are), and the per-epoch bookkeeping: ``epoch_seconds``
covers the training loop only (batching included; evaluation excluded), as in
fastcnn's metrics.jsonl, and a loss/accuracy sum is read every step.

What differs on purpose: weights start from PyTorch's default initialization
(``reset_parameters`` after ``torch.manual_seed(seed)``; ``--init fastcnn``
copies fastcnn's initial weights instead, which imports Numba). This script
does not import Numba by default, so its memory figures are PyTorch's alone.

Prints one line per epoch, and with ``--metrics-jsonl PATH`` writes one JSON
line per epoch with the keys of fastcnn's metrics.jsonl (epoch, step,
train_loss, train_accuracy, val_loss, val_accuracy, images_per_sec,
epoch_seconds, lr).
"""
import argparse
import json
import os
import sys
import time

_STARTED = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_size(n, k, s, p_total, d):
    return (n + p_total - d * (k - 1) - 1) // s + 1


def build_torch_net(model_cfg, torch):
    """A torch.nn.Sequential for a validated ``model`` section (NCHW semantics, NHWC-ordered flatten)."""
    nn = torch.nn
    h, w, c = model_cfg["input_shape"]
    features = None  # set once flattened
    mods = []
    for i, spec in enumerate(model_cfg["layers"]):
        kind = spec["type"]
        if kind == "conv2d":
            kh, kw = _pair(spec["kernel_size"])
            sh, sw = _pair(spec["stride"])
            dh, dw = _pair(spec["dilation"])
            pad = spec["padding"]
            if pad == "same":
                ph, pw = dh * (kh - 1), dw * (kw - 1)  # totals; the odd pixel goes bottom/right
                pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
            else:
                p = (0, 0) if pad == "valid" else _pair(pad)
                pads = (p[1], p[1], p[0], p[0])
                ph, pw = 2 * p[0], 2 * p[1]
            conv = nn.Conv2d(c, spec["filters"], (kh, kw), stride=(sh, sw), dilation=(dh, dw), bias=spec["bias"])
            if pads[0] == pads[1] and pads[2] == pads[3]:
                conv.padding = (pads[2], pads[0])
                mods.append(conv)
            else:
                mods.append(nn.Sequential(nn.ZeroPad2d(pads), conv))
            h, w, c = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw), spec["filters"]
        elif kind == "maxpool2d":
            kh, kw = _pair(spec["pool_size"])
            sh, sw = _pair(spec["stride"] if spec["stride"] is not None else spec["pool_size"])
            ph, pw = _pair(spec["padding"])
            mods.append(nn.MaxPool2d((kh, kw), stride=(sh, sw), padding=(ph, pw)))
            h, w = _out_size(h, kh, sh, 2 * ph, 1), _out_size(w, kw, sw, 2 * pw, 1)
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "leaky_relu":
            mods.append(nn.LeakyReLU(spec["negative_slope"]))
        elif kind == "batchnorm":
            cls, n = (nn.BatchNorm1d, features) if features is not None else (nn.BatchNorm2d, c)
            mods.append(cls(n, eps=spec["eps"], momentum=spec["momentum"]))
        elif kind == "flatten":
            mods.append(_NHWCFlatten(torch))
            features = h * w * c
        elif kind == "dense":
            if features is None:
                raise ValueError(f"model.layers[{i}]: dense before flatten")
            mods.append(nn.Linear(features, spec["units"], bias=spec["bias"]))
            features = spec["units"]
        else:
            raise NotImplementedError(f"model.layers[{i}]: no PyTorch equivalent for {kind!r} in this script")
    return nn.Sequential(*mods)


def _NHWCFlatten(torch):
    class NHWCFlatten(torch.nn.Module):
        """feature = (h*W + w)*C + c, as fastcnn's flatten (a view for channels_last tensors)."""

        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x

    return NHWCFlatten()


def load_sections(path):
    """The config's model, data and train sections with fastcnn's defaults (without importing Numba)."""
    import yaml

    from fastcnn.config import validate_section

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    return (int(raw.get("seed", 0)), validate_section("model", raw["model"]), validate_section("data", raw["data"]),
            validate_section("train", raw.get("train") or {}))


def evaluate(net, x, y, torch, batch_size=500):
    net.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[s:s + batch_size]).permute(0, 3, 1, 2)
            yb = torch.from_numpy(y[s:s + batch_size])
            logits = net(xb)
            total += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    net.train()
    return total / len(x), correct / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "mnist.yaml"))
    ap.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--data-root", default=None, help="folder holding mnist/ (default: data.root, $FASTCNN_DATA)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    ap.add_argument("--num-train", type=int, default=None, help="first N training images only (short runs)")
    ap.add_argument("--num-test", type=int, default=None, help="first N test images only (short runs)")
    ap.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    ap.add_argument("--init", choices=["torch", "fastcnn"], default="torch",
                    help="torch: PyTorch's default init (seeded); fastcnn: copy fastcnn's initial weights")
    ap.add_argument("--metrics-jsonl", default=None, help="write one JSON line per epoch here")
    args = ap.parse_args(argv)

    threads = args.threads or _cores()
    # Before torch (and fastcnn, which defaults them to 1) is imported: torch's OpenMP pool size.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    from fastcnn.data import BatchLoader, load_dataset
    from fastcnn.optim import torch_optimizer  # the one fastcnn -> torch.optim mapping (imports no Numba)

    torch.set_num_threads(threads)
    seed, model_cfg, data_cfg, train_cfg = load_sections(args.config)
    epochs = args.epochs if args.epochs is not None else train_cfg["epochs"]
    batch_size = args.batch_size or data_cfg["batch_size"]
    if data_cfg["validation"] != "test":
        sys.exit("this script validates on the test split only (data.validation: test)")
    root = args.data_root or data_cfg["root"]
    t_data = time.perf_counter()
    ds = load_dataset(data_cfg["dataset"], root, input_shape=tuple(model_cfg["input_shape"]),
                      num_classes=model_cfg["num_classes"], num_train=args.num_train or data_cfg["num_train"],
                      num_test=args.num_test or data_cfg["num_test"], seed=seed, progress=False)
    data_s = time.perf_counter() - t_data

    torch.manual_seed(seed)
    channels_last = args.layout == "channels_last"
    if args.init == "fastcnn":
        from fastcnn.model import build_model
        from fastcnn.torch_reference import torch_model

        net = torch_model(build_model(model_cfg, seed=seed), torch, channels_last=False)
    else:
        net = build_torch_net(model_cfg, torch)
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt_cfg = train_cfg["optimizer"]
    opt = torch_optimizer(torch, net.parameters(), opt_cfg)
    loader = BatchLoader(ds.x_train, ds.y_train, batch_size, shuffle=True, seed=seed)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"PyTorch {torch.__version__}: training on {len(ds.x_train)} images ({ds.name}), validating on "
          f"{len(ds.x_test)}; {n_params:,} parameters; {torch.get_num_threads()} thread(s); batch {batch_size}; "
          f"{args.layout}; init {args.init}; data loaded in {data_s:.2f} s", flush=True)

    metrics = open(args.metrics_jsonl, "w", encoding="utf-8") if args.metrics_jsonl else None
    cross_entropy = torch.nn.functional.cross_entropy
    step = 0
    first_logged = False
    for epoch in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        for xb, yb in loader.epoch_batches(epoch):
            if not first_logged:
                print(f"First training step at {time.perf_counter() - _STARTED:.2f} s after start", flush=True)
                first_logged = True
            tx = torch.from_numpy(xb).permute(0, 3, 1, 2)  # NHWC bytes = channels_last NCHW, no copy
            if not channels_last:
                tx = tx.contiguous()
            ty = torch.from_numpy(yb)
            opt.zero_grad(set_to_none=True)
            logits = net(tx)
            loss = cross_entropy(logits, ty)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == ty).sum())
            seen += len(yb)
        seconds = time.perf_counter() - t0
        val_loss, val_acc = evaluate(net, ds.x_test, ds.y_test, torch)
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                  "train_accuracy": correct / max(seen, 1), "val_loss": val_loss, "val_accuracy": val_acc,
                  "images_per_sec": seen / max(seconds, 1e-9), "epoch_seconds": seconds, "lr": opt_cfg["lr"]}
        print(f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} "
              f"| test loss {val_loss:.4f} acc {val_acc:.4f} | {record['images_per_sec']:.0f} img/s, "
              f"{seconds:.2f} s", flush=True)
        print("METRICS " + json.dumps(record), flush=True)
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
    if metrics:
        metrics.close()
    print(f"total {time.perf_counter() - _STARTED:.2f} s since start", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
