"""ONNX export: onnxruntime against ``model.forward(x, training=False)`` for every layer type and every
shipped config, opsets, --raw-pixels, ``fastcnn export`` and ``fastcnn predict`` with an .onnx file,
``fastcnn.load_model``, and the one-line errors.

Logits agree within 1e-4 relative (rtol 1e-4 per logit, plus 1e-5 of the largest logit for those near 0).
"""
import errno
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from test_registry_layers import EXAMPLES

import fastcnn
from fastcnn.checkpoint import save_checkpoint
from fastcnn.config import to_dict
from fastcnn.errors import CheckpointError
from fastcnn.layers import LAYER_TYPES, Layer
from fastcnn.onnx_export import DEFAULT_OPSET, MIN_OPSET, ExportError, build_onnx
from fastcnn.predict import softmax

from conftest import REPO, SMALL_CONFIG, run_cli

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
NEWEST = onnx.defs.onnx_opset_version()


def session(proto):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_onnx(proto, x):
    return session(proto).run(["logits"], {"input": np.ascontiguousarray(x, np.float32)})[0]


def assert_logits_close(got, expected, what=""):
    assert got.shape == expected.shape, what
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def randomize(model, seed=0):
    """Non-trivial biases, batch-norm affine parameters and running statistics (the weights keep their init)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data[...] = rng.uniform(0.5, 1.5, p.data.shape)
        elif name.endswith(("beta", "bias")):
            p.data[...] = rng.normal(0.0, 0.2, p.data.shape)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b[...] = rng.normal(0.0, 0.3, b.shape)
        elif name.endswith("running_var"):
            b[...] = rng.uniform(0.5, 2.0, b.shape)
    return model


def check_against_forward(model, proto, batches=(1, 5), seed=0):
    """onnxruntime's logits equal model.forward(x, training=False) at each batch size."""
    onnx.checker.check_model(proto, full_check=True)
    rng = np.random.default_rng(seed)
    sess = session(proto)
    for n in batches:
        x = rng.standard_normal((n, *model.input_shape)).astype(np.float32)
        got = sess.run(["logits"], {"input": x})[0]
        assert_logits_close(got, model.forward(x, training=False), f"batch {n}")


def single_layer_model(spec, in_shape):
    """A model around one layer: flatten before it (flat input), or after it (a (H, W, C) output)."""
    layer = LAYER_TYPES[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})
    out = layer.output_shape(in_shape, "x")
    if len(in_shape) == 1:
        layers, input_shape = [{"type": "flatten"}, spec], [1, 1, in_shape[0]]
    else:
        layers, input_shape = [spec], list(in_shape)
    if len(out) == 3:
        layers.append({"type": "flatten"})
    return fastcnn.build_model({"input_shape": input_shape, "num_classes": int(np.prod(out)), "layers": layers},
                               seed=1)


# -- every layer type, every shipped config ----------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
def test_every_layer_type_exports_and_matches_forward(kind):
    cls = LAYER_TYPES[kind]
    assert cls.onnx_nodes is not Layer.onnx_nodes, f"layer type {kind!r} declares no onnx_nodes"
    for n, (options, in_shape) in enumerate(EXAMPLES[kind]):
        model = randomize(single_layer_model({"type": kind, **options}, in_shape), seed=n)
        check_against_forward(model, build_onnx(model), seed=n)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_configs_match_forward(path):
    cfg = fastcnn.load_config(path)
    model = randomize(fastcnn.build_model(cfg.model, seed=cfg.seed))
    proto = build_onnx(model)
    check_against_forward(model, proto)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", *cfg.model.input_shape]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", cfg.model.num_classes]
    ops = {node.op_type for node in proto.graph.node}
    assert "Dropout" not in ops and "Identity" not in ops
    if any(k.endswith("running_var") for k, _ in model.named_buffers()):
        assert "BatchNormalization" in ops


