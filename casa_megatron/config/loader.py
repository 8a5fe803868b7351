"""defaults < YAML < ``key=value`` overrides, into typed dataclasses (lingua-style).

Values are coerced by the declared field types (``coerce.py``) and range-checked (``limits.py``)
before the dataclasses' own ``validate()``; a missing or unparsable file is a one-line
``ConfigError`` naming it, not a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence, Type, TypeVar

import yaml

from casa_megatron.config.coerce import from_dict
from casa_megatron.config.errors import ConfigError
from casa_megatron.config.limits import check_limits
from casa_megatron.config.pretrained import apply_pretrained_architecture
from casa_megatron.runtime.atomic import atomic_write_text

T = TypeVar("T")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _parse_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}={text!r}: not a valid YAML value ({_yaml_problem(exc)})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}".replace("\n", " ")


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; ConfigError (one line) if missing, unreadable or not a mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields, not a {type(loaded).__name__}")
    return loaded


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(key, raw)
    return data


def load_config(cls: Type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    data: dict = to_dict(cls())
    loaded: dict = {}
    if yaml_path is not None:
        loaded = read_yaml(yaml_path)
        data = _deep_merge(data, loaded)
    data = apply_overrides(data, overrides)
    # checkpoint.pretrained: the architecture comes from the imported checkpoint (config/pretrained.py)
    data = apply_pretrained_architecture(data, apply_overrides(copy.deepcopy(loaded), overrides))
    config = from_dict(cls, data)
    check_limits(config)
    if hasattr(config, "validate"):
        config.validate()
    return config


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename) so a crash never leaves half a file."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def load_config_dict(cls: Type[T], explicit: dict) -> T:
    """Like :func:`load_config` from an already-merged explicit dict (YAML + overrides)."""
    config = from_dict(cls, _deep_merge(to_dict(cls()), explicit))
    check_limits(config)
    if hasattr(config, "validate"):
        config.validate()
    return config
