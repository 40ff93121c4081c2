"""Reading `routing:` (global and per alias), an alias's `targets`, and `limits:`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from proxy.config.model import (
    RETRY_ON,
    LimitsConfig,
    LimitSet,
    PriceRule,
    Provider,
    RoutingPolicy,
    Target,
)
from proxy.config.readers import Section
from proxy.errors import ConfigError

ROUTING_KEYS = tuple(RoutingPolicy.__dataclass_fields__)
TARGET_KEYS = ("provider", "model", "weight", "priority", "price_rule", "max_concurrency")


def parse_routing(raw: Any, path: str, base: RoutingPolicy) -> RoutingPolicy:
    """`routing:` over `base` (the defaults, or the global section for an alias)."""
    m = Section(raw, path, ROUTING_KEYS)
    retries: int | None = base.retries
    if m.get("retries") is not None:
        retries = m.count("retries", positive=False)
    retry_on = base.retry_on
    if "retry_on" in m:
        names: set[str] = set()
        for i, item in enumerate(m.items_list("retry_on")):
            word = str(item).strip().lower()
            if word not in RETRY_ON:
                raise ConfigError(
                    f"{m.where('retry_on')}[{i}]: must be one of {', '.join(RETRY_ON)}, "
                    f"got {item!r} (no 4xx other than 429 is ever retried)"
                )
            names.add(word)
        retry_on = frozenset(names)
    deadline = base.deadline_s
    if m.get("deadline_s") is not None:
        deadline = m.number("deadline_s", positive=True)
    policy = RoutingPolicy(
        retries=retries,
        retry_on=retry_on,
        backoff_base_ms=m.number("backoff_base_ms", base.backoff_base_ms),
        backoff_max_ms=m.number("backoff_max_ms", base.backoff_max_ms),
        deadline_s=deadline,
        allowed_fails=m.count("allowed_fails", base.allowed_fails, positive=False),
        window_s=m.number("window_s", base.window_s, positive=True),
        cooldown_s=m.number("cooldown_s", base.cooldown_s),
        max_wait_ms=m.number("max_wait_ms", base.max_wait_ms),
    )
    if policy.backoff_max_ms < policy.backoff_base_ms:
        raise ConfigError(f"{path}.backoff_max_ms: must be at least backoff_base_ms")
    return policy


def parse_targets(
    m: Section,
    path: str,
    providers: Mapping[str, Provider],
    rules: Mapping[str, PriceRule],
    alias_rule: PriceRule | None,
) -> tuple[Target, ...]:
    """An alias's `targets` list; without one, its `provider`/`model` (shorthand)."""
    if "targets" not in m:
        return (Target(_provider(m, path, providers), m.text("model", required=True), alias_rule),)
    for shorthand in ("provider", "model"):
        if shorthand in m:
            raise ConfigError(f"{path}.{shorthand}: give either targets or provider/model")
    items = m.items_list("targets")
    if not items:
        raise ConfigError(f"{path}.targets: at least one target is required")
    targets: list[Target] = []
    for i, raw in enumerate(items):
        where = f"{path}.targets[{i}]"
        t = Section(raw, where, TARGET_KEYS, required=True)
        rule = alias_rule
        rid = t.text("price_rule")
        if rid:
            if rid not in rules:
                raise ConfigError(f"{where}.price_rule: unknown price rule {rid!r}")
            rule = rules[rid]
        elif alias_rule is None and m.get("free") is not True:
            raise ConfigError(f"{where}.price_rule: required (the alias has none)")
        limit = None
        if t.get("max_concurrency") is not None:
            limit = t.count("max_concurrency")
        priority = t.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"{where}.priority: must be a whole number, got {priority!r}")
        target = Target(
            provider=_provider(t, where, providers),
            model=t.text("model", required=True),
            price_rule=rule,
            weight=t.number("weight", 1.0, positive=True),
            priority=priority,
            max_concurrency=limit,
        )
        if any(o.key == target.key for o in targets):
            raise ConfigError(f"{where}: duplicate target {target.key!r}")
        targets.append(target)
    # The first of the lowest priority is the alias's primary (its shorthand fields).
    return tuple(sorted(targets, key=lambda x: x.priority))


def _provider(m: Section, path: str, providers: Mapping[str, Provider]) -> Provider:
    name = m.text("provider", required=True)
    if name not in providers:
        raise ConfigError(f"{path}.provider: unknown provider {name!r}")
    return providers[name]


def parse_fallbacks(m: Section, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for i, item in enumerate(m.items_list("fallbacks")):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{path}.fallbacks[{i}]: must be an alias name, got {item!r}")
        names.append(item.strip())
    return tuple(names)


def check_fallbacks(aliases: Mapping[str, Any]) -> None:
    for name, alias in aliases.items():
        for i, other in enumerate(alias.fallbacks):
            where = f"aliases.{name}.fallbacks[{i}]"
            if other == name:
                raise ConfigError(f"{where}: an alias cannot fall back to itself")
            if other not in aliases:
                raise ConfigError(f"{where}: unknown alias {other!r}")


def _limit_set(raw: Any, path: str) -> LimitSet:
    m = Section(raw, path, ("rpm", "tpm", "concurrency"))
    values = {k: (m.count(k) if m.get(k) is not None else None) for k in ("rpm", "tpm")}
    conc = m.count("concurrency") if m.get("concurrency") is not None else None
    return LimitSet(rpm=values["rpm"], tpm=values["tpm"], concurrency=conc)


def parse_limits(raw: Any, path: str = "limits") -> LimitsConfig:
    d = LimitsConfig()
    if raw is None:
        return d
    m = Section(raw, path, [k for k in LimitsConfig.__dataclass_fields__ if k != "enabled"])
    return replace(
        d,
        user=_limit_set(m.get("user"), m.where("user")),
        key=_limit_set(m.get("key"), m.where("key")),
        fail_open=m.flag("fail_open", d.fail_open),
        budget_ms=m.number("budget_ms", d.budget_ms, positive=True),
        slot_ttl_s=m.number("slot_ttl_s", d.slot_ttl_s, positive=True),
        fail_log_interval_s=m.number("fail_log_interval_s", d.fail_log_interval_s),
        enabled=True,
    )
