"""Configuration: `model_aliases.yaml` plus environment, read once into frozen values.

Everything that describes *what* the proxy serves (providers, aliases, prices,
auth policy) lives in the YAML file; everything that says *where* infrastructure
is or holds a secret (Redis, Kafka, provider keys, file paths) comes from the
environment, so one YAML file can travel between environments unchanged.
Every validation error names the file and the key path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.auth_config import AuthConfig
from proxy.errors import ConfigError
from proxy.guard import GuardConfig
from proxy.kafka import idempotence_from_env
from proxy.pricing import PriceRule, parse_price_rules
from proxy.tokens import DEFAULT_ENCODING, SUPPORTED_ENCODINGS

DEFAULT_CONFIG_FILE = "model_aliases.yaml"
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_OUTBOX_PATH = "data/outbox.sqlite3"
DEFAULT_SINK_PATH = "data/charge-events.jsonl"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `first_byte` bounds the wait for the response head and first body
    chunk, `idle` the gap between two chunks, `total` the whole exchange."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str  # without trailing slash, e.g. https://api.openai.com/v1
    api_key_env: str | None
    # The secret itself, resolved from `api_key_env` at load time; kept out of repr.
    api_key: str | None = field(repr=False)
    stream_usage: bool = True  # upstream honours stream_options.include_usage
    timeouts: Timeouts = Timeouts()
    max_connections: int = 256  # keep-alive pool bound for this provider

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    provider: Provider
    model: str  # the upstream model name
    price_rule: PriceRule | None  # None only when the alias says `free: true`
    tokenizer: str = DEFAULT_ENCODING

    @property
    def price_rule_id(self) -> str:
        return self.price_rule.id if self.price_rule else "free"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # In-flight requests get this long to finish on SIGTERM before they are cut
    # (and charged for what was relayed).
    shutdown_grace_s: float = 30.0
    # Time the outbox gets on shutdown to hand pending events to Kafka.
    outbox_drain_s: float = 10.0


@dataclass(frozen=True, slots=True)
class EventsConfig:
    topic: str = "credit.charge.requested"
    partitions: int = 3
    replication_factor: int = 1


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    providers: Mapping[str, Provider]
    price_rules: Mapping[str, PriceRule]
    aliases: Mapping[str, Alias]
    auth: AuthConfig
    guard: GuardConfig
    events: EventsConfig
    server: ServerConfig


@dataclass(frozen=True, slots=True)
class Settings:
    """Infrastructure endpoints and paths, from the environment only."""

    redis_url: str | None = None
    kafka_bootstrap: str | None = None
    kafka_idempotent: bool = True
    credit_snapshot_url: str | None = None
    outbox_path: str = DEFAULT_OUTBOX_PATH
    sink_path: str = DEFAULT_SINK_PATH
    log_prompts: bool = False
    # Benchmark switch only (LLM_PROXY_METERING=off): streamed replies are relayed
    # without the meter and charged a nominal 1 token; bench/bench_metering.py
    # measures what metering costs against it.
    metering: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def opt(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(
            redis_url=opt("REDIS_URL"),
            kafka_bootstrap=opt("KAFKA_BOOTSTRAP_SERVERS"),
            kafka_idempotent=idempotence_from_env(env),
            credit_snapshot_url=opt("CREDIT_SNAPSHOT_URL"),
            outbox_path=opt("LLM_PROXY_OUTBOX_PATH") or DEFAULT_OUTBOX_PATH,
            sink_path=opt("LLM_PROXY_SINK_PATH") or DEFAULT_SINK_PATH,
            metering=_env_bool(env.get("LLM_PROXY_METERING", "on")),
        )


def _env_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def config_path_from_env(cli_value: str | None = None) -> str:
    """`--config` wins, then `LLM_PROXY_CONFIG`, then `model_aliases.yaml`."""
    return cli_value or os.environ.get("LLM_PROXY_CONFIG") or DEFAULT_CONFIG_FILE


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file; raise ConfigError("<file>: <key path>: <problem>")."""
    env = os.environ if env is None else env
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from exc
    try:
        return parse_config(raw, name, env)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


_TOP_LEVEL = {"providers", "price_rules", "aliases", "auth", "guard", "events", "server"}


def parse_config(raw: Any, name: str, env: Mapping[str, str]) -> Config:
    root = _mapping(raw, "(top level)")
    _no_unknown(root, _TOP_LEVEL, "")
    providers = {
        pname: _parse_provider(pname, praw, f"providers.{pname}", env)
        for pname, praw in _mapping(root.get("providers"), "providers", required=True).items()
    }
    if not providers:
        raise ConfigError("providers: at least one provider is required")
    price_rules = parse_price_rules(root.get("price_rules") or {}, "price_rules")
    aliases_raw = _mapping(root.get("aliases"), "aliases", required=True)
    if not aliases_raw:
        raise ConfigError("aliases: at least one alias is required")
    aliases = {
        aname: _parse_alias(aname, araw, f"aliases.{aname}", providers, price_rules)
        for aname, araw in aliases_raw.items()
    }
    return Config(
        path=name,
        providers=providers,
        price_rules=price_rules,
        aliases=aliases,
        auth=AuthConfig.from_yaml(root.get("auth"), "auth"),
        guard=GuardConfig.from_yaml(root.get("guard"), "guard"),
        events=_parse_events(root.get("events"), "events"),
        server=_parse_server(root.get("server"), "server"),
    )


