"""Load Settings from embedded defaults, an optional TOML file and RADVLM_* environment variables.

Environment variables name a key path with double underscores:
``RADVLM_MODEL__PATH=/weights`` sets ``[model] path``. Values are parsed as JSON when they
look like JSON (lists, numbers, booleans) and kept as strings otherwise; pydantic then checks
them like file values. Any unknown key or bad value stops start-up with the key's path.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from config.settings import Settings

ENV_PREFIX = "RADVLM_"
ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """The configuration file or an environment override is invalid."""


def _env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _env_overrides(environ: Mapping[str, str], prefix: str) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(prefix) or name == prefix + "CONFIG":
            continue
        path = [part.lower() for part in name[len(prefix):].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key segment")
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another override")
        node[path[-1]] = _env_value(raw)
    return overrides


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def load_settings(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings; ``path`` defaults to $RADVLM_CONFIG when set, else embedded defaults only."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    return load_typed_config(Settings, path, environ)


def load_typed_config(model: type[ModelT], path: Path | str | None = None,
                      environ: Mapping[str, str] | None = None, env_prefix: str = ENV_PREFIX) -> ModelT:
    """Validate ``model`` from its defaults ← a TOML file ← ``{env_prefix}SECTION__KEY`` variables.

    The same rules serve every typed configuration of the project (the node's Settings, the
    training and evaluation job files): unknown keys and bad values raise ConfigError naming
    the key's path.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin = "embedded defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    overrides = _env_overrides(environ, env_prefix)
    if overrides:
        origin += f" + {env_prefix}* environment"
    try:
        return model.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc
