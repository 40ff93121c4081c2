"""Start-up and shutdown of everything a proxy process owns, in order."""

from __future__ import annotations

import logging
import time

import aiohttp
import redis.asyncio as aioredis

from proxy.billing.auth import Authenticator
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.guard import CreditBalanceGuard
from proxy.billing.snapshot_client import SnapshotClient
from proxy.config import EnvSettings, Provider, YamlConfig
from proxy.config.env import IDEMPOTENCE_ENV
from proxy.delivery.kafka import KafkaSink, make_producer
from proxy.delivery.outbox import Outbox
from proxy.delivery.publisher import JsonLinesSink, OutboxPublisher, Sink
from proxy.logs import redact_url
from proxy.server.state import Closer, ProxyState, close_all
from proxy.telemetry.observer import Observer, log_metrics_mode
from proxy.upstream.pools import UpstreamPools

log = logging.getLogger(__name__)


async def start_state(
    config: YamlConfig,
    settings: EnvSettings,
    observer: Observer,
    encodings: EncodingRegistry | None = None,
) -> ProxyState:
    closers: list[Closer] = []
    try:
        upstream = UpstreamPools.create(config.providers)
        closers.append(upstream.close)
        redis: aioredis.Redis | None = None
        if settings.redis_url:
            redis = aioredis.Redis.from_url(
                settings.redis_url,
                socket_connect_timeout=0.5,
                socket_timeout=1.0,
                health_check_interval=0,
                max_connections=256,
            )
            closers.append(redis.aclose)
        http = aiohttp.ClientSession()
        closers.append(http.close)
        guard: CreditBalanceGuard | None = None
        if redis is not None:
            provider = (
                SnapshotClient(settings.credit_snapshot_url, config.guard.provider_timeout_s, http)
                if settings.credit_snapshot_url
                else None
            )
            guard = CreditBalanceGuard(
                redis,
                config.guard,
                provider,
                on_cache_lookup=observer.metrics.guard_cache_lookup,
                on_cache_live=observer.metrics.guard_cache_state,
            )
            guard.start()
            closers.append(guard.close)
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
        auth=auth,
        guard=guard,
        redis=redis,
        encodings=encodings,
        outbox=outbox,
        publisher=publisher,
        observer=observer,
        sink_description=where,
        started_at=time.time(),
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
            "alias %s -> %s/%s price_rule=%s tokenizer=%s",
            name,
            a.provider.name,
            a.model,
            a.price_rule_id,
            a.tokenizer,
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
    else:
        log.info("guard: redis, local cache %s", "on" if guard.cache is not None else "off")
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
