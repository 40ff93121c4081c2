"""The credit API's handlers: parse, ask the services, answer JSON (README "Credit API
and store"). Errors are ApiErrors (proxy/errors.py), in OpenAI's shape."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config.store import StoreConfig
from proxy.contract.payers import canonical_user_id
from proxy.errors import (
    bad_signature,
    conflict,
    forbidden,
    idempotency_key_required,
    invalid_request,
    invalid_user,
    ledger_unavailable,
    not_found,
)
from proxy.ledger.api import snapshot_response
from proxy.ledger.credit_api.auth import CreditAuth
from proxy.ledger.credit_api.held import HeldSource
from proxy.ledger.credit_api.orders import (
    IdempotencyConflict,
    Order,
    Orders,
    Payment,
    signature_ok,
    valid_key,
)
from proxy.ledger.credit_api.rewards import REFERENCE_RE, RewardLimitReached, Rewards
from proxy.ledger.credit_api.usage import usage_report
from proxy.ledger.projection import Projection
from proxy.ledger.reads import Entry, Reader

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


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _database(handler: Handler) -> Handler:
    """A database the handler cannot reach is a 503, never a 500 with a trace."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("credit api %s: database error %s", request.path, type(exc).__name__)
            raise ledger_unavailable() from None

    return run


def _svc(request: web.Request) -> CreditServices:
    services = request.app[SERVICES].services
    if services is None:  # between shutdown and start
        raise ledger_unavailable("credit API")
    return services


async def _body(request: web.Request) -> dict[str, Any]:
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


@_database
async def balance(request: web.Request) -> web.Response:
    svc = _svc(request)
    user = await svc.auth.user(request.headers)
    account = await svc.reader.account(user)
    try:
        held = await svc.held.held(user)
    except (RedisError, OSError):
        raise ledger_unavailable("credit hold store") from None
    return _json(
        {
            "user_id": user,
            "balance": account.balance,
            "held": held,
            "blocked": account.is_blocked,
            "updated_at": account.updated_at,
        }
    )


@_database
async def usage(request: web.Request) -> web.Response:
    svc = _svc(request)
    user = await svc.auth.user(request.headers)
    period = request.query.get("period", "24h")
    try:
        report = await usage_report(svc.engine, user, period)
    except ValueError as exc:
        raise invalid_request(str(exc), param="period") from None
    return _json(report)


@_database
async def ledger(request: web.Request) -> web.Response:
    svc = _svc(request)
    user = await svc.auth.user(request.headers)
    raw_limit = request.query.get("limit", str(DEFAULT_LEDGER_PAGE))
    if not raw_limit.isdigit() or not 0 < int(raw_limit) <= MAX_LEDGER_PAGE:
        raise invalid_request(f"limit must be 1..{MAX_LEDGER_PAGE}", param="limit")
    cursor = request.query.get("cursor") or None
    if cursor is not None and (not cursor.isdigit() or len(cursor) > 19):
        raise invalid_request("not a cursor from next_cursor", param="cursor")
    page = await svc.reader.history(user, int(raw_limit), cursor)
    return _json({"entries": [_entry(e) for e in page.entries], "next_cursor": page.next_cursor})


async def packages(request: web.Request) -> web.Response:
    return _json([p.as_dict() for p in _svc(request).store.packages])


# -- orders ---------------------------------------------------------------------


@_database
async def create_order(request: web.Request) -> web.Response:
    svc = _svc(request)
    user = await svc.auth.user(request.headers)
    key = valid_key(request.headers.get("Idempotency-Key"))
    if key is None:
        raise idempotency_key_required()
    body = await _body(request)
    package_id = body.get("package_id")
    package = svc.store.package(package_id) if isinstance(package_id, str) else None
    if package is None:
        raise not_found(f"no such package: {str(package_id)[:64]!r}", "package_not_found")
    try:
        order, created = await svc.orders.create(user, package, key)
    except IdempotencyConflict as exc:
        raise conflict(str(exc), "idempotency_key_reused") from None
    return _json(order.as_dict(), 201 if created else 200)


@_database
async def list_orders(request: web.Request) -> web.Response:
    svc = _svc(request)
    user = await svc.auth.user(request.headers)
    return _json({"orders": [o.as_dict() for o in await svc.orders.of_user(user)]})


async def _order_of(svc: CreditServices, order_id: str) -> Order:
    order = await svc.orders.get(order_id)
    if order is None:
        raise not_found(f"no such order: {order_id[:64]!r}", "order_not_found")
    return order


def _payment(payment: Payment) -> web.Response:
    return _json(
        {**payment.order.as_dict(), "granted": payment.granted, "balance": payment.balance}
    )


