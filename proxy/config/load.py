"""Reading `model_aliases.yaml` into a `YamlConfig`: every section, one set of readers.

Every validation error names the file and the key path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from proxy.config.env import read_var
from proxy.config.model import (
    ANY_SCENE,
    DEFAULT_CLAMP_MIN_TOKENS,
    DEFAULT_ENCODING,
    DEFAULT_ENDPOINTS,
    DEFAULT_RESERVE_OUTPUT_TOKENS,
    ENDPOINT_NAMES,
    SCENE_RE,
    SUPPORTED_ENCODINGS,
    Alias,
    AuthConfig,
    AuthMode,
    DisconnectPolicy,
    EventsConfig,
    FailPolicy,
    GuardConfig,
    GuardMode,
    OnDisconnect,
    OnInsufficient,
    PriceRule,
    Provider,
    RoutingPolicy,
    ServerConfig,
    ServiceKey,
    Timeouts,
    YamlConfig,
)
from proxy.config.price_rules import parse_price_rules
from proxy.config.readers import Section
from proxy.config.request_params import AUDIO, NEUTRAL_PARAMS, SERVICE_TIER, WEB_SEARCH
from proxy.config.store import parse_store
from proxy.config.traffic import (
    check_fallbacks,
    parse_fallbacks,
    parse_limits,
    parse_routing,
    parse_targets,
)
from proxy.config.yaml_loader import load_yaml
from proxy.errors import ConfigError

_E = TypeVar("_E", bound=StrEnum)

_TOP_LEVEL = (
    "providers",
    "price_rules",
    "aliases",
    "auth",
    "guard",
    "events",
    "server",
    "routing",
    "limits",
    "packages",
    "rewards",
)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> YamlConfig:
    """Read and validate the YAML file; raise ConfigError("<file>: <key path>: <problem>").

    `env` resolves the providers' `api_key_env` names (default: the process environment).
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from exc
    except ConfigError as exc:  # a duplicate key: the message has line and key path
        raise ConfigError(f"{name}: {exc}") from exc
    try:
        return parse_config(raw, name, env)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def parse_config(raw: Any, name: str, env: Mapping[str, str] | None = None) -> YamlConfig:
    lookup: Callable[[str], str | None] = read_var if env is None else env.get
    root = Section(raw, "", _TOP_LEVEL)
    providers_raw = root.section("providers", required=True)
    providers = {
        pname: _provider(pname, praw, providers_raw.where(pname), lookup)
        for pname, praw in providers_raw.entries("provider names")
    }
    if not providers:
        raise ConfigError("providers: at least one provider is required")
    price_rules = parse_price_rules(root.get("price_rules"))
    aliases_raw = root.section("aliases", required=True)
    if not len(aliases_raw):
        raise ConfigError("aliases: at least one alias is required")
    routing = parse_routing(root.get("routing"), "routing", RoutingPolicy())
    aliases = {
        aname: _alias(aname, araw, aliases_raw.where(aname), providers, price_rules, routing)
        for aname, araw in aliases_raw.entries("alias names")
    }
    check_fallbacks(aliases)
    return YamlConfig(
        path=name,
        providers=providers,
        price_rules=price_rules,
        aliases=aliases,
        auth=parse_auth(root.get("auth")),
        guard=parse_guard(root.get("guard")),
        events=_events(root.get("events")),
        server=_server(root.get("server")),
        routing=routing,
        limits=parse_limits(root.get("limits")),
        store=parse_store(root.get("packages"), root.get("rewards")),
    )


