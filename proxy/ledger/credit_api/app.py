"""Wiring the credit API: its services opened at start-up and closed at shutdown, its
routes and the store page, as an app of its own (`llm-proxy credit-api`) or added to
another one (`llm-proxy demo` adds it to the proxy's)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace

from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from proxy.config import AuthConfig, EnvSettings, YamlConfig
from proxy.config.store import StoreConfig
from proxy.errors import error_middleware
from proxy.ledger.credit_api.auth import (
    CreditAuth,
    KeySource,
    KeySources,
    RedisKeySource,
    StaticKeySource,
)
from proxy.ledger.credit_api.held import HeldSource, NoHolds, RedisHolds
from proxy.ledger.credit_api.orders import Orders
from proxy.ledger.credit_api.rewards import Rewards
from proxy.ledger.credit_api.routes import add_routes
from proxy.ledger.credit_api.services import SERVICES, CreditServices, ServicesHolder
from proxy.ledger.credit_api.store_page import add_store_routes
from proxy.ledger.database import migrate, open_engine, require_migrated
from proxy.ledger.projection import Projection
from proxy.ledger.reads import Reader

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CreditApiOptions:
    database_url: str
    auth: AuthConfig
    store: StoreConfig
    prefix: str
    redis_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    demo: bool = False  # adds the demo's "simulate payment" route
    static_keys: Mapping[str, int] = field(default_factory=dict)  # sha256 hex -> user
    migrate: bool = False  # migrate the database at start (else: refuse an old one)
    # Where `held` comes from; default: the Redis holds with Redis, else none. The
    # embedded ledger's in-process holds plug in here.
    held: HeldSource | None = None

    @classmethod
    def of(cls, config: YamlConfig, settings: EnvSettings, **overrides: object) -> CreditApiOptions:
        base = cls(
            database_url=settings.ledger_database_url,
            auth=config.auth,
            store=config.store,
            prefix=config.guard.prefix,
            redis_url=settings.redis_url,
            webhook_secret=settings.credit_webhook_secret,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


def install_credit_api(app: web.Application, options: CreditApiOptions) -> None:
    """Add the credit API's routes, the store page and its lifecycle to `app` (whose
    middleware must turn ApiError into responses, as proxy.errors.error_middleware)."""
    holder = ServicesHolder()
    app[SERVICES] = holder
    add_routes(app.router, demo=options.demo)
    add_store_routes(app.router, demo=options.demo)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        engine = open_engine(options.database_url)
        redis: Redis | None = None
        try:
            if options.migrate:
                await migrate(engine)
            else:
                await require_migrated(engine)
            keys: list[KeySource] = [StaticKeySource(options.static_keys)]
            held: HeldSource = NoHolds()
            projection = None
            if options.redis_url:
                redis = Redis.from_url(options.redis_url, socket_timeout=2.0)
                keys.append(RedisKeySource(redis, options.prefix, options.auth.redis_timeout_s))
                held = RedisHolds(redis, options.prefix)
                projection = Projection(redis, options.prefix)
            if options.held is not None:
                held = options.held
            holder.services = CreditServices(
                engine=engine,
                reader=Reader(engine),
                orders=Orders(engine),
                rewards=Rewards(engine),
                auth=CreditAuth(options.auth, KeySources(*keys)),
                held=held,
                store=options.store,
                webhook_secret=options.webhook_secret,
                projection=projection,
                demo=options.demo,
            )
            log.info(
                "credit api: %d packages, %d reward rules, user keys %s, webhook %s",
                len(options.store.packages),
                len(options.store.rewards),
                "redis" if redis is not None else "demo only" if options.static_keys else "off",
                "on" if options.webhook_secret else "off (no CREDIT_WEBHOOK_SECRET)",
            )
            yield
        finally:
            holder.services = None
            if redis is not None:
                await redis.aclose()
            await engine.dispose()

    app.cleanup_ctx.append(lifecycle)


def build_credit_app(options: CreditApiOptions) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024)

    async def healthz(request: web.Request) -> web.Response:
        """200 while the database answers."""
        services = request.app[SERVICES].services
        try:
            if services is None:
                raise OSError("not started")
            async with services.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError):
            return web.json_response({"status": "database unavailable"}, status=503)
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    install_credit_api(app, options)
    return app
