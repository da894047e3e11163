"""Reading a config: the defaults, the YAML file after the files its ``base:`` names, then the
``key=value`` overrides; saving the resolved config next to a stage's results and reading it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from semivit.config.scaling import apply_scaling
from semivit.config.schema import Config, to_dict, validate
from semivit.errors import ConfigError


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(name: str, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{near[0]}'?" if near else ""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML reads `labels=true` as a bool; the setting wants the word
            return "true" if value else "false"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    raise ConfigError(f"setting '{where}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown setting '{where}'.{_suggest(key, types_)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"setting '{where}' is a section; set its keys, e.g. {where}.<key>=...")
            _apply(current, value, prefix=f"{where}.")
        else:
            setattr(obj, key, _coerce(value, types_[key], where))


def parse_overrides(pairs: list[str]) -> dict:
    """``["a.b=1", "seed=2"]`` -> ``{"a": {"b": 1}, "seed": 2}``; values are parsed as YAML."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not of the form key=value (e.g. seed=1)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then the ``key=value`` overrides."""
    cfg = Config()
    if path:
        for layer in _read_layers(Path(path)):
            _apply(cfg, layer)
    if overrides:
        _apply(cfg, parse_overrides(overrides))
    _apply(cfg, to_dict(cfg))  # coerce defaults too (5 -> 5.0 for a float), so saved configs compare equal
    apply_scaling(cfg, strict=False)  # global_batch / blr -> this launch's per-process batch, accumulation and lr
    validate(cfg)
    if cfg.smoke:  # every command sees the shrunk settings, and saves them with its results
        from semivit.config.smoke import apply_smoke

        cfg = apply_smoke(cfg)
    return cfg


def _read_layers(path: Path, seen: tuple = ()) -> list[dict]:
    """The file's settings after those of the files its ``base:`` names (paths relative to it),
    so an experiment can combine e.g. a Semi-ViT config with a DiT config and change a few keys."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (the shipped ones are in configs/)")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of settings")
    bases = data.pop("base", None) or []
    layers: list[dict] = []
    for base in [bases] if isinstance(bases, str) else bases:
        layers += _read_layers(path.parent / base, seen + (path.resolve(),))
    return layers + [data]


def save_config(cfg: Config, path: str | Path) -> None:
    from semivit.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_saved_config(path: str | Path) -> Config:
    """Read a ``config.yaml`` saved by a stage (tolerates settings added since it was written)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    cfg = Config()
    _apply_known(cfg, data)
    return cfg


def _apply_known(obj: Any, updates: dict) -> None:
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        if key not in types_:
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _apply_known(current, value)
        else:
            setattr(obj, key, _coerce(value, types_[key], key))
