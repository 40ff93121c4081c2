"""The ledger's HTTP API: the credit snapshot provider the guard falls back to
(`CREDIT_SNAPSHOT_URL`), answered from the database of record.

`GET /users/{id}/credit-snapshot` -> `{"balance": int, "is_blocked": bool}`; a user
the ledger never saw has balance 0 and is blocked (the books say so, rather than
a missing snapshot letting them in). `GET /healthz` -> 200 while the database answers.
`GET /metrics` (the consumer's, when it runs in the same process): proxy/ledger/metrics.py.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.payers import check_user_id
from proxy.ledger.metrics import METRICS, LedgerMetrics, metrics_endpoint
from proxy.ledger.reads import Reader

log = logging.getLogger(__name__)

READER: web.AppKey[Reader] = web.AppKey("reader", Reader)
ENGINE: web.AppKey[AsyncEngine] = web.AppKey("engine", AsyncEngine)


def _json(status: int, data: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def credit_snapshot(request: web.Request) -> web.Response:
    raw = request.match_info["user_id"]
    try:
        user_id = int(raw) if raw.isdigit() else -1
        check_user_id(user_id)
    except ValueError:
        return _json(400, {"error": f"not a user id: {raw[:40]!r}"})
    try:
        account = await request.app[READER].account(user_id)
    except (SQLAlchemyError, OSError) as exc:
        log.warning("credit snapshot of user %d: database error %s", user_id, type(exc).__name__)
        return _json(503, {"error": "ledger database unavailable"})
    return _json(200, {"balance": account.balance, "is_blocked": account.is_blocked})


async def healthz(request: web.Request) -> web.Response:
    try:
        async with request.app[ENGINE].connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError):
        return _json(503, {"status": "database unavailable"})
    return _json(200, {"status": "ok"})


def build_api(engine: AsyncEngine, metrics: LedgerMetrics | None = None) -> web.Application:
    app = web.Application()
    app[ENGINE] = engine
    app[READER] = Reader(engine)
    app.router.add_get("/users/{user_id}/credit-snapshot", credit_snapshot)
    app.router.add_get("/healthz", healthz)
    if metrics is not None:
        app[METRICS] = metrics
        app.router.add_get("/metrics", metrics_endpoint)
    return app
