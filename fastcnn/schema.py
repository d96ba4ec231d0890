"""Option checkers and section validation: the vocabulary every declaration uses.

A *schema* is a mapping ``key -> (checker, default)`` (or ``key -> nested schema``).
A checker takes ``(value, path)`` and returns the normalized value or raises
ConfigError naming ``path`` (``model.layers[3].kernel_size``). ``REQUIRED`` marks
a key with no default.

Layer types, optimizers, schedules and datasets declare their options with
these checkers, in their own modules; ``fastcnn.config`` assembles the file
schema from those declarations. This module imports nothing heavy (no Numba,
no kernel): validating a config never compiles or loads a kernel.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .errors import ConfigError

Checker = Callable[[Any, str], Any]
Schema = Dict[str, Any]  # key -> (checker or None, default) or a nested Schema

REQUIRED = object()


def type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a mapping", type(None): "null"}.get(type(value),
                                                                                     type(value).__name__)


def did_you_mean(word, options) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


# --------------------------------------------------------------------------
# Checkers


def integer(minimum=None, maximum=None) -> Checker:
    def check(value, path):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
            value = int(value)  # 1e3 or 64.0: an integer written as a number
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type_name(value)} ({value!r})")
        if minimum is not None and value < minimum:
            raise ConfigError(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(path, f"must be <= {maximum}, got {value}")
        return value
    return check


def number(minimum=None, maximum=None, min_exclusive=False, max_exclusive=False) -> Checker:
    def check(value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {type_name(value)} ({value!r})")
        value = float(value)
        if value != value:
            raise ConfigError(path, "must be a number, got NaN")
        if value in (float("inf"), float("-inf")):
            raise ConfigError(path, f"must be a finite number, got {value}")
        if minimum is not None and (value <= minimum if min_exclusive else value < minimum):
            raise ConfigError(path, f"must be {'>' if min_exclusive else '>='} {minimum}, got {value:g}")
        if maximum is not None and (value >= maximum if max_exclusive else value > maximum):
            raise ConfigError(path, f"must be {'<' if max_exclusive else '<='} {maximum}, got {value:g}")
        return value
    return check


def boolean(value, path):
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {type_name(value)} ({value!r})")
    return value


def string(value, path):
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string, got {type_name(value)} ({value!r})")
    return value


def path_string(value, path):
    """A file or folder name: a non-empty string without NUL characters (no file system takes those)."""
    value = string(value, path)
    if "\0" in value:
        raise ConfigError(path, f"a file or folder name cannot contain a NUL character, got {value!r}")
    return value


def choice(*options) -> Checker:
    def check(value, path):
        if value not in options:
            raise ConfigError(path, f"must be one of {', '.join(map(str, options))}; got {value!r}"
                                    f"{did_you_mean(value, options)}")
        return value
    return check


def optional(checker: Checker) -> Checker:
    def check(value, path):
        return None if value is None else checker(value, path)
    return check


def int_or_pair(minimum) -> Checker:
    one = integer(minimum)

    def check(value, path):
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ConfigError(path, f"expected an integer or a pair [h, w], got a list of {len(value)}")
            return [one(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return one(value, path)
    return check


def padding_value(value, path):
    """An integer, a pair, 'valid' or 'same'."""
    if isinstance(value, str):
        if value not in ("valid", "same"):
            raise ConfigError(path, f"must be an integer, a pair, 'valid' or 'same'; got {value!r}")
        return value
    return int_or_pair(0)(value, path)


def number_list(length, minimum=None, maximum=None, max_exclusive=False, what="values") -> Checker:
    """A list of exactly ``length`` numbers (e.g. Adam's betas)."""
    one = number(minimum, maximum, max_exclusive=max_exclusive)

    def check(value, path):
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise ConfigError(path, f"expected a list of {length} {what}, got {value!r}")
        return [one(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return check


# --------------------------------------------------------------------------
# Sections


def check_section(raw, schema: Schema, path: str, special: Optional[Mapping[str, Checker]] = None) -> dict:
    """Validate a mapping against a schema; returns a new dict with every key resolved
    (defaults filled in). ``special`` maps keys to checkers that replace the schema's
    (they also receive the default when the key is absent)."""
    special = special or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {type_name(raw)}")
    for key in raw:
        if key not in schema:
            raise ConfigError(join(path, key), "unknown key" + did_you_mean(key, schema) +
                              f"; known keys: {', '.join(schema) or '(none)'}")
    out = {}
    for key, spec in schema.items():
        sub = join(path, key)
        if isinstance(spec, dict):
            out[key] = check_section(raw.get(key), spec, sub, special)
            continue
        checker, default = spec
        if key in special:
            out[key] = special[key](raw.get(key, copy.deepcopy(default)), sub)
        elif key in raw:
            out[key] = checker(raw[key], sub) if checker else raw[key]
        elif default is REQUIRED:
            raise ConfigError(sub, "required key is missing")
        else:
            out[key] = copy.deepcopy(default)
    return out


def named_entry(registry: Mapping[str, Any], kind: str) -> Checker:
    """A checker for a ``{name: ..., **options}`` mapping (or a bare name) whose options are
    declared by ``registry[name].options`` (an optimizer, a schedule)."""
    def check(value, path):
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping with a 'name', got {type_name(value)}")
        if "name" not in value:
            raise ConfigError(join(path, "name"), f"required key is missing (one of {', '.join(registry)})")
        name = value["name"]
        if not isinstance(name, str) or name not in registry:
            raise ConfigError(join(path, "name"), f"unknown {kind} {name!r}{did_you_mean(name, registry)}; "
                                                  f"known: {', '.join(registry)}")
        rest = {k: v for k, v in value.items() if k != "name"}
        return {"name": name, **check_section(rest, registry[name].options, path)}
    return check


def resolve_options(schema: Schema, args: Tuple, kwargs: Mapping[str, Any], what: str) -> dict:
    """Python-API options (positional in the schema's order, or by name) -> the resolved dict,
    with the checks and defaults of a config file. A mistake raises ValueError (TypeError for a
    wrong number of arguments): the same checks, reported as Python errors."""
    names = list(schema)
    if len(args) > len(names):
        raise TypeError(f"{what}() takes at most {len(names)} positional option(s) ({', '.join(names)}), "
                        f"got {len(args)}")
    raw = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in raw:
            raise TypeError(f"{what}() got option {key!r} twice")
        raw[key] = value
    try:
        return check_section(raw, schema, what)
    except ConfigError as e:
        raise ValueError(str(e)) from None
