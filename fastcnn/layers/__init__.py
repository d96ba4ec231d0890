"""Layer types: one module per type, discovered here.

Every module of this package that defines a ``Layer`` subclass with a ``kind``
registers it under that name (the config's ``type``). Config validation, the
summary, the PyTorch twin, the model size check and the tests all read the
classes found here; adding a layer type is adding its module (see
fastcnn/layers/base.py for what a class declares).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Tuple, Type

from ..errors import ConfigError
from ..schema import check_section, did_you_mean, type_name
from .base import INIT_SCHEMES, Layer, Parameter, checked_gradient, init_weight_and_bias

_NOT_LAYER_MODULES = {"base"}


def _discover() -> Dict[str, Type[Layer]]:
    found: Dict[str, Type[Layer]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_LAYER_MODULES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Layer) and obj.kind and obj.__module__ == module.__name__:
                if obj.kind in found:
                    raise RuntimeError(f"layer type {obj.kind!r} is declared twice: {found[obj.kind].__module__} "
                                       f"and {module.__name__}")
                found[obj.kind] = obj
    return found


LAYER_TYPES: Dict[str, Type[Layer]] = _discover()

# The classes by name, for `from fastcnn.layers import Conv2D` (one line per type is not needed:
# they are the registry's values).
globals().update({cls.__name__: cls for cls in LAYER_TYPES.values()})


def check_layer_list(value, path: str) -> List[dict]:
    """Config checker for a list of layers: each entry ``{type: ..., **options}`` resolved
    against its type's declared options."""
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "expected a non-empty list of layers")
    layers = []
    for i, spec in enumerate(value):
        lpath = f"{path}[{i}]"
        if not isinstance(spec, dict):
            raise ConfigError(lpath, f"expected a mapping with a 'type', got {type_name(spec)}")
        if "type" not in spec:
            raise ConfigError(f"{lpath}.type", "required key is missing")
        kind = spec["type"]
        if not isinstance(kind, str) or kind not in LAYER_TYPES:
            raise ConfigError(f"{lpath}.type", f"unknown layer type {kind!r}{did_you_mean(kind, LAYER_TYPES)}"
                                               f"; known: {', '.join(LAYER_TYPES)}")
        rest = {k: v for k, v in spec.items() if k != "type"}
        layers.append({"type": kind, **check_section(rest, LAYER_TYPES[kind].options, lpath)})
    return layers


def layer_from_config(spec) -> Layer:
    """A layer object from a validated config entry {type: ..., **options}."""
    options = {k: v for k, v in spec.items() if k != "type"}
    return LAYER_TYPES[spec["type"]](**options)


def plan_shapes(model_cfg) -> List[Tuple[Layer, tuple, tuple]]:
    """Per-sample shapes through the stack: [(layer, in_shape, out_shape), ...].

    Raises ConfigError naming the layer (``model.layers[i]``) when a shape becomes
    impossible, or when the last layer's width is not num_classes. Allocates no
    weights: config validation calls it.
    """
    def get(key, default=None):
        return model_cfg.get(key, default) if isinstance(model_cfg, dict) else getattr(model_cfg, key, default)

    shape = tuple(get("input_shape", (28, 28, 1)))
    num_classes = get("num_classes", 10)
    plan = []
    for i, spec in enumerate(get("layers")):
        layer = layer_from_config(spec)
        out = tuple(layer.output_shape(shape, f"model.layers[{i}]"))
        plan.append((layer, shape, out))
        shape = out
    if shape != (num_classes,):
        raise ConfigError("model.layers", f"the last layer must output ({num_classes},) = num_classes logits; "
                                          f"it outputs {shape}")
    return plan


__all__ = ["LAYER_TYPES", "INIT_SCHEMES", "Layer", "Parameter", "checked_gradient", "check_layer_list",
           "init_weight_and_bias", "layer_from_config", "plan_shapes", *(c.__name__ for c in LAYER_TYPES.values())]
