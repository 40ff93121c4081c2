"""Configuration: `model_aliases.yaml` (what is served: `YamlConfig`) and the
environment (where things are, secrets: `EnvSettings`), each read once into
frozen values. The only package that reads either."""

from proxy.config.env import EnvSettings
from proxy.config.load import load_config, parse_config
from proxy.config.model import (
    Alias,
    AuthConfig,
    AuthMode,
    EventsConfig,
    GuardConfig,
    PriceRule,
    Provider,
    ServerConfig,
    ServiceKey,
    Timeouts,
    YamlConfig,
)
from proxy.config.price_rules import parse_price_rules

__all__ = [
    "Alias",
    "AuthConfig",
    "AuthMode",
    "EnvSettings",
    "EventsConfig",
    "GuardConfig",
    "PriceRule",
    "Provider",
    "ServerConfig",
    "ServiceKey",
    "Timeouts",
    "YamlConfig",
    "load_config",
    "parse_config",
    "parse_price_rules",
]
