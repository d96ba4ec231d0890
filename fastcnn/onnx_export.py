"""ONNX export (``fastcnn export``, ``fastcnn.export_onnx``) and running an exported file (``fastcnn predict``).

The graph is the model in evaluation mode: batch norm with its running statistics (a
BatchNormalization node), dropout the identity. Input ``input``: float32 NHWC ``(batch, H, W, C)``
with a dynamic batch dimension, exactly what ``model.forward`` takes; one Transpose turns it to
ONNX's NCHW inside the graph. Output ``logits`` ``(batch, num_classes)``.

Each layer type declares its own nodes (``Layer.onnx_nodes(graph, x)`` in fastcnn/layers/*.py);
this module only walks the model with an :class:`OnnxGraph`, which names tensors after the
state-dict keys (``layers.3.0.body.1.weight``) and turns a layer without an export into one line
naming it (``model.layers[3].body[1]: ...``). Inside the graph a (H, W, C) activation is an NCHW
tensor and a flat one ``(batch, features)``.

The graph is built with the ``onnx`` package's helpers and checked with
``onnx.checker.check_model(full_check=True)`` before it is written (atomically: a temporary file,
fsync, rename). ``onnx`` and ``onnxruntime`` are the optional extra ``fastcnn[onnx]``, imported
only here and only when needed.

What ``fastcnn predict`` needs to preprocess images as the training data was is stored in the
file's metadata (``metadata_props``): the class names, the dataset, and either the training
data's mean/std (applied by predict) or, with ``raw_pixels``, the note that the graph normalizes
its input itself (its input is then pixels in [0, 1]: ``(x - mean) / std`` is the graph's first
two nodes, the arithmetic of ``fastcnn predict``).
"""
from __future__ import annotations

import json
import numbers
import os

from .errors import UserError

# NumPy is imported inside the functions: the CLI imports this module for its defaults (DEFAULT_OPSET)
# and stays quick to answer --help.

ONNX_EXTRA = "pip install 'fastcnn[onnx]'"
DEFAULT_OPSET = 17   # IR version 8: what onnxruntime 1.12+ (2022) and current runtimes load
MIN_OPSET = 13       # every node emitted here has its current form since opset 13
MAX_ONNX_BYTES = 1 << 30  # an .onnx file predict reads (protobuf itself stops at 2 GiB)

# metadata_props keys (written by build_onnx, read by open_onnx)
META_VERSION = "fastcnn_version"
META_INPUT = "fastcnn_input"              # "pixels" (normalization in the graph) or "normalized"
META_NORMALIZATION = "fastcnn_normalization"  # JSON {"mean": [...], "std": [...]}: predict applies it
META_CLASS_NAMES = "class_names"          # JSON list
META_DATASET = "dataset"


class ExportError(UserError):
    """The model or the options cannot be exported (a layer without an export, a bad opset, ...)."""


def require_onnx():
    """The ``onnx`` module, or a one-line UserError naming the extra to install."""
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise UserError(f"ONNX export needs the onnx package, which is not installed: {ONNX_EXTRA}") from None
    return onnx


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"running an .onnx file needs onnxruntime, which is not installed: {ONNX_EXTRA}") from None
    return onnxruntime


def check_opset(opset, key="opset") -> int:
    """The opset as an int, or an ExportError: from MIN_OPSET to the newest the installed onnx knows."""
    onnx = require_onnx()
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"{key} {opset!r}: not supported; choose from {MIN_OPSET} to {newest} (the newest the "
                          f"installed onnx {onnx.__version__} knows); default {DEFAULT_OPSET}")
    return int(opset)