EVERY_LAYER = {
    "input_shape": [9, 8, 3], "num_classes": 4,
    "layers": [
        {"type": "conv2d", "filters": 6, "kernel_size": 3, "stride": 2, "padding": "same", "groups": 3},
        {"type": "batchnorm"}, {"type": "leaky_relu", "negative_slope": 0.1},
        {"type": "residual", "repeat": 2, "activation": "none",
         "body": [{"type": "conv2d", "filters": 6, "kernel_size": 3, "padding": 1, "dilation": 1, "bias": False},
                  {"type": "batchnorm"}, {"type": "relu"},
                  {"type": "residual", "body": [{"type": "conv2d", "filters": 6, "kernel_size": [1, 3],
                                                 "padding": "same", "groups": 6}],
                   "shortcut": [{"type": "conv2d", "filters": 6, "kernel_size": 1}, {"type": "batchnorm"}]}]},
        {"type": "maxpool2d", "pool_size": 3, "stride": 2, "padding": 1},
        {"type": "dropout", "rate": 0.3},
        {"type": "avgpool2d", "pool_size": [2, 1], "stride": 1},
        {"type": "flatten"}, {"type": "dense", "units": 7}, {"type": "batchnorm"}, {"type": "relu"},
        {"type": "dense", "units": 4, "bias": False}],
}


@pytest.mark.parametrize("opset", [MIN_OPSET, DEFAULT_OPSET, NEWEST])
def test_opsets(opset, tmp_path):
    model = randomize(fastcnn.build_model(EVERY_LAYER, seed=3))
    path = tmp_path / "m.onnx"
    proto = fastcnn.export_onnx(model, path, opset=opset)
    loaded = onnx.load(str(path))
    assert loaded.SerializeToString() == proto.SerializeToString()
    assert [(o.domain, o.version) for o in loaded.opset_import] == [("", opset)]
    if opset == DEFAULT_OPSET:
        assert loaded.ir_version == 8  # what older runtimes load
    assert loaded.ir_version == onnx.helper.find_min_ir_version_for(list(loaded.opset_import))
    check_against_forward(model, loaded, batches=(1, 5, 2))
    assert not [p for p in os.listdir(tmp_path) if p != "m.onnx"]  # no temporary file left


def test_float64_model_exports_float32():
    cfg = dict(EVERY_LAYER, dtype="float64")
    model = randomize(fastcnn.build_model(cfg, seed=4))
    proto = build_onnx(model)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer)
    check_against_forward(model, proto)


def test_raw_pixels_folds_the_normalization():
    model = randomize(fastcnn.build_model(EVERY_LAYER, seed=5))
    mean, std = np.float32([0.2, 0.5, 0.4]), np.float32([0.3, 0.25, 0.2])
    proto = build_onnx(model, mean=mean, std=std, raw_pixels=True, class_names=list("abcd"), dataset="npz")
    onnx.checker.check_model(proto, full_check=True)
    pixels = np.random.default_rng(6).uniform(0, 1, (5, 9, 8, 3)).astype(np.float32)
    assert_logits_close(run_onnx(proto, pixels), model.forward((pixels - mean) / std, training=False))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fastcnn_input"] == "pixels" and "fastcnn_normalization" not in meta
    assert json.loads(meta["class_names"]) == list("abcd") and meta["dataset"] == "npz"
    # Without raw_pixels the graph takes normalized input; the statistics go to the metadata.
    plain = build_onnx(model, mean=mean, std=std)
    meta = {p.key: p.value for p in plain.metadata_props}
    assert meta["fastcnn_input"] == "normalized"
    assert json.loads(meta["fastcnn_normalization"]) == {"mean": mean.tolist(), "std": std.tolist()}
    x = (pixels - mean) / std
    assert_logits_close(run_onnx(plain, x), model.forward(x, training=False))
    with pytest.raises(ExportError, match="raw_pixels"):
        build_onnx(model, raw_pixels=True)
    with pytest.raises(ExportError, match="std"):
        build_onnx(model, mean=mean, std=np.float32([1, 0, 1]))


