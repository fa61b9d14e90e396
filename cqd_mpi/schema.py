"""Typed loading of nested dicts (from YAML) into dataclasses, with errors that name the key.

Config sections and task settings are plain dataclasses; `build(cls, data, where)` checks
unknown keys, missing keys and types, and reports e.g. ``qd.mutation.w_max: expected a
number, got 'high' (str)``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

from cqd_mpi.errors import ConfigError

_MISSING = dataclasses.MISSING


@dataclasses.dataclass
class NoSettings:
    """The Settings of a task or engine kind that takes none."""


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _same_shape(tp: Any, value: Any) -> bool:
    """A mapping given for a dataclass (or a list for a list): its own error is the useful one."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin is dict
    if isinstance(value, list):
        return origin in (list, tuple)
    return False


def convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting mappings to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return convert(option, value, where)
            except ConfigError as exc:
                if _same_shape(option, value):
                    errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_describe(value)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {
            convert(key_tp, k, f"{where}"): convert(val_tp, v, f"{where}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")


REST = types.MappingProxyType({"schema": "rest"})
"""Field metadata of a dict field that collects the keys its mapping has beyond the declared
ones (`dataclasses.field(default_factory=dict, metadata=schema.REST)`; at most one per
dataclass, and it is no key itself). The dataclass's `validate` checks them: for settings
that pass another library's options through (tasks/lmeval)."""


def _rest_name(cls: type) -> str | None:
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("schema") == REST["schema"]), None)


def build(cls: type, data: Any, where: str):
    """Build dataclass `cls` from mapping `data`; `where` names the mapping in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    rest = _rest_name(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != rest}
    unknown = sorted(set(data) - set(fields))
    if unknown and rest is None:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"expected keys: {', '.join(fields)}"
        )
    kwargs = {rest: {k: data[k] for k in unknown}} if rest else {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = convert(hints[name], data[name], key)
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ConfigError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(where)
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of build: plain dicts and lists, for freezing a config to YAML."""
    if dataclasses.is_dataclass(obj):
        rest = _rest_name(type(obj))
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != rest}
        return {**out, **to_dict(getattr(obj, rest))} if rest else out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, where: str = "size", *, minimum: int = 0) -> int:
    """Bytes from '5GB', '500MiB' (decimal and binary units, as transformers reads them) or an
    integer; ConfigError naming `where` for anything else or a value below `minimum`."""
    if isinstance(text, bool):
        raise ConfigError(f"{where}: expected a size such as '5GB' or '512MiB', got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ConfigError(f"{where}: expected a size such as '5GB' or '512MiB', got {text!r}")
        number, unit = match.groups()
        value = int(float(number) * _UNITS[(unit or "").upper()])
    if value < minimum:
        raise ConfigError(f"{where}: expected a size of at least {minimum} bytes, got {text!r}")
    return value
