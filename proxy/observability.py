"""What the request path reports: one place that feeds metrics and the access log."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from proxy.accounting import Exchange, Settlement

access_log = logging.getLogger("proxy.access")


class Observer:
    """Called by the handler at fixed points of every request."""

    def guard_decided(self, decision: str) -> None:
        pass

    def charge_enqueued(self) -> None:
        pass

    def request_finished(self, ex: Exchange, settlement: Settlement | None, now: float) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        ctx = ex.ctx
        metered = ex.metered
        line = {
            "request_id": ex.request_id,
            "user_id": ctx.user_id if ctx else None,
            "scene": ctx.scene if ctx else None,
            "alias": ex.chat.alias.name if ex.chat else None,
            "status": ex.status,
            "outcome": str(ex.outcome),
            "stream": ex.chat.stream if ex.chat else None,
            "prompt_tokens": metered.usage.prompt_tokens if metered else 0,
            "completion_tokens": metered.usage.completion_tokens if metered else 0,
            "usage_source": str(metered.source) if metered else None,
            "credits": settlement.charge.credits if settlement and settlement.charge else 0,
            "latency_ms": ex.latency_ms(now),
            "ttft_ms": ex.ttft_ms(),
        }
        access_log.info(orjson.dumps(line).decode())
