"""The one object that owns every long-lived part of a running proxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster

from proxy.billing.auth import Authenticator
from proxy.billing.books_guard import Guard
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.limits import RateLimiter
from proxy.config import EnvSettings, YamlConfig
from proxy.delivery.outbox import Outbox
from proxy.delivery.publisher import OutboxPublisher
from proxy.telemetry.observer import Observer
from proxy.upstream.pools import UpstreamPools
from proxy.upstream.router import Router

Closer = Callable[[], Awaitable[object]]


@dataclass(slots=True)
class ProxyState:
    config: YamlConfig
    settings: EnvSettings
    upstream: UpstreamPools
    router: Router
    auth: Authenticator
    guard: Guard | None
    limiter: RateLimiter | None
    redis: aioredis.Redis | RedisCluster | None
    encodings: EncodingRegistry
    outbox: Outbox
    publisher: OutboxPublisher
    observer: Observer
    sink_description: str
    started_at: float
    # The loop it was started on and serves: asked once (on Python 3.11 each
    # `asyncio.get_running_loop` is a getpid() system call).
    loop: asyncio.AbstractEventLoop
    closers: list[Closer] = field(default_factory=list)


STATE = web.AppKey("proxy_state", ProxyState)


async def close_all(closers: list[Closer]) -> None:
    for close in reversed(closers):
        with contextlib.suppress(Exception):
            await close()
