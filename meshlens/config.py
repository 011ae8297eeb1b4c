"""Resolve a settings dataclass from flags, MESHLENS_* environment and a YAML file, in that order."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

from meshlens.yamlfile import read_yaml

T = TypeVar("T")
ENV_PREFIX = "MESHLENS_"


def data_home() -> Path:
    """Where meshlens keeps what it stores for a user: $XDG_DATA_HOME/meshlens, else ~/.local/share/meshlens."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "meshlens"


class ConfigError(ValueError):
    """A setting cannot be used; the message names the setting and where it came from."""


def resolve(cls: type[T], flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
            config_file: str | None = None) -> T:
    """Build `cls`: a flag that was given wins, then MESHLENS_<NAME>, then the file, then the default."""
    env = os.environ if env is None else env
    file_values = _read_file(config_file, cls) if config_file else {}
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if flags.get(f.name) is not None:
            origin, value = f"--{f.name.replace('_', '-')}", flags[f.name]
        elif ENV_PREFIX + f.name.upper() in env:
            origin = ENV_PREFIX + f.name.upper()
            value = env[origin]
        elif f.name in file_values:
            origin, value = f"{config_file}: {f.name}", file_values[f.name]
        else:
            continue
        values[f.name] = _convert(f, value, origin)
        origins[f.name] = origin
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate:
        try:
            validate()
        except ValueError as e:
            # validate() starts with the setting's name ("port must be ..."): add where it came from
            where = origins.get(str(e).split(" ", 1)[0])
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return obj


def _read_file(path: str, cls: type) -> dict[str, Any]:
    doc = read_yaml(path, "config file", ConfigError)
    if doc is None:  # empty, or only comments
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value")
    known = {f.name for f in dataclasses.fields(cls)}
    doc = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    return doc


def _convert(f: dataclasses.Field, value: Any, origin: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if value is None:  # `key:` with nothing after it in YAML
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).replace("_", ""), 0) if isinstance(value, str) else int(value)
        if kind == "float":
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: expected {kind}, got {value!r}") from None
    return value
