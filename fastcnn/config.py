"""YAML config -> a validated, fully resolved config.

The schema below declares the file's sections and keys with their types,
ranges and defaults; the options of each layer type are declared by the type
itself (fastcnn/layers/) and read from there. Every error names the key path where it happened
(``model.layers[3].kernel_size: ...``) and is raised as ConfigError, which the
CLI prints as one line with exit code 2.
"""
import copy
import os
import re
from typing import Iterable, Union

import yaml

from .data import DATASET_SPECS, DATASETS
from .errors import ConfigError
from .layers import LAYER_TYPES, check_layer_list, plan_shapes
from .optim import OPTIMIZERS
from .schedules import SCHEDULES, EarlyStopping
from .schema import (
    REQUIRED,
    boolean,
    check_section,
    choice,
    did_you_mean,
    integer,
    named_entry,
    number,
    optional,
    path_string,
    type_name,
)

# --------------------------------------------------------------------------
# YAML reading. PyYAML implements YAML 1.1, where `1e-3` (no dot) is a string
# and a repeated key silently wins; users write `lr: 1e-3` and deserve an
# error for a duplicate, so the loader below reads YAML 1.2 floats and
# refuses duplicate keys.

MAX_CONFIG_BYTES = 1 << 20


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.mark = key, mark


class ConfigLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML reports it itself below
                pass
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
# YAML 1.2 booleans too: only true/false. YAML 1.1 also reads yes/no/on/off (and y/n) as booleans, so
# `dataset: no` or a class named `on` would silently become False/True.
_BOOL = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in ConfigLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text):
    """YAML text -> plain Python data (aliases expanded into independent copies)."""
    return _detach(yaml.load(text, Loader=ConfigLoader))


def _detach(value):
    # YAML aliases (&a / *a) share one object; --set on one copy must not change the others.
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value


# --------------------------------------------------------------------------
# Checkers of the file's own keys (layer, optimizer and schedule options are
# declared by their types: fastcnn/layers/, ...).


def shape3(value, path):
    if not isinstance(value, list) or len(value) != 3:
        raise ConfigError(path, f"expected [height, width, channels], got {value!r}")
    return [integer(1)(v, f"{path}[{i}]") for i, v in enumerate(value)]


def validation_value(value, path):
    if value == "test":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
        return float(value)
    raise ConfigError(path, f"must be 'test' or a fraction in (0, 1) held out of the training set; got {value!r}")


def threads_value(value, path):
    if value is None:
        return None
    return integer(1)(value, path)


# --------------------------------------------------------------------------
# The schema. A section is a dict: key -> (checker, default). REQUIRED marks
# keys with no default.

SEED_LAYERS = [
    {"type": "conv2d", "filters": 32, "kernel_size": 3},
    {"type": "relu"},
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "conv2d", "filters": 64, "kernel_size": 3},
    {"type": "relu"},
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 128},
    {"type": "relu"},
    {"type": "dense", "units": 10},
]

# The options of each optimizer, schedule and early stopping are declared by their classes
# (fastcnn/optim.py OPTIMIZERS, fastcnn/schedules.py SCHEDULES and EarlyStopping); the datasets by
# fastcnn/data (DATASET_SPECS: name, fixed image shape and classes, whether data.path is needed).


def _early_stopping(value, path):
    return None if value is None else check_section(value, EarlyStopping.options, path)


# Sections that are null (off) by default; --set on one of their keys switches them on.
OPTIONAL_SECTIONS = {"early_stopping": EarlyStopping.options}

