"""Start-up and shutdown of everything a proxy process owns, in order.

Where charge events go: Kafka when KAFKA_BOOTSTRAP_SERVERS is set; else the
embedded ledger when the entry point provides one (`EmbeddedLedgerFactory`: the
server does not import the ledger, proxy.cli wires it in); else a JSON-lines file.
Without Redis but with the embedded ledger, the guard asks the ledger's books."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from proxy.billing.auth import Authenticator
from proxy.billing.books_guard import BalanceView, BooksGuard, Guard
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.guard import CreditBalanceGuard
from proxy.billing.limits import RateLimiter
from proxy.billing.reservations import RedisReservations
from proxy.billing.script_batcher import ScriptBus
from proxy.billing.snapshot_client import SnapshotClient, SnapshotSource
from proxy.config import EnvSettings, Provider, YamlConfig
from proxy.config.env import IDEMPOTENCE_ENV
from proxy.config.model import GuardMode
from proxy.delivery.kafka import KafkaSink, make_producer
from proxy.delivery.outbox import Outbox
from proxy.delivery.publisher import JsonLinesSink, OutboxPublisher, Sink
from proxy.errors import StartupError
from proxy.logs import redact_url
from proxy.server.state import Closer, ProxyState, close_all
from proxy.telemetry.observer import Observer, log_metrics_mode
from proxy.upstream.pools import UpstreamPools
from proxy.upstream.router import Router

log = logging.getLogger(__name__)


class EmbeddedLedger(Protocol):
    @property
    def sink(self) -> Sink: ...

    @property
    def description(self) -> str: ...

    async def fetch(self, user_id: int) -> BalanceView: ...

    def on_applied(self, callback: Callable[[Mapping[int, Iterable[str]]], None]) -> None:
        """Call `callback(user -> request ids)` after each batch is committed."""
        ...

    async def close(self) -> None: ...


RedisClient = aioredis.Redis | RedisCluster

# (settings, Redis key prefix, Redis or None) -> an open embedded ledger
EmbeddedLedgerFactory = Callable[[EnvSettings, str, RedisClient | None], Awaitable[EmbeddedLedger]]


def open_redis(settings: EnvSettings) -> RedisClient | None:
    """The proxy's Redis client: one node, or a cluster (LLM_PROXY_REDIS_CLUSTER)."""
    if not settings.redis_url:
        return None
    url = settings.redis_url
    if settings.redis_cluster:
        return RedisCluster.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=1.0, max_connections=256
        )
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=0.5,
        socket_timeout=1.0,
        health_check_interval=0,
        max_connections=256,
    )


