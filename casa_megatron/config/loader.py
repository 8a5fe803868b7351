"""defaults < YAML < ``key=value`` overrides, into typed dataclasses (lingua-style, ~80 lines)."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, Type, TypeVar

import yaml

from casa_megatron.config.pretrained import apply_pretrained_architecture
from casa_megatron.config.schema import ConfigError

T = TypeVar("T")


def _from_dict(cls: Type[T], data: dict, path: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config keys {[f'{path}{k}' for k in unknown]}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value or {}, f"{path}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(cls: Type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    data: dict = to_dict(cls())
    loaded: dict = {}
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        data = _deep_merge(data, loaded)
    data = apply_overrides(data, overrides)
    # checkpoint.pretrained: the architecture comes from the imported checkpoint (config/pretrained.py)
    data = apply_pretrained_architecture(data, apply_overrides(copy.deepcopy(loaded), overrides))
    config = _from_dict(cls, data)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)


def load_config_dict(cls: Type[T], explicit: dict) -> T:
    """Like :func:`load_config` from an already-merged explicit dict (YAML + overrides)."""
    config = _from_dict(cls, _deep_merge(to_dict(cls()), explicit))
    if hasattr(config, "validate"):
        config.validate()
    return config