async def _project(svc: CreditServices, user_id: int, balance: int) -> None:
    """Refresh the user's Redis snapshot and blocked keys (a rebuild repairs a miss)."""
    if svc.projection is None:
        return
    try:
        await svc.projection.write([(user_id, balance)])
    except (RedisError, OSError) as exc:
        log.warning("credit api: projection of user %d deferred: %s", user_id, exc)


@_database
async def order_paid(request: web.Request) -> web.Response:
    """A service key, or the payment provider's webhook signed over the body."""
    svc = _svc(request)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise invalid_request(f"request body exceeds {MAX_BODY} bytes")
    signature = request.headers.get("X-Signature")
    if signature is not None:
        if not svc.webhook_secret:
            raise bad_signature("payment webhooks are not configured (CREDIT_WEBHOOK_SECRET)")
        if not signature_ok(svc.webhook_secret, raw, signature):
            raise bad_signature("X-Signature does not match the body")
    else:
        await svc.auth.service(request.headers)
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise invalid_request("request body must be a JSON object")
    order_id = request.match_info["order_id"]
    if signature is not None and body.get("order_id") != order_id:
        # A signed body names its order, so it cannot be replayed against another one.
        raise invalid_request("the signed body's order_id is not this order", param="order_id")
    order = await _order_of(svc, order_id)
    _check_paid_amount(order, body)
    reference = body.get("payment_reference")
    reference = str(reference)[:128] if reference is not None else None
    payment = await svc.orders.pay(order, reference)
    await _project(svc, order.user_id, payment.balance)
    if payment.granted:
        log.info("credit api: order %s paid, %d credits granted", order.id, order.credits)
    return _payment(payment)


def _check_paid_amount(order: Order, body: dict[str, Any]) -> None:
    """What the payment says it paid, when it says so, must be the order's price."""
    amount, currency = body.get("amount"), body.get("currency")
    if amount is not None:
        try:
            same = Decimal(str(amount)) == Decimal(order.price)
        except InvalidOperation:
            same = False
        if not same:
            raise conflict(
                f"amount {str(amount)[:32]!r} is not the order's {order.price}", "payment_mismatch"
            )
    if currency is not None and str(currency).upper() != order.currency:
        raise conflict(
            f"currency {str(currency)[:8]!r} is not the order's {order.currency}",
            "payment_mismatch",
        )


@_database
async def simulate_payment(request: web.Request) -> web.Response:
    """Demo only (mounted by `llm-proxy demo`): the caller pays their own order."""
    svc = _svc(request)
    user = await svc.auth.user(request.headers)
    order = await _order_of(svc, request.match_info["order_id"])
    if order.user_id != user:
        raise forbidden("not your order")
    payment = await svc.orders.pay(order, "demo-simulated")
    await _project(svc, order.user_id, payment.balance)
    return _payment(payment)


# -- rewards --------------------------------------------------------------------


@_database
async def reward(request: web.Request) -> web.Response:
    svc = _svc(request)
    await svc.auth.service(request.headers)
    rule_id = request.match_info["rule_id"]
    rule = svc.store.reward(rule_id)
    if rule is None:
        raise not_found(f"no such reward rule: {rule_id[:64]!r}", "reward_rule_not_found")
    body = await _body(request)
    raw_user = body.get("user_id")
    user = (
        canonical_user_id(str(raw_user))
        if isinstance(raw_user, int | str) and not isinstance(raw_user, bool)
        else None
    )
    if user is None:
        raise invalid_user("user_id")
    reference = body.get("reference")
    if not isinstance(reference, str) or not REFERENCE_RE.fullmatch(reference):
        raise invalid_request("reference must be 1-128 visible ASCII characters", param="reference")
    try:
        granted = await svc.rewards.grant(rule, user, reference)
    except RewardLimitReached as exc:
        raise conflict(str(exc), "reward_limit_reached") from None
    await _project(svc, user, granted.balance)
    return _json(granted.as_dict(), 201 if granted.granted else 200)


@_database
async def credit_snapshot(request: web.Request) -> web.Response:
    return await snapshot_response(_svc(request).reader, request.match_info["user_id"])


def add_routes(router: web.UrlDispatcher, *, demo: bool) -> None:
    router.add_get("/v1/credit/balance", balance)
    router.add_get("/v1/credit/usage", usage)
    router.add_get("/v1/credit/ledger", ledger)
    router.add_get("/v1/credit/packages", packages)
    router.add_post("/v1/credit/orders", create_order)
    router.add_get("/v1/credit/orders", list_orders)
    router.add_post("/v1/credit/orders/{order_id}/paid", order_paid)
    router.add_post("/v1/credit/rewards/{rule_id}", reward)
    router.add_get("/users/{user_id}/credit-snapshot", credit_snapshot)
    if demo:
        router.add_post("/demo/orders/{order_id}/simulate-payment", simulate_payment)