def _provider(name: str, raw: Any, path: str, lookup: Callable[[str], str | None]) -> Provider:
    m = Section(
        raw,
        path,
        (
            "base_url",
            "api_key_env",
            "stream_usage",
            "responses",
            "timeouts",
            "max_connections",
            *_DISCONNECT,
        ),
        required=True,
    )
    base_url = m.text("base_url", required=True)
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{path}.base_url: must start with http:// or https://, got {base_url!r}")
    key_env = m.text("api_key_env") or None
    t = m.section("timeouts", ("connect", "first_byte", "idle", "total"))
    d = Timeouts()
    return Provider(
        name=name,
        base_url=base_url.rstrip("/"),
        api_key_env=key_env,
        api_key=(lookup(key_env) or None) if key_env else None,
        stream_usage=m.flag("stream_usage", True),
        timeouts=Timeouts(
            connect=t.number("connect", d.connect, positive=True),
            first_byte=t.number("first_byte", d.first_byte, positive=True),
            idle=t.number("idle", d.idle, positive=True),
            total=t.number("total", d.total, positive=True),
        ),
        max_connections=m.count("max_connections", 256),
        disconnect=_disconnect(m, DisconnectPolicy()),
        responses=m.flag("responses", True),
    )


_DISCONNECT = ("on_client_disconnect", "drain_timeout_s", "drain_max_bytes")


def _disconnect(m: Section, base: DisconnectPolicy) -> DisconnectPolicy:
    """A provider's policy, or an alias's overrides of its provider's (`base`)."""
    raw = m.get("on_client_disconnect", base.action.value)
    try:
        action = OnDisconnect(raw)
    except ValueError:
        raise ConfigError(
            f"{m.where('on_client_disconnect')}: must be 'abort' or 'drain', got {raw!r}"
        ) from None
    return DisconnectPolicy(
        action=action,
        drain_timeout_s=m.number("drain_timeout_s", base.drain_timeout_s, positive=True),
        drain_max_bytes=m.count("drain_max_bytes", base.drain_max_bytes),
    )


def _alias(
    name: str,
    raw: Any,
    path: str,
    providers: Mapping[str, Provider],
    rules: Mapping[str, PriceRule],
    routing: RoutingPolicy,
) -> Alias:
    m = Section(
        raw,
        path,
        (
            "provider",
            "model",
            "price_rule",
            "free",
            "tokenizer",
            "allow_params",
            "cost_in_band",
            "endpoints",
            "targets",
            "fallbacks",
            "routing",
            "reserve_output_tokens",
            "on_insufficient",
            "clamp_min_tokens",
            *_DISCONNECT,
        ),
        required=True,
    )
    rule: PriceRule | None = None
    if m.flag("free", False):
        if m.get("price_rule") is not None:
            raise ConfigError(f"{path}: give either price_rule or free: true, not both")
    else:
        rid = m.text("price_rule")
        every_target_priced = "targets" in m and all(
            isinstance(t, Mapping) and t.get("price_rule") for t in m.items_list("targets")
        )
        if not rid and not every_target_priced:
            raise ConfigError(
                f"{path}.price_rule: required (or say free: true) so no call is accidentally free"
            )
        if rid and rid not in rules:
            raise ConfigError(f"{path}.price_rule: unknown price rule {rid!r}")
        rule = rules[rid] if rid else None
    tokenizer = m.text("tokenizer", DEFAULT_ENCODING)
    if tokenizer not in SUPPORTED_ENCODINGS:
        raise ConfigError(
            f"{path}.tokenizer: unknown tokenizer {tokenizer!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_ENCODINGS))})"
        )
    targets = parse_targets(m, path, providers, rules, rule)
    allow = frozenset[str]()
    for target in targets:  # each serving target's rule prices what the alias accepts
        allow = _allow_params(m, target.price_rule)
    primary = targets[0]
    provider = primary.provider
    return Alias(
        name=name,
        provider=provider,
        model=primary.model,
        price_rule=primary.price_rule,
        tokenizer=tokenizer,
        allow_params=allow,
        cost_in_band=m.flag("cost_in_band", False),
        disconnect=_disconnect(m, provider.disconnect),
        endpoints=_endpoints(m),
        targets=targets,
        fallbacks=parse_fallbacks(m, path),
        routing=parse_routing(m.get("routing"), m.where("routing"), routing),
        reserve_output_tokens=m.count("reserve_output_tokens", DEFAULT_RESERVE_OUTPUT_TOKENS),
        on_insufficient=_choice(m, "on_insufficient", OnInsufficient, OnInsufficient.REFUSE),
        clamp_min_tokens=m.count("clamp_min_tokens", DEFAULT_CLAMP_MIN_TOKENS),
    )


