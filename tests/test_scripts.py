"""Smoke tests of the benchmark scripts in scripts/ (short runs; no MNIST needed)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

SCRIPTS = os.path.join(REPO, "scripts")
BENCH = os.path.join(SCRIPTS, "bench_vs_torch.py")
PLOT = os.path.join(SCRIPTS, "plot_bench.py")
EPOCH = os.path.join(SCRIPTS, "epoch_vs_torch.py")
TORCH_TRAIN = os.path.join(SCRIPTS, "train_torch_mnist.py")
MNIST = os.path.join("configs", "mnist.yaml")
# The first run after a kernel change compiles (or recompiles) Numba kernels: allow for it.
TIMEOUT = 300

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def _run(args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT,
                          env=env)


def _load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len("RESULT "):])


def _check_result(res, framework, mode, batch, steps):
    assert res["framework"] == framework and res["mode"] == mode and res["batch"] == batch
    assert len(res["step_ms"]) == steps and all(t > 0 for t in res["step_ms"])
    assert res["median_ms"] > 0 and res["images_per_sec"] > 0
    assert res["images_per_sec"] == pytest.approx(batch / res["median_ms"] * 1e3)
    assert res["threads"] == 1


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_worker_fastcnn(mode):
    proc = _run([BENCH, "--worker", "fastcnn", "--config", MNIST, "--batch", "2", "--steps", "2", "--warmup", "1",
                 "--threads", "1", "--mode", mode])
    assert proc.returncode == 0, proc.stderr
    _check_result(_result(proc.stdout), "fastcnn", mode, 2, 2)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed: PyTorch worker skipped")
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_bench_worker_torch(layout):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = _run([BENCH, "--worker", "torch", "--config", os.path.join("configs", "mnist_bn.yaml"), "--batch", "2",
                 "--steps", "2", "--warmup", "1", "--threads", "1", "--layout", layout], env=env)
    assert proc.returncode == 0, proc.stderr
    res = _result(proc.stdout)
    _check_result(res, "torch", "train", 2, 2)
    assert res["layout"] == layout


def _run_driver(args, network):
    """Run the bench driver (fastcnn only without torch); return its stdout and the table row of ``network``."""
    proc = _run([BENCH, *args, "--quiet"] + ([] if HAVE_TORCH else ["--no-torch"]))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {network} |")]
    assert len(rows) == 1, proc.stdout
    return proc.stdout, [c.strip() for c in rows[0].strip("|").split("|")]


def test_bench_driver_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    _, cells = _run_driver(["--config", MNIST, "--batch-sizes", "2", "--rounds", "1", "--steps", "1", "--warmup", "0",
                            "--threads", "1", "--infer-batch", "0", "--json", str(out)], "mnist")
    assert cells[1] == "2" and float(cells[2]) > 0
    if HAVE_TORCH:
        assert float(cells[3]) > 0 and cells[4].endswith("x")
    report = json.loads(out.read_text())
    cell = report["cells"][0]
    assert cell["network"] == "mnist" and cell["batch"] == 2 and cell["mode"] == "train"
    assert len(cell["runs"]["fastcnn"]) == 1 and cell["fastcnn"]["images_per_sec"] > 0


def _synthetic_report(with_torch=True):
    rng = np.random.default_rng(0)
    kinds = ["conv2d", "relu", "maxpool2d", "flatten", "dense"]
    layers = []
    for i, kind in enumerate(kinds):
        row = {"index": i, "layer": kind, "kind": kind, "output_shape": [4, 4, 8] if i < 3 else [128],
               "forward_ms": float(rng.uniform(0.01, 5)), "backward_ms": float(rng.uniform(0.01, 5)),
               "forward_gflops": None, "backward_gflops": None, "forward_peak_pct": None, "backward_peak_pct": None}
        if with_torch:
            row.update(torch_forward_ms=float(rng.uniform(0.01, 5)), torch_backward_ms=float(rng.uniform(0, 5)))
        layers.append(row)
    step = {"ms": 12.0, "images_per_sec": 5333.0}
    infer = {"ms": 20.0, "images_per_sec": 12800.0}
    if with_torch:
        step.update(torch_ms=15.0, torch_images_per_sec=4266.0)
        infer.update(torch_ms=25.0, torch_images_per_sec=10240.0)
    return {"batch_size": 64, "threads": 2, "cpu": "test CPU", "cpu_count": 2, "matmul_peak_gflops": 100.0,
            "matmul_peak_source": "test", "layers": layers, "step": step, "inference_b256": infer}


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (pip install 'fastcnn[plot]')")
@pytest.mark.parametrize("with_torch", [True, False])
def test_plot_bench_writes_png(tmp_path, with_torch):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_synthetic_report(with_torch)))
    png = tmp_path / "sub" / "chart.png"
    proc = _run([PLOT, str(report), "--out", str(png), "--log"])
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_bench_without_matplotlib_names_the_extra(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_synthetic_report()))
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['plot_bench.py', {str(report)!r}, '--out', {str(tmp_path / 'x.png')!r}]; "
            f"runpy.run_path({PLOT!r}, run_name='__main__')")
    proc = _run(["-c", code])
    assert proc.returncode == 2
    assert "pip install 'fastcnn[plot]'" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_epoch_vs_torch_needs_data_for_mnist(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTCNN_DATA"}
    proc = _run([EPOCH, "--config", MNIST, "--rounds", "1"], env=env)
    assert proc.returncode == 2
    assert "FASTCNN_DATA" in proc.stderr


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("config", ["mnist.yaml", "mnist_bn.yaml", "synthetic_small.yaml"])
def test_train_torch_network_matches_reference_structure(config):
    """The plain-PyTorch network of train_torch_mnist.py has the shapes of fastcnn's (torch_reference) one."""
    import torch

    from fastcnn.config import load_config
    from fastcnn.model import build_model
    from fastcnn.torch_reference import to_torch_input, torch_model

    script = _load_script(TORCH_TRAIN, "train_torch_mnist")
    cfg = load_config(os.path.join(REPO, "configs", config))
    ours = script.build_torch_net(cfg.model, torch)
    ref = torch_model(build_model(cfg.model, seed=0), torch, channels_last=False)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in ref.parameters()]
    # With the reference's weights, the same logits.
    ours.load_state_dict(ref.state_dict())
    x = np.random.default_rng(0).normal(size=(3, *cfg.model.input_shape)).astype(np.float32)
    ours.eval(), ref.eval()
    with torch.no_grad():
        a = ours(to_torch_input(x, torch))
        b = ref(to_torch_input(x, torch))
    assert a.shape == (3, cfg.model.num_classes)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def test_bench_suite_networks():
    """The suite holds at least 10 networks: the shipped ones it names and every configs/bench/*.yaml."""
    script = _load_script(BENCH, "bench_vs_torch")
    suite = script.suite_configs()
    names = [os.path.splitext(os.path.basename(c))[0] for c in suite]
    assert len(suite) >= 10 and len(set(names)) == len(names)
    assert set(script.SUITE_SHIPPED) <= set(suite)
    assert all(os.path.isfile(os.path.join(REPO, c)) for c in suite)
    assert script.suite_configs("lenet5,mnist") == ["configs/mnist.yaml", "configs/bench/lenet5.yaml"]


