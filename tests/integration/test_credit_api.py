"""The credit API against the real stack: every route on SQLite and PostgreSQL, user
keys in a real Redis, service keys, the signed payment webhook, reward limits and
history pages that neither skip nor repeat while entries arrive."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import func, select

from proxy.contract.redis_keys import RedisKeys, encode_hold
from proxy.ledger.book import Book, grant
from proxy.ledger.credit_api.orders import sign
from proxy.ledger.schema import entries
from tests.fixtures_credit_api import SERVICE_KEY, WEBHOOK_SECRET, StartCreditApi
from tests.ledger_events import charge_event

HOUR_MS = 3_600_000


async def _grants(api_engine, user: int) -> int:  # type: ignore[no-untyped-def]
    async with api_engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(entries)
                    .where(entries.c.user_id == user, entries.c.kind == "grant")
                )
            ).scalar_one()
        )


async def test_balance_usage_ledger_packages_and_snapshot(start_credit_api: StartCreditApi) -> None:
    api = await start_credit_api()
    book = Book(api.engine)
    await grant(book, 5, 1000, "welcome-5")
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    charges = [
        charge_event(5, 10, alias="smart", scene="chat", unix_ms=now_ms),
        charge_event(5, 20, alias="mini", scene="chat", unix_ms=now_ms - 3 * HOUR_MS),
        charge_event(5, 40, alias="smart", scene="agent", unix_ms=now_ms - 3 * 24 * HOUR_MS),
        charge_event(5, 80, alias="smart", scene="chat", unix_ms=now_ms - 20 * 24 * HOUR_MS),
        charge_event(5, 160, alias="smart", scene="chat", unix_ms=now_ms - 90 * 24 * HOUR_MS),
        charge_event(6, 999, unix_ms=now_ms),  # someone else
    ]
    await book.apply_charges(charges)
    await api.redis.hset(
        RedisKeys(api.prefix).holds(5),
        mapping={"r1": encode_hold(7, now_ms + 60_000), "r2": encode_hold(100, now_ms - 1)},
    )
    key = await api.user_key(5)

    status, bal = await api.call("GET", "/v1/credit/balance", key)
    assert status == 200
    assert bal["user_id"] == 5 and bal["balance"] == 1000 - 310
    assert bal["held"] == 7  # the expired hold counts for nothing
    assert bal["blocked"] is False and bal["updated_at"]

    expected = {"24h": (30, 2), "7d": (70, 3), "30d": (150, 4), "all": (310, 5)}
    for period, (credits, requests) in expected.items():
        status, u = await api.call("GET", f"/v1/credit/usage?period={period}", key)
        assert status == 200, u
        assert (u["period"], u["credits"], u["requests"]) == (period, credits, requests)
        assert u["tokens"]["total"] == 7 * requests and u["tokens"]["prompt"] == 3 * requests
        assert sum(s["credits"] for s in u["series"]) == credits
        assert sum(s["tokens"] for s in u["series"]) == u["tokens"]["total"]
        assert sum(a["credits"] for a in u["by_alias"]) == credits
        assert sum(s["credits"] for s in u["by_scene"]) == credits
        starts = [datetime.fromisoformat(s["start"]) for s in u["series"]]
        step = timedelta(hours=1) if period in ("24h", "7d") else timedelta(days=1)
        assert all(b - a == step for a, b in itertools.pairwise(starts))
    status, u = await api.call("GET", "/v1/credit/usage?period=24h", key)
    assert len(u["series"]) == 24
    assert [a["alias"] for a in u["by_alias"]] == ["mini", "smart"]  # by credits, descending
    status, u = await api.call("GET", "/v1/credit/usage?period=7d", key)
    assert len(u["series"]) == 168
    status, err = await api.call("GET", "/v1/credit/usage?period=1y", key)
    assert status == 400 and err["error"]["param"] == "period"

    status, page = await api.call("GET", "/v1/credit/ledger?limit=4", key)
    assert status == 200
    rows = page["entries"]
    assert [r["amount"] for r in rows] == [-160, -80, -40, -20]  # newest applied first
    assert set(rows[0]) >= {
        "id",
        "kind",
        "amount",
        "balance_after",
        "alias",
        "scene",
        "tokens",
        "request_id",
        "occurred_at",
    }
    assert rows[0]["tokens"]["total"] == 7 and rows[0]["balance_after"] == 1000 - 310
    status, older = await api.call("GET", f"/v1/credit/ledger?cursor={page['next_cursor']}", key)
    assert [r["kind"] for r in older["entries"]] == ["charge", "grant"]
    assert older["next_cursor"] is None
    for bad in ("limit=0", "limit=101", "cursor=abc"):
        status, _ = await api.call("GET", f"/v1/credit/ledger?{bad}", key)
        assert status == 400

    status, pkgs = await api.call("GET", "/v1/credit/packages")
    assert status == 200
    assert pkgs == [
        {
            "id": "starter",
            "name": "Starter",
            "credits": 5000,
            "original_price": "2.99",
            "price": "1.99",
            "currency": "USD",
        },
        {
            "id": "pro",
            "name": "Pro",
            "credits": 50000,
            "original_price": "9.00",
            "price": "9.00",
            "currency": "EUR",
        },
    ]

    status, snap = await api.call("GET", "/users/5/credit-snapshot")
    assert (status, snap) == (200, {"balance": 690, "is_blocked": False})


async def test_auth_user_keys_see_only_their_own_data(start_credit_api: StartCreditApi) -> None:
    api = await start_credit_api()
    await grant(Book(api.engine), 5, 100, "g5")
    await grant(Book(api.engine), 6, 600, "g6")
    key5 = await api.user_key(5)

    status, err = await api.call("GET", "/v1/credit/balance")
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, err = await api.call("GET", "/v1/credit/balance", "sk-llmp-not-a-real-key")
    assert status == 401
    status, err = await api.call(
        "GET", "/v1/credit/balance", headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    assert status == 401
    # A forged X-User-Id with a user key is refused, on every route.
    for path in (
        "/v1/credit/balance",
        "/v1/credit/usage",
        "/v1/credit/ledger",
        "/v1/credit/orders",
    ):
        status, err = await api.call("GET", path, key5, headers={"X-User-Id": "6"})
        assert status == 403, path
        assert err["error"]["type"] == "permission_error"
    status, bal = await api.call("GET", "/v1/credit/balance", key5, headers={"X-User-Id": "5"})
    assert (status, bal["balance"]) == (200, 100)
    status, err = await api.call("GET", "/v1/credit/balance", key5, headers={"X-User-Id": "05"})
    assert status == 400 and err["error"]["code"] == "invalid_user"

    # A service key acts for the user it names, and must name one.
    status, bal = await api.call(
        "GET", "/v1/credit/balance", SERVICE_KEY, headers={"X-User-Id": "6"}
    )
    assert (status, bal["user_id"], bal["balance"]) == (200, 6, 600)
    status, err = await api.call("GET", "/v1/credit/balance", SERVICE_KEY)
    assert status == 400 and err["error"]["param"] == "X-User-Id"

    # Admin actions are a service key's only.
    status, err = await api.call(
        "POST", "/v1/credit/rewards/signup", key5, json={"user_id": 5, "reference": "x"}
    )
    assert status == 403
    status, order = await api.call(
        "POST",
        "/v1/credit/orders",
        key5,
        json={"package_id": "starter"},
        headers={"Idempotency-Key": "k1"},
    )
    assert status == 201
    status, err = await api.call("POST", f"/v1/credit/orders/{order['id']}/paid", key5, json={})
    assert status == 403
    # The demo's self-payment route exists only in the demo.
    status, _ = await api.call("POST", f"/demo/orders/{order['id']}/simulate-payment", key5)
    assert status == 404

    # A revoked key stops working (no cache in the credit API).
    await api.keys.revoke(api_key=key5)
    status, _ = await api.call("GET", "/v1/credit/balance", key5)
    assert status == 401


async def test_orders_are_idempotent_and_private(start_credit_api: StartCreditApi) -> None:
    api = await start_credit_api()
    key5, key6 = await api.user_key(5), await api.user_key(6)
    path = "/v1/credit/orders"

    status, err = await api.call("POST", path, key5, json={"package_id": "starter"})
    assert status == 400 and err["error"]["code"] == "idempotency_key_required"
    status, err = await api.call(
        "POST", path, key5, json={"package_id": "gold"}, headers={"Idempotency-Key": "a"}
    )
    assert status == 404 and err["error"]["code"] == "package_not_found"

    first = await api.call(
        "POST", path, key5, json={"package_id": "starter"}, headers={"Idempotency-Key": "a"}
    )
    again = await api.call(
        "POST", path, key5, json={"package_id": "starter"}, headers={"Idempotency-Key": "a"}
    )
    assert first[0] == 201 and again[0] == 200 and first[1] == again[1]
    order = first[1]
    assert (order["status"], order["credits"], order["price"], order["currency"]) == (
        "pending",
        5000,
        "1.99",
        "USD",
    )
    status, err = await api.call(
        "POST", path, key5, json={"package_id": "pro"}, headers={"Idempotency-Key": "a"}
    )
    assert status == 409 and err["error"]["code"] == "idempotency_key_reused"
    # Concurrent retries with one key make one order.
    results = await asyncio.gather(
        *(
            api.call(
                "POST", path, key5, json={"package_id": "pro"}, headers={"Idempotency-Key": "b"}
            )
            for _ in range(8)
        )
    )
    assert len({r[1]["id"] for r in results}) == 1 and all(r[0] in (200, 201) for r in results)
    # The same key of another user is another order.
    status, other = await api.call(
        "POST", path, key6, json={"package_id": "starter"}, headers={"Idempotency-Key": "a"}
    )
    assert status == 201 and other["id"] != order["id"]

    status, mine = await api.call("GET", path, key5)
    assert status == 200 and {o["id"] for o in mine["orders"]} == {order["id"], results[0][1]["id"]}
    status, theirs = await api.call("GET", path, key6)
    assert [o["id"] for o in theirs["orders"]] == [other["id"]]


async def test_payment_grants_exactly_once(start_credit_api: StartCreditApi) -> None:
    api = await start_credit_api()
    key = await api.user_key(5)
    _, order = await api.call(
        "POST",
        "/v1/credit/orders",
        key,
        json={"package_id": "starter"},
        headers={"Idempotency-Key": "o1"},
    )
    paid = f"/v1/credit/orders/{order['id']}/paid"
    body = orjson.dumps(
        {
            "order_id": order["id"],
            "payment_reference": "pay_123",
            "amount": "1.99",
            "currency": "USD",
        }
    )

    status, err = await api.call("POST", paid, data=body, headers={"X-Signature": "sha256=00"})
    assert status == 401 and err["error"]["code"] == "invalid_signature"
    forged = sign("wrong-secret", body)
    status, _ = await api.call("POST", paid, data=body, headers={"X-Signature": forged})
    assert status == 401
    status, _ = await api.call("POST", paid, data=body)  # neither signature nor key
    assert status == 401
    assert (await api.call("GET", "/v1/credit/balance", key))[1]["balance"] == 0

    # A signed body names its order: it cannot pay another one.
    _, other = await api.call(
        "POST",
        "/v1/credit/orders",
        key,
        json={"package_id": "pro"},
        headers={"Idempotency-Key": "o2"},
    )
    status, err = await api.call(
        "POST",
        f"/v1/credit/orders/{other['id']}/paid",
        data=body,
        headers={"X-Signature": sign(WEBHOOK_SECRET, body)},
    )
    assert status == 400
    wrong_amount = orjson.dumps({"order_id": order["id"], "amount": "0.01"})
    status, err = await api.call(
        "POST", paid, data=wrong_amount, headers={"X-Signature": sign(WEBHOOK_SECRET, wrong_amount)}
    )
    assert status == 409 and err["error"]["code"] == "payment_mismatch"

    # The webhook, delivered many times at once and again later: one grant.
    results = await asyncio.gather(
        *(
            api.call("POST", paid, data=body, headers={"X-Signature": sign(WEBHOOK_SECRET, body)})
            for _ in range(6)
        )
    )
    assert all(s == 200 for s, _ in results), results
    assert sum(r["granted"] for _, r in results) == 1
    assert {r["status"] for _, r in results} == {"paid"}
    status, replay = await api.call(
        "POST", paid, data=body, headers={"X-Signature": sign(WEBHOOK_SECRET, body)}
    )
    assert (status, replay["granted"], replay["balance"]) == (200, False, 5000)
    # The service-key path on the same order grants nothing more either.
    status, again = await api.call("POST", paid, SERVICE_KEY, json={})
    assert (status, again["granted"], again["balance"]) == (200, False, 5000)
    assert await _grants(api.engine, 5) == 1

    status, bal = await api.call("GET", "/v1/credit/balance", key)
    assert bal["balance"] == 5000 and bal["blocked"] is False
    status, hist = await api.call("GET", "/v1/credit/ledger", key)
    assert [(e["kind"], e["amount"]) for e in hist["entries"]] == [("grant", 5000)]
    # The Redis projection follows the grant (the guard's snapshot).
    snap = await api.redis.get(RedisKeys(api.prefix).snapshot(5))
    assert snap is not None and orjson.loads(snap)["available_credit"] == 5000

    # The amount is compared as a number ("9.000" is the order's 9.00), the currency
    # in any case.
    same = orjson.dumps({"order_id": other["id"], "amount": "9.000", "currency": "eur"})
    status, p2 = await api.call(
        "POST",
        f"/v1/credit/orders/{other['id']}/paid",
        data=same,
        headers={"X-Signature": sign(WEBHOOK_SECRET, same)},
    )
    assert (status, p2["granted"], p2["balance"]) == (200, True, 55000)
    # A service key on an order its webhook paid: nothing more.
    status, p2 = await api.call(
        "POST",
        f"/v1/credit/orders/{other['id']}/paid",
        SERVICE_KEY,
        json={"payment_reference": "manual"},
    )
    assert (status, p2["granted"], p2["balance"]) == (200, False, 55000)
    status, err = await api.call(
        "POST", "/v1/credit/orders/ord_000000000000000000000000/paid", SERVICE_KEY, json={}
    )
    assert status == 404


async def test_webhook_off_without_a_secret(start_credit_api: StartCreditApi) -> None:
    api = await start_credit_api(webhook_secret=None)
    key = await api.user_key(5)
    _, order = await api.call(
        "POST",
        "/v1/credit/orders",
        key,
        json={"package_id": "starter"},
        headers={"Idempotency-Key": "o1"},
    )
    body = orjson.dumps({"order_id": order["id"]})
    status, err = await api.call(
        "POST",
        f"/v1/credit/orders/{order['id']}/paid",
        data=body,
        headers={"X-Signature": sign("", body)},
    )
    assert status == 401 and "CREDIT_WEBHOOK_SECRET" in err["error"]["message"]


async def test_reward_rules_and_their_limits(start_credit_api: StartCreditApi) -> None:
    api = await start_credit_api()

    async def reward(rule: str, user: int, ref: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        return await api.call(
            "POST",
            f"/v1/credit/rewards/{rule}",
            SERVICE_KEY,
            json={"user_id": user, "reference": ref},
        )

    status, r = await reward("signup", 5, "account-5")
    assert (status, r["granted"], r["credits"], r["balance"]) == (201, True, 700, 700)
    status, r = await reward("signup", 5, "account-5")  # a replay
    assert (status, r["granted"], r["balance"]) == (200, False, 700)
    status, err = await reward("signup", 5, "another")  # once per user
    assert status == 409 and err["error"]["code"] == "reward_limit_reached"
    status, r = await reward("signup", 6, "account-6")
    assert status == 201

    assert (await reward("checkin", 5, "d1"))[0] == 201
    assert (await reward("checkin", 5, "d2"))[0] == 201
    assert (await reward("checkin", 5, "d3"))[0] == 409  # max_per_day: 2
    assert (await reward("checkin", 5, "d2"))[0] == 200  # a replay is not a new grant

    # Racing for the last slot: exactly one wins, on either database.
    results = await asyncio.gather(*(reward("lucky", 7, f"r{i}") for i in range(8)))
    assert sorted(s for s, _ in results) == [201] + [409] * 7
    assert (await api.call("GET", "/v1/credit/balance", SERVICE_KEY, headers={"X-User-Id": "7"}))[
        1
    ]["balance"] == 11

    status, err = await reward("nope", 5, "x")
    assert status == 404
    for body in (
        {"user_id": 0, "reference": "x"},
        {"user_id": "5x", "reference": "x"},
        {"user_id": 5},
        {"user_id": 5, "reference": ""},
    ):
        status, _ = await api.call("POST", "/v1/credit/rewards/signup", SERVICE_KEY, json=body)
        assert status == 400, body
    balance = (
        await api.call("GET", "/v1/credit/balance", SERVICE_KEY, headers={"X-User-Id": "5"})
    )[1]["balance"]
    assert balance == 700 + 2 * 30
    assert await _grants(api.engine, 5) == 3


async def test_history_pages_never_skip_or_repeat_while_entries_arrive(
    start_credit_api: StartCreditApi,
) -> None:
    api = await start_credit_api()
    book = Book(api.engine)
    key = await api.user_key(9)
    await grant(book, 9, 10**9, "start")
    await book.apply_charges([charge_event(9, i + 1) for i in range(60)])
    async with api.engine.connect() as conn:
        before = set(
            (await conn.execute(select(entries.c.id).where(entries.c.user_id == 9))).scalars()
        )

    stop = asyncio.Event()

    async def writer() -> int:
        n = 0
        while not stop.is_set():
            await book.apply_charges([charge_event(9, 1), charge_event(10, 1)])
            n += 1
            await asyncio.sleep(0)
        return n

    task = asyncio.create_task(writer())
    seen: list[int] = []
    cursor: str | None = None
    first = True
    while first or cursor:
        first = False
        query = "/v1/credit/ledger?limit=7" + (f"&cursor={cursor}" if cursor else "")
        status, page = await api.call("GET", query, key)
        assert status == 200
        seen += [e["id"] for e in page["entries"]]
        cursor = page["next_cursor"]
        await asyncio.sleep(0.01)
    stop.set()
    written = await task
    assert written > 0
    assert len(seen) == len(set(seen)), "an entry was repeated"
    assert seen == sorted(seen, reverse=True)
    # Every entry that existed when paging began is there; newer ones may be (page 1).
    assert before <= set(seen)
    assert set(seen) - before <= {i for i in seen if i > max(before)}


async def test_demo_route_pays_only_the_callers_own_order(start_credit_api: StartCreditApi) -> None:
    from proxy.contract.redis_keys import key_sha256

    api = await start_credit_api(demo=True, static_keys={key_sha256("sk-llmp-demo-x"): 42})
    key6 = await api.user_key(6)
    _, mine = await api.call(
        "POST",
        "/v1/credit/orders",
        "sk-llmp-demo-x",
        json={"package_id": "starter"},
        headers={"Idempotency-Key": "d"},
    )
    _, theirs = await api.call(
        "POST",
        "/v1/credit/orders",
        key6,
        json={"package_id": "starter"},
        headers={"Idempotency-Key": "d"},
    )
    status, _ = await api.call(
        "POST", f"/demo/orders/{theirs['id']}/simulate-payment", "sk-llmp-demo-x"
    )
    assert status == 403
    status, paid = await api.call(
        "POST", f"/demo/orders/{mine['id']}/simulate-payment", "sk-llmp-demo-x"
    )
    assert (status, paid["status"], paid["granted"], paid["balance"]) == (200, "paid", True, 5000)
    status, again = await api.call(
        "POST", f"/demo/orders/{mine['id']}/simulate-payment", "sk-llmp-demo-x"
    )
    assert (status, again["granted"], again["balance"]) == (200, False, 5000)


async def test_auth_mode_none_trusts_x_user_id_but_not_for_admin_actions(
    start_credit_api: StartCreditApi,
) -> None:
    from proxy.config.load import parse_auth

    api = await start_credit_api(auth=parse_auth({"mode": "none"}))
    await grant(Book(api.engine), 8, 80, "g8")
    status, bal = await api.call("GET", "/v1/credit/balance", headers={"X-User-Id": "8"})
    assert (status, bal["balance"]) == (200, 80)
    status, _ = await api.call("GET", "/v1/credit/balance", "sk-llmp-wrong")  # a key is checked
    assert status == 401
    status, _ = await api.call(
        "POST",
        "/v1/credit/rewards/signup",
        json={"user_id": 8, "reference": "x"},
        headers={"X-User-Id": "8"},
    )
    assert status == 403