# -- the graph the layers add their nodes to -------------------------------------------------------
class OnnxGraph:
    """Nodes and initializers of a graph being built; what ``Layer.onnx_nodes(graph, x)`` calls.

    * ``graph.node(op, inputs, **attributes)``: adds an ONNX node, returns its output's name;
    * ``graph.constant(name, array)``: adds an initializer (floats stored as float32), returns its name;
    * ``graph.layer(layer, x, key, path)``: a (sub-)layer's nodes, named inside ``key`` (a container
      names its children so: ``"0.body.1"``, config path ``"body[1]"``);
    * ``raise graph.cannot_export(layer)``: the one-line error naming the layer being exported.

    Names follow the state-dict keys of the layer being exported (``layers.3.0.body.1.weight``,
    ``layers.3.0.body.1.Conv``), made unique with a ``_<n>`` suffix.
    """

    def __init__(self, onnx):
        self._onnx = onnx
        self.nodes = []
        self.initializers = []
        self._used = set()
        self._scope = []  # [(state-dict key part, config path part)]

    def _unique(self, name):
        base, n = name, 0
        while name in self._used:
            n += 1
            name = f"{base}_{n}"
        self._used.add(name)
        return name

    def _qualified(self, name):
        key = ".".join(k for k, _ in self._scope)
        return f"{key}.{name}" if key else name

    def path(self) -> str:
        """The config path of the layer being exported: ``model.layers[3].body[1]``."""
        return ".".join(p for _, p in self._scope) or "model"

    def layer(self, layer, x: str, key: str, path: str) -> str:
        self._scope.append((key, path))
        try:
            return layer.onnx_nodes(self, x)
        finally:
            self._scope.pop()

    def constant(self, name: str, array) -> str:
        import numpy as np

        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        full = self._unique(self._qualified(name))
        self.initializers.append(self._onnx.numpy_helper.from_array(np.ascontiguousarray(array), full))
        return full

    def node(self, op: str, inputs, **attributes) -> str:
        out = self._unique(self._qualified(op))
        self.nodes.append(self._onnx.helper.make_node(op, list(inputs), [out], name=out, **attributes))
        return out

    def cannot_export(self, layer) -> ExportError:
        kind = layer.kind or type(layer).__name__
        return ExportError(f"{self.path()}: layer type {kind!r} cannot be exported to ONNX (it declares no "
                           f"ONNX nodes)")

    def rename(self, old: str, new: str) -> None:
        """Call the tensor ``old`` ``new`` wherever a node produces or reads it."""
        for node in self.nodes:
            for names in (node.input, node.output):
                for i, name in enumerate(names):
                    if name == old:
                        names[i] = new


# -- export -----------------------------------------------------------------------------------
def _normalization(mean, std, channels):
    import numpy as np

    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    for name, v in (("mean", mean), ("std", std)):
        if v.size not in (1, channels) or not np.all(np.isfinite(v)):
            raise ExportError(f"{name}: expected 1 or {channels} finite values (one per channel), got {v.tolist()}")
    if not np.all(std > 0):
        raise ExportError(f"std: must be positive, got {std.tolist()}")
    return mean, std