def _endpoints(m: Section) -> frozenset[str]:
    """`endpoints: [chat, responses, embeddings, completions]` (default `[chat]`)."""
    if m.get("endpoints") is None:
        return DEFAULT_ENDPOINTS
    names: set[str] = set()
    for i, name in enumerate(m.items_list("endpoints")):
        if name not in ENDPOINT_NAMES:
            raise ConfigError(
                f"{m.where('endpoints')}[{i}]: unknown endpoint {name!r} "
                f"(known: {', '.join(ENDPOINT_NAMES)})"
            )
        names.add(ENDPOINT_NAMES[name])
    if not names:
        raise ConfigError(f"{m.where('endpoints')}: name at least one endpoint")
    return frozenset(names)


def _choice(m: Section, key: str, kind: type[_E], default: _E) -> _E:
    """One of an enum's values, with the one wording of the error."""
    raw = m.get(key, default.value)
    try:
        return kind(raw)
    except ValueError:
        words = " or ".join(repr(v.value) for v in kind)
        raise ConfigError(f"{m.where(key)}: must be {words}, got {raw!r}") from None


def _allow_params(m: Section, rule: PriceRule | None) -> frozenset[str]:
    """`allow_params`, each one priced by the alias's rule (every version of it)."""
    allowed: set[str] = set()
    for i, name in enumerate(m.items_list("allow_params")):
        where = f"{m.where('allow_params')}[{i}]"
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: must be a request field name, got {name!r}")
        name = name.strip()
        if name in NEUTRAL_PARAMS:
            raise ConfigError(f"{where}: {name!r} is always accepted; do not list it")
        if name == "modalities":
            raise ConfigError(f"{where}: 'modalities' is covered by 'audio'; list 'audio'")
        allowed.add(name)
    if rule is None:
        return frozenset(allowed)  # free: nothing to price
    for name, what in (
        (SERVICE_TIER, "service_tiers"),
        (AUDIO, "audio_input and audio_output"),
        (WEB_SEARCH, "a request_fee above 0"),
    ):
        # A version that does not price it refuses such requests while in force
        # (proxy.billing.price_params); one that never does is a mistake here.
        if name in allowed and not any(s.prices(name) for s in rule.schedules):
            raise ConfigError(
                f"{m.where('allow_params')}: {name!r} needs {what} in price rule "
                f"{rule.id!r}, so it is never billed at the plain rate"
            )
    return frozenset(allowed)


# -- auth, guard, events, server --------------------------------------------------


def parse_auth(raw: Any, path: str = "auth") -> AuthConfig:
    d = AuthConfig()
    m = Section(raw, path, AuthConfig.__dataclass_fields__)
    mode_raw = m.get("mode", AuthMode.KEYS.value)
    try:
        mode = AuthMode(mode_raw)
    except ValueError:
        raise ConfigError(f"{path}.mode: must be 'keys' or 'none', got {mode_raw!r}") from None
    return AuthConfig(
        mode=mode,
        service_keys=_service_keys(m, "service_keys"),
        user_key_cache_ttl_s=m.number("user_key_cache_ttl_s", d.user_key_cache_ttl_s),
        user_key_negative_ttl_s=m.number("user_key_negative_ttl_s", d.user_key_negative_ttl_s),
        user_key_cache_size=m.count("user_key_cache_size", d.user_key_cache_size, positive=False),
        redis_timeout_s=m.number("redis_timeout_s", d.redis_timeout_s, positive=True),
    )


