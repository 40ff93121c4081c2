"""Reading `price_rules` into `PriceRule` values (formula: proxy.billing.pricing).

A rule is a schedule of rates, optionally followed by dated `versions`, each a
complete schedule of its own (nothing is inherited from the undated rates, so a
version reads the same wherever it sits):

    gpt4o:
      input: 2.5                  # credits per 1M tokens; `input` and `output` required
      cached_input: 1.25          # default: input
      cache_write: 3.125          # default: input
      output: 10
      reasoning: 10               # default: output
      audio_input: 40             # default: none (text rate; aliases allowing audio need it)
      audio_output: 80
      multiplier: 1               # default 1
      min_charge: 0               # whole credits, default 0
      request_fee: 0              # credits per request (e.g. web search), default 0
      tiers: [{above_prompt_tokens: 128000, input: 5, output: 20}]   # long context
      service_tiers: {priority: {multiplier: 2}, flex: {input: 1.25, output: 5}}
      versions:
        - {effective_from: "2027-01-01T00:00:00Z", input: 2, output: 8}
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy.config.model import (
    FREE_RULE_ID,
    PriceRule,
    PriceSchedule,
    PromptTier,
    Rates,
    ServiceTier,
)
from proxy.config.readers import Section, type_name
from proxy.errors import ConfigError

_RATE_KEYS = (
    "input",
    "output",
    "cached_input",
    "reasoning",
    "cache_write",
    "audio_input",
    "audio_output",
)
_SCHEDULE_KEYS = (*_RATE_KEYS, "multiplier", "min_charge", "request_fee", "tiers", "service_tiers")
_RULE_KEYS = (*_SCHEDULE_KEYS, "versions")
# The value a request's service_tier may have without a service_tiers entry.
DEFAULT_SERVICE_TIER = "default"


def parse_price_rules(raw: Any, path: str = "price_rules") -> dict[str, PriceRule]:
    """The `price_rules` mapping (rule id -> rates); an absent section means no rules."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: must be a mapping of rule id to prices, got {type_name(raw)}")
    rules: dict[str, PriceRule] = {}
    for rule_id, body in Section(raw, path).entries("rule id"):
        if rule_id == FREE_RULE_ID:
            # Events carry price_rule="free" for free aliases; a real rule with that
            # name would make the ledger unable to tell the two apart.
            raise ConfigError(
                f"{path}.{rule_id}: the id '{FREE_RULE_ID}' is reserved for aliases "
                "marked free: true"
            )
        where = f"{path}.{rule_id}"
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: must be a mapping of prices, got {type_name(body)}")
        # Typo protection: "ouput: 10" must not silently fall back to a default.
        m = Section(body, where, _RULE_KEYS)
        schedules = [_schedule(m, None)]
        for i, entry in enumerate(m.items_list("versions")):
            vm = Section(entry, f"{where}.versions[{i}]", ("effective_from", *_SCHEDULE_KEYS))
            version = _schedule(vm, _instant(vm, "effective_from"))
            if i > 0 and version.effective_from_ms <= schedules[-1].effective_from_ms:
                raise ConfigError(
                    f"{vm.where('effective_from')}: versions must be in ascending "
                    f"effective_from order (after {schedules[-1].effective_from})"
                )
            schedules.append(version)
        rules[rule_id] = PriceRule(id=rule_id, schedules=tuple(schedules))
    return rules


def _rates(m: Section, inherit_audio: Rates | None = None) -> Rates:
    input_rate = m.decimal("input")
    output_rate = m.decimal("output")
    return Rates(
        input=input_rate,
        output=output_rate,
        cached_input=m.decimal("cached_input", input_rate),
        reasoning=m.decimal("reasoning", output_rate),
        cache_write=m.decimal("cache_write", input_rate),
        audio_input=_optional_rate(m, "audio_input", inherit_audio, "audio_input"),
        audio_output=_optional_rate(m, "audio_output", inherit_audio, "audio_output"),
    )


def _optional_rate(m: Section, key: str, inherit: Rates | None, name: str) -> Decimal | None:
    if key in m:
        return m.decimal(key)
    return getattr(inherit, name) if inherit is not None else None


def _schedule(m: Section, effective: tuple[str, int] | None) -> PriceSchedule:
    rates = _rates(m)
    tiers: list[PromptTier] = []
    for i, entry in enumerate(m.items_list("tiers")):
        tm = Section(entry, f"{m.where('tiers')}[{i}]", ("above_prompt_tokens", *_RATE_KEYS))
        above = tm.count("above_prompt_tokens")
        if tiers and above <= tiers[-1].above_prompt_tokens:
            raise ConfigError(
                f"{tm.where('above_prompt_tokens')}: tiers must be in ascending order "
                f"(after {tiers[-1].above_prompt_tokens})"
            )
        tiers.append(PromptTier(above, _rates(tm, inherit_audio=rates)))
    service_tiers: dict[str, ServiceTier] = {}
    st = m.section("service_tiers")
    for name, entry in st.entries("service tier names"):
        sm = Section(entry, st.where(name), ("multiplier", *_RATE_KEYS), required=True)
        tier_rates = _rates(sm, inherit_audio=rates) if ("input" in sm or "output" in sm) else None
        if tier_rates is None and any(k in sm for k in _RATE_KEYS):
            raise ConfigError(f"{st.where(name)}: rates need both input and output")
        if tier_rates is None and "multiplier" not in sm:
            raise ConfigError(f"{st.where(name)}: give a multiplier or rates (input, output)")
        service_tiers[name] = ServiceTier(
            name=name, rates=tier_rates, multiplier=sm.decimal("multiplier", Decimal(1))
        )
    min_charge = m.get("min_charge", 0)
    if isinstance(min_charge, bool) or not isinstance(min_charge, int) or min_charge < 0:
        raise ConfigError(
            f"{m.where('min_charge')}: must be a non-negative integer (credits), got {min_charge!r}"
        )
    return PriceSchedule(
        rates=rates,
        multiplier=m.decimal("multiplier", Decimal(1)),
        min_charge=min_charge,
        request_fee=m.decimal("request_fee", Decimal(0)),
        tiers=tuple(tiers),
        service_tiers=service_tiers,
        effective_from=effective[0] if effective else None,
        effective_from_ms=effective[1] if effective else 0,
    )


def _instant(m: Section, key: str) -> tuple[str, int]:
    """An ISO-8601 instant with a time zone, as canonical UTC text and unix ms."""
    raw = m.get(key)
    if raw is None:
        raise ConfigError(f"{m.where(key)}: required")
    try:
        # PyYAML turns unquoted timestamps into datetime; quoted ones stay text.
        when = raw if isinstance(raw, datetime) else datetime.fromisoformat(str(raw))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or not isinstance(raw, str | datetime):
        raise ConfigError(
            f"{m.where(key)}: must be an ISO-8601 time with a zone, "
            f"e.g. 2027-01-01T00:00:00Z, got {raw!r}"
        )
    when = when.astimezone(UTC)
    if when.microsecond % 1000:
        raise ConfigError(f"{m.where(key)}: at most millisecond precision, got {raw!r}")
    text = when.strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{when.microsecond // 1000:03d}Z" if when.microsecond else "Z"
    )
    return text, int(when.timestamp() * 1000)
