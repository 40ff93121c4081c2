"""What the credit API's handlers share: their services (opened at start-up), the
JSON answer, the body reader, the database-error translation and the projection."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config.store import StoreConfig
from proxy.errors import invalid_request, ledger_unavailable
from proxy.ledger.credit_api.auth import CreditAuth
from proxy.ledger.credit_api.held import HeldSource
from proxy.ledger.credit_api.orders import Orders
from proxy.ledger.credit_api.rewards import Rewards
from proxy.ledger.projection import Projection
from proxy.ledger.reads import Reader

log = logging.getLogger(__name__)

MAX_LEDGER_PAGE = 100
DEFAULT_LEDGER_PAGE = 20
MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class CreditServices:
    engine: AsyncEngine
    reader: Reader
    orders: Orders
    rewards: Rewards
    auth: CreditAuth
    held: HeldSource
    store: StoreConfig
    webhook_secret: str | None
    projection: Projection | None
    demo: bool = False


class ServicesHolder:
    """Filled when the app starts (the services need the event loop)."""

    services: CreditServices | None = None


SERVICES: web.AppKey[ServicesHolder] = web.AppKey("credit_services", ServicesHolder)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def database(handler: Handler) -> Handler:
    """A database the handler cannot reach is a 503, never a 500 with a trace."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("credit api %s: database error %s", request.path, type(exc).__name__)
            raise ledger_unavailable() from None

    return run


def services_of(request: web.Request) -> CreditServices:
    services = request.app[SERVICES].services
    if services is None:  # between shutdown and start
        raise ledger_unavailable("credit API")
    return services


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise invalid_request(f"request body exceeds {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request("request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise invalid_request("request body must be a JSON object")
    return data


async def project(svc: CreditServices, user_id: int, balance: int) -> None:
    """Refresh the user's Redis snapshot and blocked keys (a rebuild repairs a miss)."""
    if svc.projection is None:
        return
    try:
        await svc.projection.write([(user_id, balance)])
    except (RedisError, OSError) as exc:
        log.warning("credit api: projection of user %d deferred: %s", user_id, exc)
