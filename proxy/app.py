"""Building the aiohttp application and owning start-up and shutdown of shared clients."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from proxy import handlers
from proxy.billing import Authenticator
from proxy.config import Config, Settings
from proxy.errors import ApiError, error_body
from proxy.guard import CreditBalanceGuard
from proxy.kafka import KafkaPublisher, make_producer
from proxy.metrics import ProxyMetrics
from proxy.observability import Observer, log_metrics_mode, redact_url
from proxy.outbox import Outbox, OutboxRelay, SinkPublisher
from proxy.snapshot import SnapshotProvider
from proxy.state import STATE, ProxyState, close_all
from proxy.tokens import EncodingRegistry
from proxy.upstream import UpstreamPools

log = logging.getLogger("proxy.app")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape, never as a stack trace or HTML page."""
    try:
        return await handler(request)
    except ApiError as err:
        return err.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, etype = _HTTP_CODES.get(exc.status, ("http_error", "invalid_request_error"))
        message = exc.reason if exc.status != 404 else f"unknown route {request.path!r}"
        if exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path!r}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.Response(
            status=exc.status,
            body=error_body(message, etype, code),
            content_type="application/json",
            headers=headers,
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.Response(
            status=500,
            body=error_body("internal error in the proxy", "server_error", "internal_error"),
            content_type="application/json",
        )


_HTTP_CODES = {
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
}


def build_app(
    config: Config,
    settings: Settings,
    *,
    observer: Observer | None = None,
    encodings: EncodingRegistry | None = None,
) -> web.Application:
    """`encodings`: a registry to share with other apps of this process (the loaded
    encodings are read-only and ~80 MB each); by default the app loads its own."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.server.max_body_bytes
    )
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    # One registry per app (several apps may share a process, e.g. in tests).
    obs = observer or Observer(ProxyMetrics.from_env(providers=config.providers))
    app.router.add_get("/metrics", obs.metrics_endpoint)

    async def lifecycle(app: web.Application) -> Any:
        state = await start_state(config, settings, obs, encodings)
        app[STATE] = state
        yield
        await stop_state(state)

    app.cleanup_ctx.append(lifecycle)
    return app


async def start_state(
    config: Config,
    settings: Settings,
    observer: Observer,
    encodings: EncodingRegistry | None = None,
) -> ProxyState:
    closers: list[Any] = []
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
                SnapshotProvider(
                    settings.credit_snapshot_url, config.guard.provider_timeout_s, http
                )
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
            publisher: Any = KafkaPublisher(producer, config.events.topic)
            sink = f"kafka {settings.kafka_bootstrap} topic={config.events.topic}"
        else:
            publisher = SinkPublisher(settings.sink_path)
            sink = f"jsonl file {settings.sink_path} (no KAFKA_BOOTSTRAP_SERVERS)"
        relay = OutboxRelay(
            outbox,
            publisher,
            on_published=observer.charge_published,
            on_failed=observer.charge_publish_failed,
        )
        relay.start()
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
        relay=relay,
        observer=observer,
        sink_description=sink,
        started_at=time.time(),
        closers=closers,
    )
    _log_startup(state)
    return state


async def stop_state(state: ProxyState) -> None:
    await state.relay.close(state.config.server.outbox_drain_s)
    await close_all(state.closers)


def _log_startup(state: ProxyState) -> None:
    c = state.config
    for name, p in c.providers.items():
        log.info(
            "provider %s base_url=%s key=%s stream_usage=%s",
            name,
            redact_url(p.base_url),
            f"${p.api_key_env}" + ("" if p.api_key else " (NOT SET)") if p.api_key_env else "none",
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
    guard = state.guard
    if guard is None:
        log.info("guard: off (no REDIS_URL)")
    else:
        log.info("guard: redis, local cache %s", "on" if guard.cache is not None else "off")
    log.info("charge events: outbox %s -> %s", state.settings.outbox_path, state.sink_description)
    log_metrics_mode(state.observer.metrics, log)
