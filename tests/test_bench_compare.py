"""``fastcnn bench CONFIG --compare torch`` runs for every shipped config (every optimizer and layer
type they use has a PyTorch twin: fastcnn.optim.torch_optimizer, Layer.torch_module)."""
import glob
import json
import os

import pytest

from conftest import REPO, run_cli

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def test_configs_are_found():
    assert len(CONFIGS) >= 5


@pytest.fixture
def restore_threads():
    """bench sets Numba's and PyTorch's thread counts in this process: put them back afterwards."""
    import numba
    torch = pytest.importorskip("torch", reason="torch not installed: --compare torch is not checked")
    before = numba.get_num_threads(), torch.get_num_threads()
    yield
    numba.set_num_threads(before[0])
    torch.set_num_threads(before[1])


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(c) for c in CONFIGS])
def test_bench_compare_torch_runs(config, capsys, monkeypatch, restore_threads):
    import fastcnn.bench

    # The machine's matmul peak (several 2048x2048 products) is beside the point here.
    monkeypatch.setattr(fastcnn.bench, "matmul_peak_gflops", lambda threads, torch=None: (1.0, "stub"))
    code, out, err = run_cli(["bench", config, "--compare", "torch", "--batch-size", "2", "--repeats", "1",
                              "--threads", "1", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["step"]["torch_ms"] > 0 and report["inference_b256"]["torch_ms"] > 0
    assert report["layers"] and all("torch_forward_ms" in row for row in report["layers"])


def test_a_residual_row_counts_the_flops_of_its_whole_subtree(tmp_path, monkeypatch, restore_threads):
    """bench times a residual block as one row; its GFLOP/s divide the FLOPs of every layer nested in
    it (the block's own add counts 0), as a fused block's divide its layers'."""
    import yaml

    import fastcnn.bench
    from fastcnn import build_model, load_config

    monkeypatch.setattr(fastcnn.bench, "matmul_peak_gflops", lambda threads, torch=None: (1.0, "stub"))
    conv = {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same", "bias": False}
    raw = {"seed": 0, "data": {"dataset": "synthetic"}, "train": {"optimizer": {"name": "sgd", "momentum": 0.9}},
           "model": {"input_shape": [8, 8, 4], "num_classes": 3, "layers": [
               {"type": "residual", "repeat": 2, "body": [conv, {"type": "batchnorm"}, {"type": "relu"}, conv]},
               {"type": "global_avgpool"}, {"type": "dense", "units": 3}]}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    report = fastcnn.bench.run_bench(str(path), batch_size=2, threads=1, repeats=1, compare="torch",
                                     log=lambda *a: None)
    model = build_model(load_config(str(path)).model)
    row = report["layers"][0]
    assert row["kind"] == "residual" and model.layers[0].flops(2) == 0
    flops = sum(m.flops(2) for _, m in model.layers[0].named_modules())
    assert row["flops"] == flops == 4 * 2 * 2 * 64 * 9 * 4 * 4  # 4 convs, 2 per MAC, batch 2
    assert row["forward_gflops"] == pytest.approx(row["flops"] / row["forward_ms"] / 1e6)
    assert row["torch_forward_ms"] > 0
    text = []
    fastcnn.bench.print_report(report, echo=text.append)
    line = next(t for t in text if t.split()[:2] == ["0", "residual"])
    assert line.split()[3] != "-", line