async def start_state(
    config: YamlConfig,
    settings: EnvSettings,
    observer: Observer,
    encodings: EncodingRegistry | None = None,
    embedded_ledger: EmbeddedLedgerFactory | None = None,
) -> ProxyState:
    closers: list[Closer] = []
    try:
        upstream = UpstreamPools.create(config.providers)
        closers.append(upstream.close)
        router = Router(
            upstream,
            config.aliases,
            on_attempt=observer.metrics.upstream_attempt,
            on_cooldown=observer.metrics.target_cooldown,
        )
        redis = open_redis(settings)
        bus: ScriptBus | None = None
        if redis is not None:
            closers.append(redis.aclose)
            # The Lua scripts of reservations and rate limits: one command per tick.
            bus = ScriptBus(redis)
            closers.append(bus.close)
        http = aiohttp.ClientSession()
        closers.append(http.close)
        ledger: EmbeddedLedger | None = None
        if embedded_ledger is not None and not settings.kafka_bootstrap:
            ledger = await embedded_ledger(settings, config.guard.prefix, redis)
            closers.append(ledger.close)
        guard: Guard | None = None
        reserve = config.guard.mode is GuardMode.RESERVE
        if redis is not None:
            provider: SnapshotSource | None = (
                SnapshotClient(settings.credit_snapshot_url, config.guard.provider_timeout_s, http)
                if settings.credit_snapshot_url
                else None
            )
            if provider is None and ledger is not None and reserve:
                provider = ledger  # a user Redis does not know is the books' to decide
            guard_config = config.guard
            if isinstance(redis, RedisCluster):
                # Both are one-node matters: an MGET across users spans slots, and
                # client tracking is per node. Each check reads its user's slot.
                guard_config = dataclasses.replace(guard_config, coalesce=False, local_cache=False)
            check_guard = CreditBalanceGuard(
                redis,  # type: ignore[arg-type]  # a cluster client serves the same calls
                guard_config,
                provider,
                on_cache_lookup=observer.metrics.guard_cache_lookup,
                on_cache_live=observer.metrics.guard_cache_state,
            )
            reservations = RedisReservations(
                check_guard,
                guard_config,
                on_reservation=observer.metrics.reservation,
                on_held=observer.metrics.held_credit,
                bus=bus,
            )
            reservations.start()
            closers.append(reservations.close)
            guard = reservations
        elif ledger is not None:
            books = BooksGuard(ledger, config.guard)
            books.on_reservation = observer.metrics.reservation
            books.on_held = observer.metrics.held_credit
            ledger.on_applied(books.release_applied)
            guard = books
        limiter: RateLimiter | None = None
        if config.limits.enabled:
            if redis is None:
                raise StartupError("limits: needs REDIS_URL (the limits are shared in Redis)")
            limiter = RateLimiter(
                redis,
                config.limits,
                config.guard.prefix,
                on_decision=observer.metrics.rate_limit_decision,
                bus=bus,
            )
            closers.append(limiter.close)
            if isinstance(guard, RedisReservations):
                # A request's reservation and rate-limit admission: one script call.
                guard.chain(limiter.admit_script)
        auth = Authenticator(config.auth, redis, config.guard.prefix)
        auth.log_startup(log)

        if encodings is None:
            encodings = EncodingRegistry()
        encodings.preload({a.tokenizer for a in config.aliases.values()})

        outbox = Outbox(settings.outbox_path)
        await outbox.start()
        if settings.kafka_bootstrap:
            producer = make_producer(settings.kafka_bootstrap, idempotent=settings.kafka_idempotent)
            hint = f"set {IDEMPOTENCE_ENV}=false" if settings.kafka_idempotent else None
            sink: Sink = KafkaSink(producer, config.events.topic, idempotence_hint=hint)
            where = f"kafka {settings.kafka_bootstrap} topic={config.events.topic}"
        elif ledger is not None:
            sink = ledger.sink
            where = f"{ledger.description} {redact_url(settings.ledger_database_url)}"
        else:
            sink = JsonLinesSink(settings.sink_path)
            where = f"jsonl file {settings.sink_path} (no KAFKA_BOOTSTRAP_SERVERS)"
        publisher = OutboxPublisher(
            outbox,
            sink,
            on_published=observer.charge_published,
            on_failed=observer.charge_publish_failed,
        )
        publisher.start()
        observer.attach(outbox)
        closers.append(observer.close)
    except BaseException:
        await close_all(closers)
        raise
    state = ProxyState(
        config=config,
        settings=settings,
        upstream=upstream,
        router=router,
        auth=auth,
        guard=guard,
        limiter=limiter,
        redis=redis,
        encodings=encodings,
        outbox=outbox,
        publisher=publisher,
        observer=observer,
        sink_description=where,
        started_at=time.time(),
        loop=asyncio.get_running_loop(),
        closers=closers,
    )
    _log_startup(state)
    return state


async def stop_state(state: ProxyState) -> None:
    await state.publisher.close(state.config.server.outbox_drain_s)
    await close_all(state.closers)


def _log_startup(state: ProxyState) -> None:
    c = state.config
    for name, p in c.providers.items():
        log.info(
            "provider %s base_url=%s key=%s stream_usage=%s",
            name,
            redact_url(p.base_url),
            _key_note(p),
            p.stream_usage,
        )
    for name, a in c.aliases.items():
        log.info(
            "alias %s -> %s price_rule=%s tokenizer=%s%s",
            name,
            ", ".join(f"{t.key} (priority {t.priority}, weight {t.weight:g})" for t in a.targets)
            or f"{a.provider.name}/{a.model}",
            a.price_rule_id,
            a.tokenizer,
            f" fallbacks={','.join(a.fallbacks)}" if a.fallbacks else "",
        )
    if c.limits.enabled:
        log.info(
            "rate limits: user %s, key %s, fail %s",
            c.limits.user,
            c.limits.key,
            "open" if c.limits.fail_open else "closed",
        )
    for name, a in c.aliases.items():
        if a.provider.key_missing:
            log.warning(
                "alias %s cannot be served: provider %s needs $%s, which is not set",
                name,
                a.provider.name,
                a.provider.api_key_env,
            )
    if state.auth.callers() is None:
        log.warning(
            "no caller can authenticate (no auth.service_keys, no REDIS_URL for user keys): "
            "every call will be 401 and /readyz says unready"
        )
    guard = state.guard
    if guard is None:
        log.info("guard: off (no REDIS_URL)")
    elif isinstance(guard, RedisReservations):
        log.info(
            "guard: redis%s, mode %s, local cache %s",
            " cluster" if state.settings.redis_cluster else "",
            c.guard.mode,
            "on" if guard.cache is not None else "off",
        )
    else:
        log.info("guard: the embedded ledger's balances (no REDIS_URL), mode %s", c.guard.mode)
    worker = state.settings.worker_index
    log.info(
        "charge events: outbox %s -> %s%s",
        state.settings.outbox_path,
        state.sink_description,
        "" if worker is None else f" (worker {worker})",
    )
    log_metrics_mode(state.observer.metrics, log)


def _key_note(p: Provider) -> str:
    if not p.api_key_env:
        return "none"
    return f"${p.api_key_env}" + (" (NOT SET)" if p.key_missing else "")
