"""Turn parsed YAML / ``key=value`` values into the types the dataclass fields declare.

Why: PyYAML implements YAML 1.1, where ``1e-4`` (no dot) is a *string*, so the way most people
write a learning rate used to reach the optimizer as ``'1e-4'`` and die with a ``TypeError`` deep
in megatron. Coercing by the declared field type fixes that class of bug for every field,
including fields added later, and turns every wrong type into a ``ConfigError`` naming the field,
the value and the expected type before any work starts.

Rules (deliberately strict where a silent conversion could change meaning):
  float  <- int, float, or a string ``float()`` parses (``1e-4``, ``2.0E-3``, ``inf``); not bool
  int    <- int, an integral float (``1e4``), or a string that parses as one; not bool
  bool   <- bool only (YAML ``true/false/yes/no/on/off`` already are)
  str    <- str, or an int / float (``experiment: 2024``); not bool
  Optional[X] <- None (``null``, or an empty ``key=``) or an X
  List[X] / Tuple[X, ...] <- a list of X (a bare scalar is refused: write ``[1]``)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Tuple

from casa_megatron.config.errors import ConfigError

_NONE = type(None)


def type_name(hint: Any) -> str:
    """A short human name of a type hint: ``int``, ``float or null``, ``list of int``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        names = [type_name(a) for a in args if a is not _NONE]
        return " or ".join(names) + (" or null" if _NONE in args else "")
    if origin in (list, tuple, typing.List, typing.Tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _fail(path: str, value: Any, hint: Any, why: str = "") -> ConfigError:
    shown = f"{value!r}" if isinstance(value, str) else repr(value)
    return ConfigError(f"{path}={shown}: expected {type_name(hint)}, got {type(value).__name__}"
                       + (f" ({why})" if why else ""))


def _to_float(value: Any, path: str, hint: Any) -> float:
    if isinstance(value, bool):
        raise _fail(path, value, hint)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(path, value, hint)


def _to_int(value: Any, path: str, hint: Any) -> int:
    if isinstance(value, bool):
        raise _fail(path, value, hint)
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                raise _fail(path, value, hint) from None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _fail(path, value, hint, "not a whole number" if isinstance(number, float) else "")


def coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` converted to ``hint`` (see the module rules); ConfigError naming ``path`` if not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and _NONE in args:
            return None
        options = [a for a in args if a is not _NONE]
        errors = []
        for option in options:
            try:
                return coerce(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        raise _fail(path, value, hint) if len(options) > 1 else errors[0]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, path)
    if origin in (list, typing.List, tuple, typing.Tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(path, value, hint, f"write [{value}] for a one-element list")
        item = args[0] if args else Any
        items = [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin in (tuple, typing.Tuple) else items
    if hint is float:
        return _to_float(value, path, hint)
    if hint is int:
        return _to_int(value, path, hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, value, hint, "write true or false")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _fail(path, value, hint)
    return value  # Any, dict and other hints: taken as written


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, coercing every field by its declared type."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of fields, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError("unknown config keys " + ", ".join(_unknown(f"{path}.{k}" if path else str(k), k, fields)
                                                             for k in unknown))
    kwargs = {name: coerce(value, hints[name], f"{path}.{name}" if path else name) for name, value in data.items()}
    return cls(**kwargs)


def _unknown(full: str, key: Any, fields: typing.Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), fields, n=1)
    return repr(full) + (f" (did you mean {close[0]!r}?)" if close else "")


def walk(config: Any, path: str = "") -> typing.Iterator[Tuple[str, Any, Any]]:
    """(dotted path, owning dataclass instance, field name) for every non-dataclass field."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        full = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            yield from walk(value, full)
        else:
            yield full, config, f.name
