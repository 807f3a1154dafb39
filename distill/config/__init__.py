from distill.config.schema import Config, register_configs
from distill.config.validate import ConfigError, validate

__all__ = ["Config", "ConfigError", "register_configs", "validate"]
