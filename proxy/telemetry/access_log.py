"""The access log: one JSON object per request on the `proxy.access` logger, at INFO.

It carries who (user, scene, principal), what (alias, tokens, credits) and how
(status, outcome, latency, TTFT, guard), and never prompt or completion text, API
keys or request headers: it is built from the `Exchange` fields named below only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from proxy.billing.record import Exchange
    from proxy.billing.settlement import Settlement


def access_line(ex: Exchange, settlement: Settlement | None, now: float) -> str:
    """The access-log JSON of one request (one orjson dump)."""
    ctx = ex.ctx
    chat = ex.chat
    metered = ex.metered
    charged = settlement is not None and settlement.event is not None
    line: dict[str, Any] = {
        "time": datetime.now(UTC),
        "request_id": ctx.request_id if ctx else None,
        "user_id": ctx.user_id if ctx else None,
        "scene": ctx.scene if ctx else None,
        "principal": ctx.principal if ctx else None,
        "alias": chat.alias.name if chat else None,
        "endpoint": chat.endpoint if chat else None,
        "provider": chat.alias.provider.name if chat else None,
        # The target that served (or the last one tried) and the attempts made.
        "target": f"{chat.alias.provider.name}/{chat.alias.model}" if chat else None,
        "attempts": ex.attempts,
        "stream": chat.stream if chat else None,
        "status": ex.status,
        "outcome": ex.outcome,
        "error_kind": ex.error_kind,
        "guard": ex.guard_decision,
        "tokens": None,
        "usage_source": None,
        "metering_flags": [],
        "client_disconnected": ex.client_disconnected,
        "credits": settlement.charge.credits if settlement and settlement.charge and charged else 0,
        "charged": charged,
        "latency_ms": ex.latency_ms(now),
        "ttft_ms": ex.ttft_ms(),
    }
    if metered is not None:
        usage = metered.usage
        line["tokens"] = {
            "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens,
            "cached": usage.cached_tokens,
            "reasoning": usage.reasoning_tokens,
        }
        line["usage_source"] = metered.source
        line["metering_flags"] = sorted(metered.flags)
    return orjson.dumps(line, option=orjson.OPT_UTC_Z).decode()
