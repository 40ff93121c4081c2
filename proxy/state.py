"""The one object that owns every long-lived part of a running proxy."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from proxy.billing import Authenticator
from proxy.config import Config, Settings
from proxy.guard import CreditBalanceGuard
from proxy.observability import Observer
from proxy.outbox import Outbox, OutboxRelay
from proxy.tokens import EncodingRegistry
from proxy.upstream import UpstreamPools


@dataclass(slots=True)
class ProxyState:
    config: Config
    settings: Settings
    upstream: UpstreamPools
    auth: Authenticator
    guard: CreditBalanceGuard | None
    redis: aioredis.Redis | None
    encodings: EncodingRegistry
    outbox: Outbox
    relay: OutboxRelay
    observer: Observer
    sink_description: str
    started_at: float
    closers: list[Any] = field(default_factory=list)

    async def readiness(self) -> dict[str, Any]:
        """Each dependency's state. Only what prevents serving makes us unready: no
        alias with a usable provider key, or a closed outbox (no charge could be
        recorded). The guard fails open and the outbox buffers while Kafka is away,
        so Redis and Kafka trouble report `degraded` but stay ready. Outbox enqueue
        failures report `failing` but stay ready too: an unready proxy gets no
        traffic and could never see the outbox recover; alert on
        llm_proxy_charge_events_total{result="enqueue_failed"} instead."""
        providers = self.config.providers
        missing = sorted(n for n, p in providers.items() if p.api_key_env and not p.api_key)
        servable = sum(a.provider.name not in missing for a in self.config.aliases.values())
        checks: dict[str, Any] = {
            "config": {
                "status": "ok" if servable else "error",
                "aliases": len(self.config.aliases),
                "servable_aliases": servable,
                "providers": len(providers),
                "providers_without_key": missing,
            }
        }
        if self.redis is None:
            checks["redis"] = {"status": "disabled"}
        else:
            try:
                async with asyncio.timeout(0.25):
                    await self.redis.ping()
                checks["redis"] = {"status": "ok"}
            except Exception as exc:
                checks["redis"] = {"status": "degraded", "error": type(exc).__name__}
        if not self.outbox.is_open:
            outbox_status = "closed"
        elif self.observer.last_record_failed:
            outbox_status = "failing"
        else:
            outbox_status = "ok"
        checks["outbox"] = {
            "status": outbox_status,
            "pending": self.outbox.pending_count(),
            "uncommitted": self.outbox.queued_count(),
            "oldest_pending_age_s": self.outbox.oldest_pending_age(),
            "record_failures": self.observer.record_failures,
        }
        failures = self.relay.consecutive_failures
        checks["relay"] = {
            "status": "degraded" if failures else "ok",
            "sink": self.sink_description,
            "consecutive_publish_failures": failures,
        }
        ready = servable > 0 and self.outbox.is_open
        if not ready:
            status = "unready"
        elif any(c["status"] in ("degraded", "failing") for c in checks.values()):
            status = "degraded"
        else:
            status = "ok"
        return {"ready": ready, "status": status, "checks": checks}


STATE = web.AppKey("proxy_state", ProxyState)


async def close_all(closers: list[Any]) -> None:
    for close in reversed(closers):
        with contextlib.suppress(Exception):
            await close()
