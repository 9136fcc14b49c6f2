"""Configuration: one YAML file, validated whole into typed models, loaded once.

Nothing outside this package parses YAML; everything else receives models.
"""

from config.errors import MqiError
from config.loader import (
    DEFAULT_PATH,
    DEMO_PATH,
    ENV_VAR,
    ConfigError,
    config_path,
    get_config,
    load_config,
)
from config.models import MqiConfig

__all__ = [
    "DEFAULT_PATH",
    "DEMO_PATH",
    "ENV_VAR",
    "ConfigError",
    "MqiConfig",
    "MqiError",
    "config_path",
    "get_config",
    "load_config",
]
