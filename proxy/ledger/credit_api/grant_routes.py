"""Everything that grants credits: orders and their payment (a service key, the signed
webhook, the demo's self-payment) and reward rules."""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web

from proxy.contract.payers import canonical_user_id
from proxy.errors import (
    bad_signature,
    conflict,
    forbidden,
    idempotency_key_required,
    invalid_request,
    invalid_user,
    not_found,
)
from proxy.ledger.credit_api.orders import (
    IdempotencyConflict,
    Order,
    Payment,
    signature_ok,
    valid_key,
)
from proxy.ledger.credit_api.rewards import REFERENCE_RE, RewardLimitReached
from proxy.ledger.credit_api.services import (
    MAX_BODY,
    CreditServices,
    database,
    project,
    read_json,
    reply,
    services_of,
)

log = logging.getLogger(__name__)


@database
async def create_order(request: web.Request) -> web.Response:
    svc = services_of(request)
    user = await svc.auth.user(request.headers)
    key = valid_key(request.headers.get("Idempotency-Key"))
    if key is None:
        raise idempotency_key_required()
    body = await read_json(request)
    package_id = body.get("package_id")
    package = svc.store.package(package_id) if isinstance(package_id, str) else None
    if package is None:
        raise not_found(f"no such package: {str(package_id)[:64]!r}", "package_not_found")
    try:
        order, created = await svc.orders.create(user, package, key)
    except IdempotencyConflict as exc:
        raise conflict(str(exc), "idempotency_key_reused") from None
    return reply(order.as_dict(), 201 if created else 200)


@database
async def list_orders(request: web.Request) -> web.Response:
    svc = services_of(request)
    user = await svc.auth.user(request.headers)
    return reply({"orders": [o.as_dict() for o in await svc.orders.of_user(user)]})


async def _order_of(svc: CreditServices, order_id: str) -> Order:
    order = await svc.orders.get(order_id)
    if order is None:
        raise not_found(f"no such order: {order_id[:64]!r}", "order_not_found")
    return order


def _payment(payment: Payment) -> web.Response:
    return reply(
        {**payment.order.as_dict(), "granted": payment.granted, "balance": payment.balance}
    )


@database
async def order_paid(request: web.Request) -> web.Response:
    """A service key, or the payment provider's webhook signed over the body."""
    svc = services_of(request)
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
    await project(svc, order.user_id, payment.balance)
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


@database
async def simulate_payment(request: web.Request) -> web.Response:
    """Demo only (mounted by `llm-proxy demo`): the caller pays their own order."""
    svc = services_of(request)
    user = await svc.auth.user(request.headers)
    order = await _order_of(svc, request.match_info["order_id"])
    if order.user_id != user:
        raise forbidden("not your order")
    payment = await svc.orders.pay(order, "demo-simulated")
    await project(svc, order.user_id, payment.balance)
    return _payment(payment)


# -- rewards --------------------------------------------------------------------


@database
async def reward(request: web.Request) -> web.Response:
    svc = services_of(request)
    await svc.auth.service(request.headers)
    rule_id = request.match_info["rule_id"]
    rule = svc.store.reward(rule_id)
    if rule is None:
        raise not_found(f"no such reward rule: {rule_id[:64]!r}", "reward_rule_not_found")
    body = await read_json(request)
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
    await project(svc, user, granted.balance)
    return reply(granted.as_dict(), 201 if granted.granted else 200)