def test_layer_without_export_is_named(monkeypatch):
    class Square(Layer):
        kind = ""

    model = fastcnn.build_model(EVERY_LAYER, seed=0)
    model.layers[7] = Square()
    with pytest.raises(ExportError, match=r"^model\.layers\[7\]: layer type 'Square' cannot be exported"):
        build_onnx(model)
    monkeypatch.setattr(LAYER_TYPES["relu"], "onnx_nodes", Layer.onnx_nodes)
    model = fastcnn.build_model(EVERY_LAYER, seed=0)
    with pytest.raises(ExportError, match=r"^model\.layers\[3\]\.body\[2\]: layer type 'relu' cannot be exported"):
        build_onnx(model)


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, NEWEST + 1, "17", True])
def test_bad_opset(opset):
    with pytest.raises(ExportError, match=f"choose from {MIN_OPSET} to {NEWEST}"):
        build_onnx(fastcnn.build_model(EVERY_LAYER), opset=opset)


# -- load_model, the CLI -------------------------------------------------------------------------------
def make_checkpoint(tmp_path, name="ck.npz", overrides=(), meta=None):
    cfg = fastcnn.load_config(SMALL_CONFIG, list(overrides))
    model = randomize(fastcnn.build_model(cfg.model, seed=0))
    path = tmp_path / name
    save_checkpoint(path, model.state_dict(), meta={"config": to_dict(cfg), "epoch": 1, **(meta or {})})
    return str(path), model


RGB = ["model.input_shape=[12, 12, 3]"]
RGB_META = {"data_stats": {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.2]},
            "class_names": ["cat", "dog", "emu", "fox"]}


