"""fastcnn summary: shapes, parameter counts and FLOPs read from a built model."""
import json
import os

import pytest

from fastcnn import build_model, load_config
from fastcnn.summary import format_summary, summarize

from conftest import REPO, run_cli

MNIST = os.path.join(REPO, "configs", "mnist.yaml")
MNIST_BN = os.path.join(REPO, "configs", "mnist_bn.yaml")




def mnist_model():
    return build_model(load_config(MNIST).model, seed=0)


def test_mnist_shapes_params_and_flops():
    info = summarize(mnist_model(), batch_size=64)
    layers = info["layers"]
    assert [tuple(r["output_shape"]) for r in layers] == [
        (26, 26, 32), (26, 26, 32), (13, 13, 32), (11, 11, 64), (11, 11, 64), (5, 5, 64), (1600,), (128,), (128,),
        (10,)]
    assert [r["description"] for r in layers][:4] == ["conv2d 32 3x3 s1 p0", "relu", "maxpool2d 2x2 s2",
                                                      "conv2d 64 3x3 s1 p0"]
    assert [r["params"] for r in layers] == [320, 0, 0, 18496, 0, 0, 0, 204928, 0, 1290]
    assert info["total_params"] == info["trainable_params"] == 225_034
    assert info["non_trainable_params"] == 0
    assert layers[0]["flops"] == 2 * 26 * 26 * 3 * 3 * 1 * 32
    assert layers[3]["flops"] == 2 * 11 * 11 * 3 * 3 * 32 * 64
    assert layers[7]["flops"] == 2 * 1600 * 128
    assert info["flops_per_image"] == sum(r["flops"] for r in layers)
    assert info["flops_per_batch"] == 64 * info["flops_per_image"]
    elements = 26 * 26 * 32 * 2 + 13 * 13 * 32 + 11 * 11 * 64 * 2 + 5 * 5 * 64 + 1600 + 128 * 2 + 10
    assert info["activation_bytes_per_image"] == 4 * elements
    text = format_summary(info)
    assert "225,034" in text and "(26, 26, 32)" in text and "389,376" in text and "2 per multiply-add" in text


def test_batchnorm_statistics_are_non_trainable():
    model = build_model(load_config(MNIST_BN).model, seed=0)
    info = summarize(model)
    assert info["trainable_params"] == model.num_parameters()
    bn = sum(2 * r["output_shape"][-1] for r in info["layers"] if r["type"] == "batchnorm")
    assert info["non_trainable_params"] == bn > 0
    assert "batch_size" not in info


def test_cli_summary_text_and_json(capsys):
    code, out, err = run_cli(["summary", MNIST], capsys)
    assert code == 0, err
    assert "Total params:" in out and "225,034" in out and "Batch of 64:" in out
    code, out, err = run_cli(["summary", MNIST, "--json", "--batch-size", "8",
                              "--set", "model.layers[0].padding=same"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["batch_size"] == 8
    assert info["layers"][0]["output_shape"] == [28, 28, 32]
    assert info["layers"][0]["description"] == "conv2d 32 3x3 s1 same"


def test_cli_summary_compiles_no_kernel(capsys):
    from fastcnn.runtime import compile_stats

    before = compile_stats()
    code, _, err = run_cli(["summary", MNIST_BN], capsys)
    assert code == 0, err
    assert compile_stats() == before


@pytest.mark.parametrize("argv, words", [
    (["summary", "/nonexistent.yaml"], "config file not found"),
    (["summary", MNIST, "--set", "model.layers[0].kernel_size=30"], "model.layers[0]"),
])
def test_cli_summary_errors(argv, words, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("Error: ") and words in err and len(err.strip().splitlines()) == 1


def test_residual_blocks_count_their_sums_in_activation_memory():
    """A residual block writes one sum per copy (its output) besides its sub-layers' outputs: the
    activation memory counts both; its row totals its sub-layers' parameters and FLOPs."""
    import numpy as np

    model = build_model(load_config(os.path.join(REPO, "configs", "resnet_mnist.yaml")).model, seed=0)
    info = summarize(model, batch_size=4)
    leaves = sum(int(np.prod(m.out_shape)) for _, m in model.named_modules() if not m.children())
    blocks = [m for _, m in model.named_modules() if m.kind == "residual"]
    sums = sum(int(np.prod(out)) for block in blocks for _, out in block.copy_shapes)
    assert sums == 2 * 14 * 14 * 32 + 7 * 7 * 64  # three blocks, one copy each
    assert info["activation_bytes_per_image"] == 4 * (leaves + sums)
    assert info["activation_bytes_per_batch"] == 4 * info["activation_bytes_per_image"]
    row = next(r for r in info["layers"] if r["index"] == 3)
    assert row["type"] == "residual" and row["flops"] == sum(m.flops(1) for _, m in model.layers[3].named_modules())
    assert info["flops_per_image"] == sum(r["flops"] for r in info["layers"] if r["depth"] == 0)
    assert "sum each copy of a residual block writes" in " ".join(info["notes"])
