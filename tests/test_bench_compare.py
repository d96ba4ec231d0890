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