BENCH_CONFIGS = sorted(os.listdir(os.path.join(REPO, "configs", "bench")))


@pytest.mark.parametrize("name", BENCH_CONFIGS)
def test_bench_configs_validate_and_build(name):
    from fastcnn.config import load_config
    from fastcnn.model import build_model

    assert name.endswith(".yaml")
    cfg = load_config(os.path.join(REPO, "configs", "bench", name))
    model = build_model(cfg.model, seed=cfg.seed)
    x = np.random.default_rng(0).normal(size=(2, *cfg.model.input_shape)).astype(np.float32)
    logits = model.forward(x, training=False)
    assert logits.shape == (2, cfg.model.num_classes) and np.isfinite(logits).all()


def test_bench_suite_unknown_network_is_refused():
    proc = _run([BENCH, "--suite", "--only", "nosuchnet"])
    assert proc.returncode != 0 and "no suite network named nosuchnet" in proc.stderr


def test_bench_suite_smoke(tmp_path):
    """--suite on one network: the table, the matmul peak, per-layer figures and the JSON report."""
    out = tmp_path / "suite.json"
    stdout, cells = _run_driver(["--suite", "--only", "lenet5", "--rounds", "1", "--steps", "2", "--warmup", "0",
                                 "--threads", "1", "--batch-sizes", "4", "--infer-batch", "4", "--layer-repeats",
                                 "1", "--peak-sizes", "128", "--json", str(out)], "lenet5")
    assert len(cells) == 9 and cells[1] == "4" and cells[5] == "4"
    assert float(cells[2]) > 0 and float(cells[6]) > 0
    if HAVE_TORCH:
        assert float(cells[3]) > 0 and float(cells[7]) > 0
        assert cells[4].endswith("x") and cells[8].endswith("x")
    assert "Matrix-multiply peak (1 thread(s))" in stdout and "| 0 | conv2d 6 5x5 s1 p2 + relu | 28x28x6 |" in stdout

    report = json.loads(out.read_text())
    assert report["suite"] is True and report["threads"] == 1
    assert [(c["network"], c["mode"], c["batch"]) for c in report["cells"]] == [("lenet5", "train", 4),
                                                                               ("lenet5", "infer", 4)]
    assert all(c["fastcnn"]["images_per_sec"] > 0 for c in report["cells"])
    peak = report["peak"]
    assert len(peak["rates"]) == 2 and all(v > 0 for v in peak["rates"].values())
    assert peak["peak_gflops"] == max(peak["rates"].values())
    layers = report["layers"]["lenet5"]
    assert layers["matmul_peak_gflops"] == peak["peak_gflops"] and layers["batch_size"] == 4
    convs = [r for r in layers["layers"] if r["kind"] == "conv2d+relu"]  # the fused conv + ReLU rows
    assert len(convs) == 2 and len(layers["layers"]) == 10
    for r in convs:
        assert r["forward_gflops"] > 0 and r["backward_gflops"] > 0
        assert r["forward_peak_pct"] == pytest.approx(100 * r["forward_gflops"] / peak["peak_gflops"])


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs the mpi extra")
def test_bench_mpi_smoke():
    """One round of ResNet-20 on a few synthetic images, 1 process and 2: medians printed, and the
    script's own check that every run ended with the same weights."""
    proc = _run([os.path.join(SCRIPTS, "bench_mpi.py"), "--rounds", "1", "--setups", "1x1,2x1", "--nets", "resnet20",
                 "--resnet-images", "256"], env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resnet20 2x1: epoch" in proc.stdout
    assert "resnet20: 2 runs, all with the same weights" in proc.stdout, proc.stdout


def test_bench_conv_ab_same_tree_is_bit_identical(tmp_path):
    """The kernel A/B script against a copy of this tree's conv.py: every pass gives the same bits and
    positive times; a base tree without conv.py and a malformed shape are refused with one line."""
    base = tmp_path / "base" / "fastcnn" / "kernels"
    base.mkdir(parents=True)
    with open(os.path.join(REPO, "fastcnn", "kernels", "conv.py"), "rb") as src:
        (base / "conv.py").write_bytes(src.read())
    ab = _load_script(os.path.join(SCRIPTS, "bench_conv_ab.py"), "bench_conv_ab")
    from fastcnn.kernels import conv

    other = ab.load_base_conv(str(tmp_path / "base"))
    for which in ("forward", "input", "weight"):
        for shape in ((2, 9, 7, 3, 10, 3, 1), (2, 8, 8, 16, 16, 3, 2), (1, 5, 5, 12, 70, 1, 1)):
            for chunks in (1, 2):
                r = ab.compare(other, conv, shape, which, rounds=2, chunks=chunks)
                assert r["identical"], (which, shape, chunks)
                assert r["base_ms"] > 0 and r["this_ms"] > 0 and r["gflops_this"] > 0
    for epilogue in ("relu", "residual-relu"):
        r = ab.compare(other, conv, (2, 9, 7, 3, 10, 3, 1), "forward", rounds=2, chunks=2, epilogue=epilogue)
        assert r["identical"], epilogue
    assert os.listdir(base) == ["conv.py"]  # its kernels were compiled from a private copy: no cache here
    proc = _run([os.path.join(SCRIPTS, "bench_conv_ab.py"), "2x5x5x3x4x3", "--base", str(tmp_path)])
    assert proc.returncode != 0 and "no fastcnn/kernels/conv.py there" in proc.stderr
    proc = _run([os.path.join(SCRIPTS, "bench_conv_ab.py"), "2x5x5", "--base", str(tmp_path / "base")])
    assert proc.returncode == 2 and "want NxHxWxCINxCOUTxK" in proc.stderr
    proc = _run([os.path.join(SCRIPTS, "bench_conv_ab.py"), "2x5x5x3x4x3", "--chunks", "3", "--base",
                 str(tmp_path / "base")])
    assert proc.returncode == 2 and "--chunks 3: want 1 to the smallest batch" in proc.stderr
    proc = _run([os.path.join(SCRIPTS, "bench_conv_ab.py"), "2x5x5x3x4x3", "--pass", "weight", "--epilogue", "relu",
                 "--base", str(tmp_path / "base")])
    assert proc.returncode == 2 and "--epilogue relu: only with --pass forward" in proc.stderr


def test_profile_step_lists_the_step_kernels():
    """scripts/profile_step.py on the tiny synthetic config: the step's median, then one row per kernel
    and shape, the convolution's three passes among them, each with its calls per step; a missing
    config is refused with one line."""
    proc = _run([os.path.join(SCRIPTS, "profile_step.py"), "configs/synthetic_small.yaml", "--steps", "2",
                 "--by-shape", "--batch", "16"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "batch 16" in out and "step median" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(tuple("0123456789"))]
    kernels = {row[3] for row in rows}
    assert {"conv.conv2d_forward", "conv.conv2d_backward_weight", "dense.dense_forward"} <= kernels
    # 16 images = 8 chunks of 2: the weight gradient is called once per chunk.
    assert any(r[3] == "conv.conv2d_backward_weight" and r[2] == "8" and "(2, 12, 12, 1)" in " ".join(r)
               for r in rows)
    assert all(float(row[0]) >= 0 for row in rows)
    proc = _run([os.path.join(SCRIPTS, "profile_step.py"), "no/such/config.yaml"])
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_profile_compile_lists_each_compiled_kernel(tmp_path):
    """A cold compile (an empty temporary Numba cache) of a one-dense-layer model: the warm-up's
    compiles are listed by function, the dense kernels among them; the project's cache is untouched."""
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  input_shape: [2, 2, 1]\n  num_classes: 3\n  layers:\n"
                      "    - {type: flatten}\n    - {type: dense, units: 3}\n"
                      "data:\n  dataset: synthetic\n")
    proc = _run([os.path.join(SCRIPTS, "profile_compile.py"), str(config), "--top", "50"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("warm-up "), proc.stdout
    listed = [line.split()[-1] for line in proc.stdout.splitlines()[1:]]
    assert "fastcnn.kernels.dense._dense_forward" in listed, proc.stdout
    assert "fastcnn.kernels.dense._dense_backward_weight" in listed, proc.stdout
    proc = _run([os.path.join(SCRIPTS, "profile_compile.py"), str(config), "--kinds"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cold compile by kind, "), proc.stdout
    assert [line.split(None, 2)[2] for line in lines[1:]] == ["flatten", "dense", "head", "(warm-up step after them)"]
    assert float(lines[2].split()[0]) > 0  # the dense kernels compile in the dense kind


def test_ab_kernels_against_this_tree(tmp_path):
    """scripts/ab_kernels.py with this tree as the base: a row per case and pass, the same bits; an
    unknown case and a base without fastcnn are refused with one line."""
    script = os.path.join(SCRIPTS, "ab_kernels.py")
    proc = _run([script, REPO, "--rounds", "2", "--reps", "1", "--threads", "1", "--batch", "8",
                 "--cases", "mnist_13x13x32_to_64,odd_7x7x48_to_100_3x5"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("mnist_", "odd_"))]
    assert [r[0] for r in rows] == [f"{c}:{p}" for c in ("mnist_13x13x32_to_64", "odd_7x7x48_to_100_3x5")
                                    for p in ("fwd", "inp", "wgt")]
    assert all(r[-1] == "same" and float(r[1]) > 0 and float(r[2]) > 0 for r in rows), proc.stdout
    proc = _run([script, REPO, "--cases", "no_such_case"])
    assert proc.returncode == 2 and "unknown case or pass: no_such_case" in proc.stderr
    proc = _run([script, str(tmp_path)])
    assert proc.returncode == 2 and "no fastcnn/kernels/conv.py there" in proc.stderr


def test_ab_step_times_a_step_and_inference(tmp_path):
    """scripts/ab_step.py (what scripts/ab_trees.sh runs per tree): one JSON line with both rates."""
    env = dict(os.environ, PYTHONPATH=REPO, TREE="here")
    proc = _run([os.path.join(SCRIPTS, "ab_step.py"), os.path.join(REPO, "configs", "synthetic_small.yaml")], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tree"] == "here" and res["config"].endswith("synthetic_small.yaml")
    assert res["train_img_s"] > 0 and res["eval_img_s"] > 0


def test_ab_trees_script_usage():
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "ab_trees.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "usage: scripts/ab_trees.sh BASE THREADS ROUNDS CONFIG" in proc.stderr
    env = dict(os.environ, PYTHON="no/such/python")
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "ab_trees.sh"), REPO, "1", "1", "configs/mnist.yaml"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2 and "PYTHON=" in proc.stderr and "no/such/python: no such interpreter" in proc.stderr
