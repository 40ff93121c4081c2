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
        """Each dependency's state. Only what prevents serving makes us unready:
        the guard fails open and the outbox buffers while Kafka is away, so Redis
        and Kafka trouble report `degraded` but stay ready."""
        checks: dict[str, Any] = {"config": {"status": "ok", "aliases": len(self.config.aliases)}}
        ready = True
        if self.redis is None:
            checks["redis"] = {"status": "disabled"}
        else:
            try:
                async with asyncio.timeout(0.25):
                    await self.redis.ping()
                checks["redis"] = {"status": "ok"}
            except Exception as exc:
                checks["redis"] = {"status": "degraded", "error": type(exc).__name__}
        pending = self.outbox.pending_count()
        failures = self.relay.consecutive_failures
        checks["outbox"] = {
            "status": "ok",
            "pending": pending,
            "oldest_pending_age_s": self.outbox.oldest_pending_age(),
        }
        checks["events"] = {
            "status": "degraded" if failures else "ok",
            "sink": self.sink_description,
            "consecutive_publish_failures": failures,
        }
        return {"ready": ready, "checks": checks}


STATE = web.AppKey("proxy_state", ProxyState)


async def close_all(closers: list[Any]) -> None:
    for close in reversed(closers):
        with contextlib.suppress(Exception):
            await close()
