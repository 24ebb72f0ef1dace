"""Typed, immutable records with validated ``from_dict`` (the mixin behind ``harness.record``).

``Record.from_dict`` checks every field against its annotation: presence (fields with defaults may
be absent), type (int, float, str, bool, Optional/union, tuple, dict, nested records), and that
values of fields whose name carries a unit (``_ms``, ``_us``, ``_s``, ``_bytes``, ``_gbps``, ``_pct``,
``_mhz``) are finite and >= 0. Errors are ``RecordError`` naming the dotted field path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Union

UNIT_SUFFIXES = ("_ms", "_us", "_s", "_bytes", "_gbps", "_pct", "_mhz")


def _has_unit(where: str) -> bool:
    return any(part.split("[")[0].endswith(UNIT_SUFFIXES) for part in where.split("."))


class RecordError(ValueError):
    """A field is missing or has the wrong type; ``field`` is its dotted path."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"field {where}: {problem}")
        self.field = where


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@functools.cache
def _parts(tp) -> tuple:
    return typing.get_origin(tp), typing.get_args(tp), dataclasses.is_dataclass(tp)


def _number(value: Any, where) -> float:
    """A float from an int or float (not a bool); ``where()`` names the field only when it is needed."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RecordError(where(), f"expected a number, got {value!r}"[:120])
    value = float(value)
    if (math.isnan(value) or value < 0) and _has_unit(where()):
        raise RecordError(where(), f"a duration, size or rate must be >= 0, got {value}")
    return value


def _check(value: Any, tp, where: str) -> Any:
    """``value`` converted to annotation ``tp`` (records built, lists made tuples), else RecordError."""
    origin, args, is_record = _parts(tp)
    if tp is float:
        return _number(value, lambda: where)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _check(value, a, where)
            except RecordError as e:
                errors.append(e)
        raise errors[0]
    if is_record:
        if not isinstance(value, dict):
            raise RecordError(where, f"expected an object, got {type(value).__name__}")
        return tp.from_dict(value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecordError(where, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise RecordError(where, f"expected {len(args)} items, got {len(value)}")
        return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))) \
            if args else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(where, f"expected an object, got {type(value).__name__}")
        kt, vt = args or (str, Any)
        if kt is str and vt is float:  # the stage maps: the common case, kept fast
            if any(type(k) is not str for k in value):
                raise RecordError(where, "expected text keys")
            return {k: _number(v, lambda k=k: f"{where}.{k}") for k, v in value.items()}
        return {_check(k, kt, where): _check(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(where, f"expected an integer, got {value!r}"[:120])
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise RecordError(where, f"expected {_type_name(tp)}, got {value!r}"[:120])
        return value
    if tp in (dict, list):
        if not isinstance(value, tp):
            raise RecordError(where, f"expected {_type_name(tp)}, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a bug in this module, not in the run


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


@functools.cache
def _schema(cls) -> tuple[dict, tuple]:
    """A record class's resolved annotations and fields, computed once (get_type_hints is slow)."""
    return typing.get_type_hints(cls), dataclasses.fields(cls)


class Record:
    """Mixin: ``to_dict`` gives plain JSON data; ``from_dict`` validates and builds (unknown keys are kept
    out of the record: newer minor fields never break an older reader of the same schema version)."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = ""):
        if not isinstance(d, dict):
            raise RecordError(where or cls.__name__, f"expected an object, got {type(d).__name__}")
        hints, fields = _schema(cls)
        kw = {}
        for f in fields:
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in d:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise RecordError(path, "missing")
            kw[f.name] = _check(d[f.name], hints[f.name], path)
        return cls(**kw)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