def _parse_provider(name: Any, raw: Any, path: str, env: Mapping[str, str]) -> Provider:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: provider names must be non-empty strings")
    m = _mapping(raw, path, required=True)
    _no_unknown(m, {"base_url", "api_key_env", "stream_usage", "timeouts", "max_connections"}, path)
    base_url = _str(m.get("base_url"), f"{path}.base_url", required=True)
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{path}.base_url: must start with http:// or https://, got {base_url!r}")
    key_env = _str(m.get("api_key_env"), f"{path}.api_key_env") or None
    t = _mapping(m.get("timeouts"), f"{path}.timeouts")
    _no_unknown(t, {"connect", "first_byte", "idle", "total"}, f"{path}.timeouts")
    defaults = Timeouts()
    timeouts = Timeouts(
        **{
            k: _positive(t.get(k, getattr(defaults, k)), f"{path}.timeouts.{k}")
            for k in ("connect", "first_byte", "idle", "total")
        }
    )
    return Provider(
        name=name,
        base_url=base_url.rstrip("/"),
        api_key_env=key_env,
        api_key=(env.get(key_env) or None) if key_env else None,
        stream_usage=_bool(m.get("stream_usage", True), f"{path}.stream_usage"),
        timeouts=timeouts,
        max_connections=int(_positive(m.get("max_connections", 256), f"{path}.max_connections")),
    )


def _parse_alias(
    name: Any,
    raw: Any,
    path: str,
    providers: Mapping[str, Provider],
    rules: Mapping[str, PriceRule],
) -> Alias:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: alias names must be non-empty strings")
    m = _mapping(raw, path, required=True)
    _no_unknown(m, {"provider", "model", "price_rule", "free", "tokenizer"}, path)
    pname = _str(m.get("provider"), f"{path}.provider", required=True)
    if pname not in providers:
        raise ConfigError(f"{path}.provider: unknown provider {pname!r}")
    model = _str(m.get("model"), f"{path}.model", required=True)
    free = _bool(m.get("free", False), f"{path}.free")
    rule_id = m.get("price_rule")
    rule: PriceRule | None = None
    if free:
        if rule_id is not None:
            raise ConfigError(f"{path}: give either price_rule or free: true, not both")
    else:
        rid = _str(rule_id, f"{path}.price_rule")
        if not rid:
            raise ConfigError(
                f"{path}.price_rule: required (or say free: true) so no call is accidentally free"
            )
        if rid not in rules:
            raise ConfigError(f"{path}.price_rule: unknown price rule {rid!r}")
        rule = rules[rid]
    tokenizer = _str(m.get("tokenizer", DEFAULT_ENCODING), f"{path}.tokenizer")
    if tokenizer not in SUPPORTED_ENCODINGS:
        raise ConfigError(
            f"{path}.tokenizer: unknown tokenizer {tokenizer!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_ENCODINGS))})"
        )
    return Alias(
        name=name, provider=providers[pname], model=model, price_rule=rule, tokenizer=tokenizer
    )


def _parse_events(raw: Any, path: str) -> EventsConfig:
    m = _mapping(raw, path)
    _no_unknown(m, {"topic", "partitions", "replication_factor"}, path)
    d = EventsConfig()
    return EventsConfig(
        topic=_str(m.get("topic", d.topic), f"{path}.topic", required=True),
        partitions=int(_positive(m.get("partitions", d.partitions), f"{path}.partitions")),
        replication_factor=int(
            _positive(
                m.get("replication_factor", d.replication_factor), f"{path}.replication_factor"
            )
        ),
    )


def _parse_server(raw: Any, path: str) -> ServerConfig:
    m = _mapping(raw, path)
    _no_unknown(m, {"max_body_bytes", "shutdown_grace_s", "outbox_drain_s"}, path)
    d = ServerConfig()
    return ServerConfig(
        max_body_bytes=int(
            _positive(m.get("max_body_bytes", d.max_body_bytes), f"{path}.max_body_bytes")
        ),
        shutdown_grace_s=_positive(
            m.get("shutdown_grace_s", d.shutdown_grace_s), f"{path}.shutdown_grace_s"
        ),
        outbox_drain_s=_positive(
            m.get("outbox_drain_s", d.outbox_drain_s), f"{path}.outbox_drain_s"
        ),
    )


# -- small typed readers; each error names the key path ------------------------------


def _mapping(raw: Any, path: str, *, required: bool = False) -> Mapping[Any, Any]:
    if raw is None:
        if required:
            raise ConfigError(f"{path}: required section is missing")
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: must be a mapping, got {type(raw).__name__}")
    return raw


def _no_unknown(m: Mapping[Any, Any], allowed: set[str], path: str) -> None:
    for key in m:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _str(raw: Any, path: str, *, required: bool = False) -> str:
    if raw is None:
        if required:
            raise ConfigError(f"{path}: required")
        return ""
    if not isinstance(raw, str):
        raise ConfigError(f"{path}: must be a string, got {raw!r}")
    if required and not raw.strip():
        raise ConfigError(f"{path}: must not be empty")
    return raw.strip()


def _bool(raw: Any, path: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(f"{path}: must be true or false, got {raw!r}")
    return raw


def _positive(raw: Any, path: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw > 0:
        raise ConfigError(f"{path}: must be a positive number, got {raw!r}")
    return float(raw)