def build_onnx(model, opset=DEFAULT_OPSET, *, mean=None, std=None, raw_pixels=False, class_names=None,
               dataset=None):
    """The ``onnx.ModelProto`` of ``model`` (a built fastcnn Sequential) in evaluation mode, checked.

    ``mean``, ``std``: the training data's normalization (per channel, pixels in [0, 1] units), stored
    in the metadata for ``fastcnn predict``; with ``raw_pixels`` folded into the graph instead, whose
    input is then pixels in [0, 1]. ``class_names``, ``dataset``: stored in the metadata.
    """
    from . import __version__

    onnx = require_onnx()
    opset = check_opset(opset)
    helper = onnx.helper
    input_shape = tuple(int(s) for s in model.input_shape)
    if (mean is None) != (std is None):
        raise ExportError("mean and std: give both or neither")
    if mean is not None:
        mean, std = _normalization(mean, std, input_shape[-1])
    if raw_pixels and mean is None:
        raise ExportError("raw_pixels: needs the training data's mean and std to fold into the graph")

    graph = OnnxGraph(onnx)
    x = "input"
    if raw_pixels:  # NHWC: the statistics broadcast over the last (channel) axis, as fastcnn predict's
        x = graph.node("Div", [graph.node("Sub", [x, graph.constant("input_mean", mean)]),
                               graph.constant("input_std", std)])
    if len(input_shape) == 3:
        x = graph.node("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC -> NCHW
    for i, layer in enumerate(model.layers):
        x = graph.layer(layer, x, f"layers.{i}", f"model.layers[{i}]")
    graph.rename(x, "logits")

    float32 = onnx.TensorProto.FLOAT
    g = helper.make_graph(
        graph.nodes, "fastcnn",
        [helper.make_tensor_value_info("input", float32, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logits", float32, ["batch", int(model.num_classes)])],
        initializer=graph.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="fastcnn", producer_version=__version__,
                              doc_string="fastcnn model in evaluation mode: input float32 NHWC "
                                         + ("pixels in [0, 1]" if raw_pixels else "normalized images"))
    meta = {META_VERSION: __version__, META_INPUT: "pixels" if raw_pixels else "normalized"}
    if mean is not None and not raw_pixels:
        meta[META_NORMALIZATION] = json.dumps({"mean": mean.tolist(), "std": std.tolist()})
    if class_names is not None:
        meta[META_CLASS_NAMES] = json.dumps([str(n) for n in class_names])
    if dataset is not None:
        meta[META_DATASET] = str(dataset)
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path, opset=DEFAULT_OPSET, **options):
    """Write ``model`` to the ONNX file ``path`` atomically; returns the ``onnx.ModelProto``.

    ``options``: ``mean``, ``std``, ``raw_pixels``, ``class_names``, ``dataset`` (see :func:`build_onnx`).
    """
    proto = build_onnx(model, opset, **options)
    write_bytes(path, proto.SerializeToString())
    return proto


def write_bytes(path, data: bytes) -> None:
    """Atomic write (temporary file, fsync, rename), a one-line UserError when it fails."""
    from .checkpoint import atomic_write_bytes
    from .rundir import describe_oserror

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: a folder of that name is in the way")
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {describe_oserror(e, path)}") from None


def default_output(checkpoint) -> str:
    """CHECKPOINT with the suffix .onnx (runs/mnist/best.npz -> runs/mnist/best.onnx)."""
    return os.path.splitext(os.fspath(checkpoint))[0] + ".onnx"


def export_checkpoint(checkpoint, output=None, opset=DEFAULT_OPSET, raw_pixels=False):
    """``fastcnn export``: the checkpoint's model to ONNX, with its class names and normalization.

    Returns the path written.
    """
    from .evaluate import load_model_checkpoint
    from .predict import class_names_for, normalization_for

    require_onnx()  # before reading anything: the install hint first
    opset = check_opset(opset, "--opset")
    output = default_output(checkpoint) if output is None else os.fspath(output)
    if os.path.abspath(output) == os.path.abspath(os.fspath(checkpoint)):
        raise UserError(f"-o {output}: is the checkpoint itself; choose another file")
    saved, cfg, model = load_model_checkpoint(checkpoint)
    mean, std, source = normalization_for(cfg, saved.meta)
    if raw_pixels and mean is None:
        raise ExportError(f"--raw-pixels: {checkpoint} holds no normalization statistics for dataset "
                          f"{cfg.data.dataset!r} (meta data_stats) to fold into the graph; export without it")
    export_onnx(model, output, opset, mean=mean, std=std, raw_pixels=raw_pixels,
                class_names=class_names_for(cfg, saved.meta), dataset=cfg.data.dataset)
    return output


# -- running an exported file -------------------------------------------------------------------
def _first_line(e):
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def open_onnx(path, threads=None):
    """An .onnx file opened in onnxruntime (``threads``: its thread count) as a ``fastcnn.predict.Classifier``:
    input shape, class names and normalization from the metadata. One-line UserErrors for a missing or
    unusable file."""
    from .predict import Classifier
    from .safeio import NotRegularFile, UnsafeFile, read_regular

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    ort = require_onnxruntime()
    # The bytes are read here, bounded, and handed to onnxruntime: a FIFO or device does not hang or
    # flood it, and a model that points to external data files (paths of its own choosing) cannot
    # make it read them.
    try:
        model_bytes = read_regular(path, MAX_ONNX_BYTES)
    except (NotRegularFile, UnsafeFile) as e:
        raise UserError(f"{path}: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about initializers on stderr
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise UserError(f"{path}: not an ONNX model onnxruntime can run ({_first_line(e)})") from None
    inputs = session.get_inputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    if (len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(shape) != 4
            or not all(isinstance(d, int) and d > 0 for d in shape[1:])):
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise UserError(f"{path}: expected one float32 input (batch, H, W, C) as fastcnn export writes; it has {got}")
    outputs = session.get_outputs()
    if not outputs or outputs[0].type != "tensor(float)" or len(outputs[0].shape or []) != 2:
        got = ", ".join(f"{o.name} {o.type} {o.shape}" for o in outputs) or "none"
        raise UserError(f"{path}: expected a float32 output (batch, classes) as fastcnn export writes; it has {got}")
    meta = session.get_modelmeta().custom_metadata_map
    try:
        names = json.loads(meta[META_CLASS_NAMES]) if META_CLASS_NAMES in meta else None
        stats = json.loads(meta[META_NORMALIZATION]) if META_NORMALIZATION in meta else None
    except ValueError:
        raise UserError(f"{path}: corrupt fastcnn metadata (class names or normalization)") from None
    in_graph = meta.get(META_INPUT) == "pixels"
    mean = std = note = None
    if isinstance(stats, dict) and "mean" in stats and "std" in stats:
        try:
            mean, std = _normalization(stats["mean"], stats["std"], shape[3])
        except (ExportError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt fastcnn metadata (normalization {stats})") from None
    elif not in_graph:
        note = (f"{path} holds no normalization statistics (exported without them, or not by fastcnn); inputs "
                f"are only scaled to [0, 1] (uint8 / 255), which may not match how the model was trained")

    def logits(x, batch_size=256):
        import numpy as np

        x = np.ascontiguousarray(x, np.float32)
        parts = []
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            out = np.asarray(session.run(None, {inputs[0].name: xb})[0])
            if out.ndim != 2 or len(out) != len(xb) or out.shape[1] < 1:
                raise UserError(f"{path}: gave an output of shape {out.shape} for {len(xb)} input(s); expected "
                                f"(batch, classes)")
            parts.append(out)
        return np.concatenate(parts)

    return Classifier(tuple(shape[1:]), meta.get(META_DATASET), names if isinstance(names, list) else None,
                      mean, std, note, in_graph, logits)
