"""Typed dataclass trees from parsed YAML: every key checked against the annotations.

`build(cls, data, prefix, source)` turns a mapping into an instance of the dataclass `cls`,
recursing into nested dataclasses, lists and mappings. An unknown key, a wrong type or a value
outside a field's `choices` metadata raises ConfigError naming the dotted key and the source.
Fields with `internal` metadata are not keys. agent.config declares the tree and its checks.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List

from agent.errors import ConfigError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return type_name(args[0]) + " or null"
    if origin in (list, List):
        return "a list of " + type_name(typing.get_args(tp)[0]) + "s"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, str(tp)
    )


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted, or raise ConfigError."""

    def bad(what: str = "") -> ConfigError:
        got = type(value).__name__ if value is not None else "null"
        return ConfigError(
            f"{source}: key '{key}' must be {what or type_name(tp)}, got {got} {value!r}"
            if not isinstance(value, (dict, list))
            else f"{source}: key '{key}' must be {what or type_name(tp)}, got {got}"
        )

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return coerce(value, inner, key, source)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, key, source)
    if origin in (list, List):
        if not isinstance(value, list):
            raise bad()
        (inner,) = typing.get_args(tp)
        return [coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        ktp, vtp = typing.get_args(tp)
        return {
            coerce(k, ktp, f"{key}", source): coerce(v, vtp, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        # YAML turns 0640 into an int and yes into a bool; a string key wants a string
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()


def build(cls: Any, data: Dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key '{where}' (known keys here: {known})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = coerce(value, hints[name], key, source)
        choices = fields[name].metadata.get("choices")
        if choices is not None and converted not in choices:
            allowed = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{source}: key '{key}' is {converted!r}; allowed: {allowed}")
        kwargs[name] = converted
    return cls(**kwargs)