SCHEMA = {
    "seed": (integer(0), 0),
    "model": {
        "input_shape": (shape3, [28, 28, 1]),
        "num_classes": (integer(2), 10),
        "dtype": (choice("float32", "float64"), "float32"),
        "init": (choice("he_uniform", "pytorch"), "he_uniform"),
        "layers": (None, SEED_LAYERS),  # checked by _layers
    },
    "data": {
        "dataset": (choice(*DATASETS), REQUIRED),
        "root": (optional(path_string), None),
        "batch_size": (integer(1), 64),
        "validation": (validation_value, "test"),
        "num_train": (optional(integer(1)), None),
        "num_test": (optional(integer(1)), None),
        "path": (optional(path_string), None),
        "resize": (boolean, False),
        "augment": {
            "crop_padding": (integer(0), 0),
            "horizontal_flip": (boolean, False),
        },
    },
    "train": {
        "epochs": (integer(0), 5),
        "optimizer": (None, {"name": "adam", "lr": 0.001}),  # checked by _named_section
        "schedule": (None, {"name": "none"}),
        "threads": (threads_value, None),
        "on_nan": (choice("stop", "skip"), "stop"),
        "clip_grad_norm": (optional(number(0.0, min_exclusive=True)), None),
        "label_smoothing": (number(0.0, 1.0, max_exclusive=True), 0.0),
        "early_stopping": (None, None),  # checked by _early_stopping
    },
    "output": {
        "dir": (path_string, "runs/mnist"),
    },
}

TOP_REQUIRED = ("model",)


_SPECIAL = {
    "layers": check_layer_list,
    "optimizer": named_entry(OPTIMIZERS, "optimizer"),
    "schedule": named_entry(SCHEDULES, "schedule"),
    "early_stopping": _early_stopping,
}


