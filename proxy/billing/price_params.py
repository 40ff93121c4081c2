"""Price-changing request fields: priced by the alias's rule, or refused before the call.

The list and its reasons live in proxy.config.request_params; this applies it to
one request. Refusing is a 400 `unsupported_parameter` naming the field, because
relaying the field while charging the plain text rate would make the caller's
choice cheaper than the provider's bill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config.model import Alias
from proxy.config.price_rules import DEFAULT_SERVICE_TIER
from proxy.config.request_params import (
    AUDIO,
    NEUTRAL_PARAMS,
    PRICE_PARAMS,
    SERVICE_TIER,
    WEB_SEARCH,
)
from proxy.errors import unsupported_parameter

_PERMISSION_OF = {field: name for name, fields in PRICE_PARAMS.items() for field in fields}


def check_price_params(
    body: Mapping[str, Any],
    alias: Alias,
    started_ms: int,
    neutral: frozenset[str] = NEUTRAL_PARAMS,
    api: str = "chat.completions",
) -> str | None:
    """Refuse what `alias` does not price; return the service tier to price (or None).
    `neutral`: the endpoint's fields priced from usage (proxy.config.request_params)."""
    for field, value in body.items():
        if field in neutral or value is None:
            continue
        permission = _PERMISSION_OF.get(field, field)
        if _is_plain(field, value):
            continue
        if _allowed(alias, started_ms, field, permission):
            continue
        what = (
            f"changes the provider's price ({_why(permission)})"
            if permission in PRICE_PARAMS
            else f"is not a known {api} field and may change the model or price"
        )
        raise unsupported_parameter(
            field, f"'{field}' {what}, and model '{alias.name}' does not accept it"
        )
    tier = body.get("service_tier")
    if tier is None:
        return None
    if not isinstance(tier, str) or not tier:
        raise unsupported_parameter("service_tier", "'service_tier' must be a string")
    if alias.price_rule is not None and tier != DEFAULT_SERVICE_TIER:
        schedule = alias.price_rule.in_force(started_ms)
        if tier not in schedule.service_tiers:
            offered = ", ".join(sorted({DEFAULT_SERVICE_TIER, *schedule.service_tiers}))
            raise unsupported_parameter(
                "service_tier",
                f"service_tier {tier[:40]!r} is not priced for model '{alias.name}' "
                f"(priced: {offered})",
            )
    return tier


def check_builtin_tools(body: Mapping[str, Any], alias: Alias, started_ms: int) -> None:
    """The Responses API's built-in tools carry per-call fees: each type must be
    allowed (`allow_params: [web_search_options]` for `web_search*`, priced by
    `request_fee`; the tool's type name for the others, vouched by the operator)."""
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if not isinstance(kind, str) or kind in ("function", "custom"):
            continue
        permission = WEB_SEARCH if kind.startswith("web_search") else kind
        if _allowed(alias, started_ms, "tools", permission):
            continue
        raise unsupported_parameter(
            "tools",
            f"built-in tool {kind[:60]!r} has a per-call price, and model "
            f"'{alias.name}' does not accept it",
        )


def _allowed(alias: Alias, started_ms: int, field: str, permission: str) -> bool:
    """True when `alias` allows `permission` and prices it now; False when it does
    not allow it (the caller refuses); a 400 when it allows but does not price it now."""
    if permission not in alias.allow_params:
        return False
    rule = alias.price_rule
    if rule is None or rule.in_force(started_ms).prices(permission):
        return True
    raise unsupported_parameter(
        field,
        f"'{field[:100]}' ({_why(permission)}) is not priced for model '{alias.name}' at this time",
    )


def _is_plain(field: str, value: Any) -> bool:
    """Values of price fields that ask for nothing beyond the standard price."""
    if field == "service_tier":
        return value == DEFAULT_SERVICE_TIER
    if field == "modalities":
        return value == ["text"]
    return False


def _why(permission: str) -> str:
    return {
        SERVICE_TIER: "a service tier",
        AUDIO: "audio",
        WEB_SEARCH: "web search",
    }.get(permission, permission)