def test_load_model(tmp_path):
    path, model = make_checkpoint(tmp_path)
    loaded = fastcnn.load_model(path)
    x = np.random.default_rng(0).standard_normal((3, *model.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x, training=False), model.forward(x, training=False))
    with pytest.raises(CheckpointError, match="not found"):
        fastcnn.load_model(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a fastcnn checkpoint"):
        fastcnn.load_model(tmp_path / "bad.npz")


def _predict_json(capsys, *args):
    code, out, err = run_cli(["predict", *args, "--json", "--top-k", "4"], capsys)
    assert code == 0, err
    return json.loads(out), err


def _assert_same_predictions(a, b):
    assert [r["input"] for r in a] == [r["input"] for r in b]
    for ra, rb in zip(a, b):
        assert [t["class"] for t in ra["top"]] == [t["class"] for t in rb["top"]]
        assert [t["name"] for t in ra["top"]] == [t["name"] for t in rb["top"]]
        for ta, tb in zip(ra["top"], rb["top"]):
            assert ta["probability"] == pytest.approx(tb["probability"], abs=1e-5)


def test_cli_export_then_predict_agrees_with_the_checkpoint(tmp_path, capsys):
    ck, model = make_checkpoint(tmp_path, overrides=RGB, meta=RGB_META)
    pixels = np.random.default_rng(3).integers(0, 256, size=(5, 12, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    code, out, err = run_cli(["export", ck], capsys)
    assert code == 0, err
    default = tmp_path / "ck.onnx"
    assert out.startswith(f"Wrote {default}") and default.is_file()
    code, out, err = run_cli(["export", ck, "-o", str(tmp_path / "raw.onnx"), "--raw-pixels", "--opset",
                              str(NEWEST)], capsys)
    assert code == 0, err
    expected, _ = _predict_json(capsys, ck, str(tmp_path / "x.npy"))
    for onnx_file in ("ck.onnx", "raw.onnx"):
        got, err = _predict_json(capsys, str(tmp_path / onnx_file), str(tmp_path / "x.npy"), "--threads", "1")
        _assert_same_predictions(got, expected)
        assert "Note:" not in err
    # the probabilities are those of normalize-then-forward
    x = (pixels.astype(np.float32) / 255 - np.float32([0.1, 0.2, 0.3])) / np.float32([0.5, 0.25, 0.2])
    probs = softmax(model.forward(x, training=False))
    for r, p in zip(expected, probs):
        assert r["top"][0]["name"] == RGB_META["class_names"][int(p.argmax())]
        for t in r["top"]:
            assert t["probability"] == pytest.approx(p[t["class"]], abs=1e-5)
    # text output, --no-normalize (float input as it is), --invert: the same as with the checkpoint
    np.save(tmp_path / "f.npy", x[:2])
    for extra in (["--no-normalize"], ["--invert"]):
        codes = [run_cli(["predict", path, str(tmp_path / "f.npy"), *extra], capsys) for path in (ck, str(default))]
        assert codes[0][0] == codes[1][0] == 0, codes
        assert codes[0][1] == codes[1][1]
    # a raw-pixels file cannot skip its own normalization
    code, _, err = run_cli(["predict", str(tmp_path / "raw.onnx"), str(tmp_path / "x.npy"), "--no-normalize"],
                           capsys)
    assert code == 2 and "--raw-pixels" in err and len(err.strip().splitlines()) == 1


def test_cli_predict_onnx_notes_missing_normalization(tmp_path, capsys):
    ck, _ = make_checkpoint(tmp_path)  # a synthetic dataset without data_stats in the meta
    np.save(tmp_path / "x.npy", np.zeros((2, 12, 12), np.uint8))
    assert run_cli(["export", ck], capsys)[0] == 0
    expected, err_ck = _predict_json(capsys, ck, str(tmp_path / "x.npy"))
    got, err = _predict_json(capsys, str(tmp_path / "ck.onnx"), str(tmp_path / "x.npy"))
    _assert_same_predictions(got, expected)
    assert "Note:" in err_ck and "no normalization statistics" in err
    code, _, err = run_cli(["export", ck, "--raw-pixels"], capsys)
    assert code == 2 and "--raw-pixels" in err and "data_stats" in err


def _one_line_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_cli_errors(tmp_path, capsys, monkeypatch):
    ck, _ = make_checkpoint(tmp_path)
    _one_line_error(*run_cli(["export", str(tmp_path / "missing.npz")], capsys)[::2], "not found")
    for opset in ("12", str(NEWEST + 1)):
        _one_line_error(*run_cli(["export", ck, "--opset", opset], capsys)[::2], f"--opset {opset}",
                        f"{MIN_OPSET} to {NEWEST}")
    _one_line_error(*run_cli(["export", ck, "-o", str(tmp_path / "no" / "m.onnx")], capsys)[::2],
                    "does not exist")
    _one_line_error(*run_cli(["export", ck, "-o", ck], capsys)[::2], "the checkpoint itself")
    # a layer type without an export
    with monkeypatch.context() as m:
        m.setattr(LAYER_TYPES["relu"], "onnx_nodes", Layer.onnx_nodes)
        _one_line_error(*run_cli(["export", ck], capsys)[::2], "model.layers[2]", "'relu'", "cannot be exported")
    assert not (tmp_path / "ck.onnx").exists()
    # predict: a file that is not ONNX
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    np.save(tmp_path / "x.npy", np.zeros((12, 12), np.uint8))
    _one_line_error(*run_cli(["predict", str(tmp_path / "junk.onnx"), str(tmp_path / "x.npy")], capsys)[::2],
                    "junk.onnx", "not an ONNX model")
    _one_line_error(*run_cli(["predict", str(tmp_path / "none.onnx"), str(tmp_path / "x.npy")], capsys)[::2],
                    "no such file")
    # not a regular file (a FIFO would hang a plain read), or larger than the bound: refused before reading
    os.mkfifo(tmp_path / "pipe.onnx")
    _one_line_error(*run_cli(["predict", str(tmp_path / "pipe.onnx"), str(tmp_path / "x.npy")], capsys)[::2],
                    "pipe.onnx", "FIFO")
    import fastcnn.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "MAX_ONNX_BYTES", 3)
    _one_line_error(*run_cli(["predict", str(tmp_path / "junk.onnx"), str(tmp_path / "x.npy")], capsys)[::2],
                    "junk.onnx", "more than the 3 allowed")


def test_external_data_is_not_followed(tmp_path, capsys):
    """A model whose initializer lives in an external file (a path of the model's choosing) is not run:
    predict hands onnxruntime the bytes, never the path, so no file beside the model is read."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "secret.bin"
    (tmp_path / "secret.bin").write_bytes(np.ones(1, np.float32).tobytes())
    nodes = [helper.make_node("Conv", ["input_nchw", "w"], ["y"]),
             helper.make_node("Transpose", ["input"], ["input_nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Flatten", ["y"], ["logits"])]
    _predict_with_tiny_onnx(tmp_path / "ext.onnx", nodes, ["N", 4], [weight], capsys, "not an ONNX model")


def _predict_with_tiny_onnx(path, nodes, output_shape, initializers, capsys, words):
    """Write an ONNX graph of ``nodes`` from input (N, 2, 2, 1) to ``logits`` of ``output_shape``; `fastcnn
    predict` with it must fail with one line holding ``words``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 2, 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    np.save(path.parent / "x.npy", np.zeros((2, 2), np.uint8))
    _one_line_error(*run_cli(["predict", str(path), str(path.parent / "x.npy")], capsys)[::2], path.name, words)


def test_failed_write_leaves_the_old_file(tmp_path, capsys, monkeypatch):
    ck, _ = make_checkpoint(tmp_path)
    (tmp_path / "ck.onnx").write_bytes(b"old")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    monkeypatch.setattr(os, "replace", full_disk)
    _one_line_error(*run_cli(["export", ck], capsys)[::2], "no space left on device")
    assert (tmp_path / "ck.onnx").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["ck.npz", "ck.onnx"]


def test_missing_extra_names_it(tmp_path, capsys, monkeypatch):
    ck, _ = make_checkpoint(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((12, 12), np.uint8))
    assert run_cli(["export", ck], capsys)[0] == 0
    monkeypatch.setitem(sys.modules, "onnx", None)
    _one_line_error(*run_cli(["export", ck], capsys)[::2], "pip install 'fastcnn[onnx]'")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    _one_line_error(*run_cli(["predict", str(tmp_path / "ck.onnx"), str(tmp_path / "x.npy")], capsys)[::2],
                    "pip install 'fastcnn[onnx]'")


def test_fastcnn_never_imports_onnx_on_its_own():
    code = ("import sys, fastcnn, fastcnn.cli, fastcnn.layers, fastcnn.model, fastcnn.predict, fastcnn.onnx_export; "
            "bad = [m for m in ('onnx', 'onnxruntime') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bench_script_smoke(tmp_path):
    """scripts/bench_onnx.py: one short round of each framework on a tiny network."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_onnx.py"), "--config", SMALL_CONFIG,
                           "--batch", "3", "--threads", "1", "--rounds", "1", "--warmup", "1", "--repeat", "2",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["framework"] for r in report["runs"]] == ["fastcnn", "onnxruntime"]
    assert all(len(r["call_ms"]) == 2 and r["median_ms"] > 0 and r["threads"] == 1 for r in report["runs"])
    (row,) = report["table"]
    assert row["fastcnn_ms"] > 0 and row["onnxruntime_ms"] > 0
    assert "ort/fastcnn" in proc.stdout


@pytest.mark.parametrize("output_shape, node", [
    (["N", 2, 2, 1], ("Identity", {})),                              # logits of rank 4
    (["N"], ("ReduceMean", {"axes": [1, 2, 3], "keepdims": 0})),    # one number per image
])
def test_an_output_that_is_not_batch_by_classes_is_refused(tmp_path, capsys, output_shape, node):
    from onnx import helper

    _predict_with_tiny_onnx(tmp_path / "odd.onnx", [helper.make_node(node[0], ["input"], ["logits"], **node[1])],
                            output_shape, [], capsys, "expected a float32 output (batch, classes)")
