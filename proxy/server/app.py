"""Building the aiohttp application: routes, the error middleware, the lifecycle hook."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.billing.encodings import EncodingRegistry
from proxy.config import EnvSettings, YamlConfig
from proxy.errors import error_middleware
from proxy.server import handlers, stored_responses
from proxy.server.lifecycle import EmbeddedLedgerFactory, start_state, stop_state
from proxy.server.state import STATE
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.observer import Observer


def build_app(
    config: YamlConfig,
    settings: EnvSettings,
    *,
    observer: Observer | None = None,
    encodings: EncodingRegistry | None = None,
    embedded_ledger: EmbeddedLedgerFactory | None = None,
) -> web.Application:
    """`encodings`: a registry to share with other apps of this process (the loaded
    encodings are read-only and ~80 MB each); by default the app loads its own.
    `embedded_ledger`: where charge events go without Kafka (proxy/server/lifecycle.py)."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.server.max_body_bytes
    )
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/responses", handlers.responses)
    app.router.add_post("/v1/embeddings", handlers.embeddings)
    app.router.add_post("/v1/completions", handlers.completions)
    stored_responses.add_routes(app)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    # One registry per app (several apps may share a process, e.g. in tests).
    obs = observer or Observer(
        ProxyMetrics(multiprocess_dir=settings.metrics_dir, providers=config.providers)
    )
    app.router.add_get("/metrics", obs.metrics_endpoint)

    async def lifecycle(app: web.Application) -> Any:
        state = await start_state(config, settings, obs, encodings, embedded_ledger)
        app[STATE] = state
        yield
        await stop_state(state)

    app.cleanup_ctx.append(lifecycle)
    return app
