"""The credit API's routes (README "Credit API and store"). Errors are ApiErrors
(proxy/errors.py), in OpenAI's shape."""

from __future__ import annotations

from aiohttp import web

from proxy.ledger.credit_api.account_routes import balance, credit_snapshot, ledger, packages, usage
from proxy.ledger.credit_api.grant_routes import (
    create_order,
    list_orders,
    order_paid,
    reward,
    simulate_payment,
)


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
