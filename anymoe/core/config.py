"""One loader from YAML to a tree of frozen dataclasses, with errors that name the field.

Each component owns a small frozen dataclass of its settings. ``load_config`` maps a plain
mapping onto that tree: unknown keys are rejected with the nearest valid key suggested,
values are type-checked, ``param(..., ge=, le=, choices=)`` bounds are enforced, and a
dataclass may add cross-field checks in ``validate()``. Every error is a
:class:`ConfigError` whose message starts with the full dotted path of the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A bad config value: ``field`` is the dotted path, the message says how to fix it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error re-rooted under a parent path."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


def param(default: Any = _MISSING, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, choices: Sequence[Any] | None = None,
          doc: str = "", default_factory: Any = _MISSING) -> Any:
    """A dataclass field with bounds the loader enforces, and a one-line doc for `--help`."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(path, f"expected {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping of settings, got {type(value).__name__} {value!r}")
        return load_config(tp, value, path)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:  # YAML 1.1 reads "1e-3" as a string; accept it as the number it is.
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config loader cannot handle type {tp!r} at {path}")  # a bug in a dataclass


def _check_bounds(value: Any, meta: Mapping[str, Any], path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(path, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(key)
        if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
            raise ConfigError(path, f"must be {word} {bound}; got {value!r}")


def load_config(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; raise ConfigError naming the field on any problem."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping of settings, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key; {hint}valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        fpath = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], fpath)
            _check_bounds(kwargs[name], f.metadata, fpath)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(fpath, "is required but missing")
    try:
        obj = cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise err.under(path) from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree back to plain YAML-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file into a mapping, with one clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {str(p)!r} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"{p} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError("", f"{p} must hold a mapping of settings at the top level, not {kind}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply command-line ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping."""
    result: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.path=value, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(key, "an override key must be a dotted path like optim.lr")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts), f"{part!r} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def field_docs(cls: type) -> dict[str, str]:
    """Dotted field path -> doc string, for `anymoe train --help-config`."""
    out: dict[str, str] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in field_docs(tp).items()})
        else:
            out[f.name] = f.metadata.get("doc", "")
    return out


__all__ = ["ConfigError", "apply_overrides", "field_docs", "load_config", "load_yaml", "param", "to_dict"]
