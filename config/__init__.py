"""One typed configuration: embedded defaults ← TOML file ← RADVLM_* environment overrides."""

from config.loader import ConfigError, load_settings, load_typed_config
from config.settings import Settings

__all__ = ["ConfigError", "Settings", "load_settings", "load_typed_config"]