class Section(dict):
    """A dict whose keys also read as attributes: cfg.train.epochs."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _wrap(value):
    if isinstance(value, dict):
        return Section({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value):
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def validate(raw):
    """A raw mapping (as parsed from YAML) -> a resolved config (Section).

    Checks keys, types and ranges, then the layer stack's shapes (by building
    the shape plan, without allocating any weights).
    """
    if not isinstance(raw, dict):
        raise ConfigError("", f"the config must be a mapping of sections (model, data, ...), got {type_name(raw)}")
    for key in TOP_REQUIRED:
        if raw.get(key) is None:
            raise ConfigError(key, "required section is missing" if key not in raw else
                              "required section is empty (null); give at least {} for the defaults")
    if not isinstance(raw.get("data"), dict) or "dataset" not in raw["data"]:
        if "data" in raw and not isinstance(raw["data"], dict):
            raise ConfigError("data", f"expected a mapping, got {type_name(raw['data'])}")
        raise ConfigError("data.dataset", f"required key is missing (one of {', '.join(DATASETS)})")
    cfg = _wrap(check_section(raw, SCHEMA, "", _SPECIAL))
    dataset = DATASET_SPECS[cfg.data.dataset]
    if dataset.path is not None and cfg.data.path is None:
        raise ConfigError("data.path", f"required for dataset {cfg.data.dataset!r} (the {dataset.path})")
    if dataset.input_shape is not None:
        shape, classes = list(dataset.input_shape), dataset.num_classes
        if cfg.model.input_shape != shape:
            raise ConfigError("model.input_shape", f"is {cfg.model.input_shape} but {cfg.data.dataset} images "
                                                   f"are {shape}")
        if cfg.model.num_classes != classes:
            raise ConfigError("model.num_classes", f"is {cfg.model.num_classes} but {cfg.data.dataset} has "
                                                   f"{classes} classes")
    _check_sizes(plan_shapes(cfg.model))
    return cfg


MAX_PARAMETERS = 1 << 30        # 4 GiB of float32 weights
MAX_ACTIVATION = 1 << 27        # elements of one layer's output for one image (512 MiB of float32)


def _check_sizes(plan):
    """Refuse stacks whose weights or activations could not be allocated, naming the layer."""
    total = 0
    for i, (layer, in_shape, out_shape) in enumerate(plan):
        count = 0
        for shape in layer.parameter_shapes(in_shape).values():
            size = 1
            for d in shape:
                size *= d
            count += size
        total += count
        if count > MAX_PARAMETERS or total > MAX_PARAMETERS:
            raise ConfigError(f"model.layers[{i}]", f"the model would have {total:,} parameters "
                                                    f"(at most {MAX_PARAMETERS:,})")
        size = 1
        for d in out_shape:
            size *= d
        if size > MAX_ACTIVATION:
            raise ConfigError(f"model.layers[{i}]", f"outputs {size:,} values per image {tuple(out_shape)} "
                                                    f"(at most {MAX_ACTIVATION:,})")


def validate_section(name, raw):
    """Validate one top-level section (e.g. a ``model`` mapping given in Python)."""
    return _wrap(check_section(raw, SCHEMA[name], name, _SPECIAL))


def load_config(path: Union[str, "os.PathLike[str]"], overrides: Iterable[str] = ()) -> Section:
    """Read a YAML file, apply ``KEY=VALUE`` overrides, validate. Returns a Section."""
    path = os.fspath(path)
    text = _read_config_text(path)
    for item in overrides:  # a --set value is YAML too: the same bounds before it is parsed
        _check_yaml_size(item.partition("=")[2], "--set " + _echo(item.partition("=")[0], 80))
    _check_yaml_size(text, path)
    try:
        raw = parse_yaml(text)
    except _DuplicateKey as e:
        raise ConfigError("", f"{path}: duplicate key {e.key!r} at line {e.mark.line + 1}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark:
            problem += f" ({context} started at line {cmark.line + 1})"
        raise ConfigError("", f"{path}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise ConfigError("", f"{path}: the YAML nests too deeply") from None
    if raw is None:
        raise ConfigError("", f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: the config must be a mapping of sections (model, data, ...), "
                              f"got {type_name(raw)}")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def _read_config_text(path):
    """A config file's text: a regular file (never a FIFO, which would block, or a device, which never
    ends) of at most MAX_CONFIG_BYTES bytes, read through one descriptor."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("", f"config path is a folder, not a YAML file: {path}") from None
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError("", f"config path is a folder, not a YAML file: {path}")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device" if
                    stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise ConfigError("", f"{path}: is {kind}, not a YAML file (configs are read from regular files)")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError("", f"{path}: {st.st_size:,} bytes is too large for a config file "
                                  f"(at most {MAX_CONFIG_BYTES:,})")
        try:
            os.set_blocking(fd, True)
            data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError("", f"cannot read config file {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"{path}: more than {MAX_CONFIG_BYTES:,} bytes; too large for a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path}: not a text (UTF-8) YAML file (byte {e.start} is not UTF-8)") from None


MAX_YAML_NODES = 1_000_000  # values after expanding YAML aliases (a "billion laughs" file has 10**9)


def _check_yaml_size(text, where):
    """ConfigError when the YAML would expand (aliases) to more than MAX_YAML_NODES values or nests too deeply.

    Counted on the node graph, each shared (aliased) node once per use, before anything is built.
    """
    if "*" not in text:  # no alias: the text's own size bounds it
        return
    try:
        root = yaml.compose(text, Loader=ConfigLoader)
    except (yaml.YAMLError, RecursionError):
        return  # parse_yaml reports it
    sizes, open_nodes = {}, set()
    stack = [(root, False)] if root is not None else []
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes and not done:
            continue
        if not done and key in open_nodes:
            raise ConfigError("", f"{where}: a YAML alias refers to a value that contains it (a recursive "
                                  f"structure); configs cannot be recursive")
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        open_nodes.discard(key)
        sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if sizes[key] > MAX_YAML_NODES:
            raise ConfigError("", f"{where}: the YAML expands to more than {MAX_YAML_NODES:,} values "
                                  f"(nested aliases); refusing to build it")


def _echo(value, limit=200):
    """A value for an error message: its repr, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text):,} characters)"
    return text


def _parse_key_path(key):
    """'model.layers[3].filters' -> ['model', 'layers', 3, 'filters']."""
    parts = []
    for piece in key.split("."):
        if not piece:
            raise ConfigError(key, "malformed key path (empty component)")
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        while rest:
            index, close, rest = rest.partition("]")
            if not close or not index.isdigit():
                raise ConfigError(key, "malformed key path (list index must be [N])")
            parts.append(int(index))
            rest = rest[1:] if rest.startswith("[") else rest
            if rest:
                raise ConfigError(key, "malformed key path")
    return parts


def _schema_has(parts, raw):
    """Whether a key path names a key the schema knows (so --set may create it)."""
    node = SCHEMA
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            if isinstance(node, tuple):
                if i == len(parts) - 1:
                    return True
                # Into a special (layers, optimizer): the value must already exist in raw.
                return False
        else:
            return False
    return isinstance(node, dict)


def apply_override(raw, item):
    """Apply one ``KEY=VALUE`` (VALUE parsed as YAML) to the raw mapping in place."""
    if "=" not in item:
        raise ConfigError("--set", f"expected KEY=VALUE, got {_echo(repr(item))}")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = _parse_key_path(key)
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        here = _path_str(parts[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(here, "no such list element to override")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(here, "cannot override inside a value that is not a mapping")
            if node.get(part) is None and part in OPTIONAL_SECTIONS and len(parts) == i + 2:
                node[part] = {}  # e.g. --set train.early_stopping.patience=3 switches early stopping on
            if part not in node:
                # A section or named sub-mapping absent from the file: create it if the schema has it.
                default = _default_at(parts[: i + 1])
                if default is None:
                    raise ConfigError(here, "no such key to override" + did_you_mean(part, _known_at(parts[:i])))
                node[part] = default
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(key, "no such list element to override")
        node[last] = value
        return
    if not isinstance(node, dict):
        raise ConfigError(key, "cannot override inside a value that is not a mapping")
    if last not in node and not _known_key(parts, node):
        raise ConfigError(key, "no such key to override" + did_you_mean(last, _known_at(parts[:-1], node)))
    node[last] = value


def _path_str(parts):
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _default_at(parts):
    """A fresh default value for a schema section/key path, or None."""
    node = SCHEMA
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        return {}
    return copy.deepcopy(node[1]) if node[1] is not REQUIRED else None


def _known_at(parts, node=None):
    """Known key names at a path (for 'did you mean')."""
    schema = SCHEMA
    for part in parts:
        if isinstance(schema, dict) and part in schema:
            schema = schema[part]
        else:
            schema = None
            break
    keys = set(schema) if isinstance(schema, dict) else set()
    if isinstance(node, dict):
        keys |= set(node)
        if isinstance(node.get("type"), str) and node["type"] in LAYER_TYPES:
            keys |= set(LAYER_TYPES[node["type"]].options)
        if isinstance(node.get("name"), str):
            for registry in (OPTIMIZERS, SCHEDULES):
                if node["name"] in registry:
                    keys |= set(registry[node["name"]].options)
    return sorted(keys)


def _known_key(parts, node):
    if _schema_has(parts, None):
        return True
    last = parts[-1]
    if len(parts) >= 2 and parts[-2] in OPTIONAL_SECTIONS:
        return last in OPTIONAL_SECTIONS[parts[-2]]
    if isinstance(node.get("type"), str) and node["type"] in LAYER_TYPES:
        return last in LAYER_TYPES[node["type"]].options
    if isinstance(node.get("name"), str):
        return any(node["name"] in r and last in r[node["name"]].options for r in (OPTIMIZERS, SCHEDULES))
    return False


def to_yaml(cfg):
    """The resolved config as YAML text (saved beside a run's outputs)."""
    return yaml.safe_dump(_unwrap(cfg), sort_keys=False, default_flow_style=None)


def to_dict(cfg):
    return _unwrap(cfg)