def _service_keys(auth: Section, key: str) -> tuple[ServiceKey, ...]:
    keys: list[ServiceKey] = []
    for i, entry in enumerate(auth.items_list(key)):
        where = f"{auth.where(key)}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a mapping with name, sha256, scenes")
        m = Section(entry, where, ("name", "sha256", "scenes", "may_skip_charge"))
        name = m.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name: must be a non-empty string, got {name!r}")
        digest = m.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            # The value is a hash, not a key, so echoing it back is harmless.
            raise ConfigError(f"{where}.sha256: must be 64 hex characters, got {digest!r}")
        scenes = m.get("scenes")
        if not isinstance(scenes, list) or not scenes:
            raise ConfigError(f"{where}.scenes: must be a non-empty list of scenes or ['*']")
        parsed: set[str] = set()
        for j, scene in enumerate(scenes):
            text = scene.strip().lower() if isinstance(scene, str) else None
            if text is None or (text != ANY_SCENE and not SCENE_RE.fullmatch(text)):
                raise ConfigError(f"{where}.scenes[{j}]: not a valid scene: {scene!r}")
            parsed.add(text)
        service = ServiceKey(
            name.strip(),
            bytes.fromhex(digest),
            frozenset(parsed),
            may_skip_charge=m.flag("may_skip_charge", False),
        )
        for other in keys:
            if other.name == service.name:
                raise ConfigError(f"{where}.name: duplicate service key name {service.name!r}")
            if other.sha256 == service.sha256:
                raise ConfigError(f"{where}.sha256: same key as {other.name!r}")
        keys.append(service)
    return tuple(keys)


def parse_guard(raw: Any, path: str = "guard") -> GuardConfig:
    d = GuardConfig()
    m = Section(raw, path, GuardConfig.__dataclass_fields__)
    prefix = m.get("prefix", d.prefix)
    if not isinstance(prefix, str) or any(c.isspace() for c in prefix):
        raise ConfigError(f"{path}.prefix: must be a string without spaces, got {prefix!r}")
    max_entries = m.count("local_cache_max_entries", d.local_cache_max_entries)
    if max_entries < 2:
        raise ConfigError(
            f"{path}.local_cache_max_entries: must be at least 2 (each user takes two entries)"
        )
    return GuardConfig(
        prefix=prefix,
        budget_ms=m.number("budget_ms", d.budget_ms, positive=True),
        blocked_ttl_s=m.count("blocked_ttl_s", d.blocked_ttl_s),
        snapshot_ttl_s=m.count("snapshot_ttl_s", d.snapshot_ttl_s),
        provider_timeout_s=m.number("provider_timeout_s", d.provider_timeout_s, positive=True),
        fail_open_log_interval_s=m.number("fail_open_log_interval_s", d.fail_open_log_interval_s),
        coalesce=m.flag("coalesce", d.coalesce),
        local_cache=m.flag("local_cache", d.local_cache),
        local_cache_max_age_s=m.number(
            "local_cache_max_age_s", d.local_cache_max_age_s, positive=True
        ),
        local_cache_max_entries=max_entries,
        mode=_choice(m, "mode", GuardMode, d.mode),
        hold_ttl_s=m.number("hold_ttl_s", d.hold_ttl_s, positive=True),
        fail=_choice(m, "fail", FailPolicy, d.fail),
    )


def _events(raw: Any, path: str = "events") -> EventsConfig:
    d = EventsConfig()
    m = Section(raw, path, ("topic", "partitions", "replication_factor"))
    return EventsConfig(
        topic=m.text("topic", d.topic, required=True),
        partitions=m.count("partitions", d.partitions),
        replication_factor=m.count("replication_factor", d.replication_factor),
    )


def _server(raw: Any, path: str = "server") -> ServerConfig:
    d = ServerConfig()
    m = Section(raw, path, ("max_body_bytes", "shutdown_grace_s", "outbox_drain_s"))
    return ServerConfig(
        max_body_bytes=m.count("max_body_bytes", d.max_body_bytes),
        shutdown_grace_s=m.number("shutdown_grace_s", d.shutdown_grace_s, positive=True),
        outbox_drain_s=m.number("outbox_drain_s", d.outbox_drain_s, positive=True),
    )
