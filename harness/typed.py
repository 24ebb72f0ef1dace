"""Typed, immutable records with validated ``from_dict`` (the mixin behind ``harness.record``).

``Record.from_dict`` checks every field against its annotation: presence (fields with defaults may
be absent), type (int, float, str, bool, Optional/union, tuple, dict, nested records), and that
values of fields whose name carries a unit (``_ms``, ``_us``, ``_s``, ``_bytes``, ``_gbps``, ``_pct``,
``_mhz``) are finite and >= 0, and the bounds of their intervals (``_ci``) finite or NaN (an interval no
resample could fill is NaN). Errors are ``RecordError`` naming the dotted field path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Union

UNIT_SUFFIXES = ("_ms", "_us", "_s", "_bytes", "_gbps", "_pct", "_mhz")
INF = math.inf


def _has_unit(where: str, suffixes: tuple[str, ...] = UNIT_SUFFIXES) -> bool:
    return any(part.split("[")[0].endswith(suffixes) for part in where.split("."))


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
    if math.isinf(value) and _has_unit(where(), (*UNIT_SUFFIXES, "_ci")):  # other ratios may be inf (a 0 mean)
        raise RecordError(where(), f"a measured value or its interval must be finite, got {value}")
    if (math.isnan(value) or value < 0) and _has_unit(where()):
        raise RecordError(where(), f"a duration, size or rate must be >= 0, got {value}")
    return value


def _num_check(value, where):
    if type(value) is float and 0 <= value < INF:  # the common case: no NaN (NaN >= 0 is False), no negative
        return value
    return _number(value, lambda: where)


def _clean_floats(values) -> bool:
    """All floats, none negative, infinite or NaN (the stage maps: most of a footer's numbers)."""
    for v in values:  # noqa: SIM110 (a plain loop: faster than all() over a generator, and this is hot)
        if type(v) is not float or not 0 <= v < INF:
            return False
    return True


def _all_of(tp) -> Callable[[Any], bool]:
    def clean(values) -> bool:
        for v in values:  # noqa: SIM110 (as above)
            if type(v) is not tp:
                return False
        return True
    return clean


def _pass(value, where):
    return value


@functools.cache
def _checker(tp) -> Callable[[Any, str], Any]:
    """A function (value, where) -> value converted to annotation ``tp``, built once per annotation (no
    per-value dispatch on the annotation)."""
    origin, args, is_record = _parts(tp)
    if tp is float:
        return _num_check
    if tp is Any:
        return _pass
    if origin in (Union, types.UnionType):
        alts = [_checker(a) for a in args if a is not type(None)]
        nullable = type(None) in args

        def union(value, where):
            if value is None and nullable:
                return None
            errors = []
            for check in alts:
                try:
                    return check(value, where)
                except RecordError as e:
                    errors.append(e)
            raise errors[0]
        return union
    if is_record:
        return tp.from_dict  # (d, where): refuses a non-object itself
    if origin is tuple:
        return _tuple_checker(args)
    if origin is dict:
        return _dict_checker(*(args or (str, Any)))
    if tp is int:
        def integer(value, where):
            if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
                raise RecordError(where, f"expected an integer, got {value!r}"[:120])
            return value
        return integer
    if tp in (str, bool, dict, list):
        def exact(value, where):
            if not isinstance(value, tp):
                shown = repr(value) if tp in (str, bool) else type(value).__name__
                raise RecordError(where, f"expected {_type_name(tp)}, got {shown}"[:120])
            return value
        return exact
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in this module, not in the run


def _tuple_checker(args) -> Callable[[Any, str], Any]:
    items = [_checker(a) for a in args if a is not Ellipsis]
    all_floats = items == [_num_check] * len(items)

    def tuple_(value, where):
        if not isinstance(value, (list, tuple)):
            raise RecordError(where, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            check = items[0]
            return tuple(check(v, f"{where}[{i}]") for i, v in enumerate(value))
        if not args:
            return tuple(value)
        if len(items) != len(value):
            raise RecordError(where, f"expected {len(items)} items, got {len(value)}")
        if all_floats and _clean_floats(value):
            return tuple(value)  # an interval of two clean floats: the common case
        return tuple(check(v, f"{where}[{i}]") for i, (v, check) in enumerate(zip(value, items, strict=True)))
    return tuple_


def _dict_checker(kt, vt) -> Callable[[Any, str], Any]:
    kcheck, vcheck = _checker(kt), _checker(vt)
    clean = _clean_floats if vt is float else _all_of(vt) if vt in (int, str) else None

    def dict_(value, where):
        if not isinstance(value, dict):
            raise RecordError(where, f"expected an object, got {type(value).__name__}")
        if kt is str and not set(map(type, value)) <= {str}:
            raise RecordError(where, "expected text keys")
        if clean is not None and clean(value.values()):
            return dict(value)  # the stage maps, units and counts: the common cases, kept fast
        return {kcheck(k, where): vcheck(v, f"{where}.{k}") for k, v in value.items()}
    return dict_


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


_NO_DEFAULT = object()
_INLINE = {  # annotation -> the test that passes a clean value without a call (else its checker decides)
    float: "type(v) is float and 0 <= v < INF", int: "type(v) is int", str: "type(v) is str", bool: "type(v) is bool",
    float | None: "v is None or (type(v) is float and 0 <= v < INF)", int | None: "v is None or type(v) is int",
    str | None: "v is None or type(v) is str"}


@functools.cache
def _from_dict(cls) -> Callable[[dict, str], Any]:
    """A record class's validating constructor, generated once from its annotations: one straight-line
    block per field, clean scalars tested inline, the field path built only for a nested value or an
    error. The frozen dataclass ``__init__`` (one ``object.__setattr__`` per field) is skipped: every
    field is set here and no record has a ``__post_init__``."""
    hints = typing.get_type_hints(cls)
    ns: dict[str, Any] = {"RecordError": RecordError, "new": object.__new__, "cls": cls, "INF": INF}
    body = ["def from_dict(d, where):",
            "    if not isinstance(d, dict):",
            f"        raise RecordError(where or {cls.__name__!r}, f'expected an object, got {{type(d).__name__}}')",
            "    p = where + '.' if where else ''",
            "    rec = new(cls)",
            "    kw = rec.__dict__"]
    for i, f in enumerate(dataclasses.fields(cls)):
        ns[f"c{i}"], test = _checker(hints[f.name]), _INLINE.get(hints[f.name])
        body += [f"    if {f.name!r} in d:", f"        v = d[{f.name!r}]",
                 f"        kw[{f.name!r}] = v if {test} else c{i}(v, p + {f.name!r})" if test else
                 f"        kw[{f.name!r}] = c{i}(v, p + {f.name!r})"]
        if f.default is not dataclasses.MISSING:
            ns[f"d{i}"] = f.default
            body += [f"    else:\n        kw[{f.name!r}] = d{i}"]
        elif f.default_factory is not dataclasses.MISSING:
            ns[f"d{i}"] = f.default_factory
            body += [f"    else:\n        kw[{f.name!r}] = d{i}()"]
        else:
            body += [f"    else:\n        raise RecordError(p + {f.name!r}, 'missing')"]
    exec("\n".join([*body, "    return rec"]), ns)  # noqa: S102 (code built above from the class's own fields)
    return ns["from_dict"]


class Record:
    """Mixin: ``to_dict`` gives plain JSON data; ``from_dict`` validates and builds (unknown keys are kept
    out of the record: newer minor fields never break an older reader of the same schema version)."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = ""):
        return _from_dict(cls)(d, where)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
