"""The caller's own data: balance, usage, history, the packages on offer, and the
guard's snapshot."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from proxy.errors import invalid_request, ledger_unavailable
from proxy.ledger.api import snapshot_response
from proxy.ledger.credit_api.services import database, reply, services_of
from proxy.ledger.credit_api.usage import usage_report
from proxy.ledger.reads import Entry

MAX_LEDGER_PAGE = 100
DEFAULT_LEDGER_PAGE = 20


def _entry(e: Entry) -> dict[str, Any]:
    p, c, cached, reasoning = e.tokens
    return {
        "id": e.id,
        "kind": e.kind,
        "amount": e.amount,
        "balance_after": e.balance_after,
        "alias": e.alias,
        "scene": e.scene,
        "reason": e.reason,
        "tokens": {
            "prompt": p,
            "completion": c,
            "cached": cached,
            "reasoning": reasoning,
            "total": p + c,
        },
        "request_id": e.request_id,
        "occurred_at": e.occurred_at,
    }


# -- the caller's own data ---------------------------------------------------------


@database
async def balance(request: web.Request) -> web.Response:
    svc = services_of(request)
    user = await svc.auth.user(request.headers)
    account = await svc.reader.account(user)
    try:
        held = await svc.held.held(user)
    except (RedisError, OSError):
        raise ledger_unavailable("credit hold store") from None
    return reply(
        {
            "user_id": user,
            "balance": account.balance,
            "held": held,
            "blocked": account.is_blocked,
            "updated_at": account.updated_at,
        }
    )


@database
async def usage(request: web.Request) -> web.Response:
    svc = services_of(request)
    user = await svc.auth.user(request.headers)
    period = request.query.get("period", "24h")
    try:
        report = await usage_report(svc.engine, user, period)
    except ValueError as exc:
        raise invalid_request(str(exc), param="period") from None
    return reply(report)


@database
async def ledger(request: web.Request) -> web.Response:
    svc = services_of(request)
    user = await svc.auth.user(request.headers)
    raw_limit = request.query.get("limit", str(DEFAULT_LEDGER_PAGE))
    if not raw_limit.isdigit() or not 0 < int(raw_limit) <= MAX_LEDGER_PAGE:
        raise invalid_request(f"limit must be 1..{MAX_LEDGER_PAGE}", param="limit")
    cursor = request.query.get("cursor") or None
    if cursor is not None and (not cursor.isdigit() or len(cursor) > 19):
        raise invalid_request("not a cursor from next_cursor", param="cursor")
    page = await svc.reader.history(user, int(raw_limit), cursor)
    return reply({"entries": [_entry(e) for e in page.entries], "next_cursor": page.next_cursor})


async def packages(request: web.Request) -> web.Response:
    return reply([p.as_dict() for p in services_of(request).store.packages])


# -- orders ---------------------------------------------------------------------


@database
async def credit_snapshot(request: web.Request) -> web.Response:
    return await snapshot_response(services_of(request).reader, request.match_info["user_id"])
