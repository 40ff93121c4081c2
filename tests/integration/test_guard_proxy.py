"""The credit guard and API keys in front of the upstream, through the proxy, against
a real redis-server (issue 2 acceptance)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.contract.redis_keys import RedisKeys
from proxy.ledger.apikeys import ApiKeyStore
from tests.fixtures_proxy import SERVICE_KEY, StartProxy

REQ = {"model": "smart", "messages": [{"role": "user", "content": "hi"}]}
CHECK_MODE = {"mode": "check"}  # the original pre-check (for the tests of it)


def snapshot(credit: int) -> bytes:
    return orjson.dumps({"available_credit": credit, "updated_at": "2026-11-25T00:00:00Z"})


async def guarded(start_proxy, redis_server, redis_prefix, **kw):
    return await start_proxy(redis_url=redis_server.url, guard_prefix=redis_prefix, **kw)


async def test_blocked_key_is_402_without_upstream_call(
    start_proxy: StartProxy, redis_server, redis_client, redis_prefix: str
) -> None:
    h = await guarded(start_proxy, redis_server, redis_prefix)
    await redis_client.set(RedisKeys(redis_prefix).blocked(7), b"1")
    await redis_client.set(RedisKeys(redis_prefix).snapshot(7), snapshot(1000))
    for stream in (False, True):
        status, body, headers = await h.chat({**REQ, "stream": stream})
        assert status == 402
        assert body["error"]["type"] == "insufficient_quota"
        assert body["error"]["code"] == "credit_balance_insufficient"
        assert headers["X-Request-Id"]
    assert h.recorder.requests == []
    await h.flush_events()
    assert h.sink_events() == []


async def test_positive_snapshot_is_served(
    start_proxy: StartProxy, redis_server, redis_client, redis_prefix: str
) -> None:
    h = await guarded(start_proxy, redis_server, redis_prefix)
    await redis_client.set(RedisKeys(redis_prefix).snapshot(7), snapshot(50))
    status, _, _ = await h.chat(REQ)
    assert status == 200
    assert len(h.recorder.requests) == 1


async def test_exhausted_snapshot_blocks_and_sets_blocked_key_with_ttl(
    start_proxy: StartProxy, redis_server, redis_client, redis_prefix: str
) -> None:
    h = await guarded(
        start_proxy, redis_server, redis_prefix, extra_yaml=""
    )  # guard.blocked_ttl_s default 300
    await redis_client.set(RedisKeys(redis_prefix).snapshot(7), snapshot(0))
    status, _, _ = await h.chat(REQ)
    assert status == 402
    ttl = await redis_client.ttl(RedisKeys(redis_prefix).blocked(7))
    assert 290 <= ttl <= 300
    assert h.recorder.requests == []


async def test_missing_snapshot_consults_provider_once_and_backfills(
    start_proxy: StartProxy, redis_server, redis_client, redis_prefix: str
) -> None:
    calls: list[str] = []

    async def snapshot_endpoint(request: web.Request) -> web.Response:
        calls.append(request.match_info["uid"])
        await asyncio.sleep(0.01)
        return web.json_response({"balance": 500, "is_blocked": False})

    app = web.Application()
    app.router.add_get("/users/{uid}/credit-snapshot", snapshot_endpoint)
    provider = TestServer(app, host="127.0.0.1")
    await provider.start_server()
    try:
        h = await guarded(
            start_proxy,
            redis_server,
            redis_prefix,
            credit_snapshot_url=f"http://127.0.0.1:{provider.port}",
        )
        results = await asyncio.gather(*(h.chat(REQ) for _ in range(5)))
        assert [r[0] for r in results] == [200] * 5
        assert calls == ["7"]
        stored = orjson.loads(await redis_client.get(RedisKeys(redis_prefix).snapshot(7)))
        assert stored["available_credit"] == 500
        assert await redis_client.exists(RedisKeys(redis_prefix).blocked(7)) == 0
    finally:
        await provider.close()


async def test_redis_stopped_fails_open_then_recovers(
    start_proxy: StartProxy, redis_server, redis_client, redis_prefix: str
) -> None:
    if redis_server.external:
        pytest.skip("stops the server; REDIS_URL points at an external one")
    h = await guarded(start_proxy, redis_server, redis_prefix)
    await redis_client.set(RedisKeys(redis_prefix).blocked(7), b"1")
    assert (await h.chat(REQ))[0] == 402
    redis_server.stop()
    try:
        # Until the guard cache has seen its link drop (a loop round or so), the
        # decision it holds may still be served; after that every check goes to Redis.
        cache = h.state.guard.cache  # type: ignore[union-attr]
        for _ in range(200):
            if not cache.live:
                break
            await asyncio.sleep(0.01)
        assert not cache.live
        for _ in range(3):
            status, _, _ = await h.chat(REQ)
            assert status == 200  # fail open: Redis trouble never stops the call
        assert h.recorder.requests  # upstream was called
    finally:
        redis_server.start()
    # Same proxy, no restart: the guard reads Redis again (the blocked key died with the
    # server's memory, so block the user anew, over a fresh connection).
    fresh = aioredis.Redis.from_url(redis_server.url)
    await fresh.set(RedisKeys(redis_prefix).blocked(7), b"1")
    await fresh.aclose()
    for _ in range(50):
        if (await h.chat(REQ))[0] == 402:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("guard did not recover after Redis came back")


async def test_user_key_pays_for_itself_and_cannot_act_for_others(
    start_proxy: StartProxy, redis_server, redis_client, redis_prefix: str
) -> None:
    h = await guarded(start_proxy, redis_server, redis_prefix)
    for user in (55, 56):  # reserve mode: a user without a snapshot has no credit
        await redis_client.set(RedisKeys(redis_prefix).snapshot(user), snapshot(10**6))
    created = await ApiKeyStore(redis_client, prefix=redis_prefix).create(55)
    user = {"Authorization": f"Bearer {created.api_key}"}
    status, _, _ = await h.chat(REQ, user)
    assert status == 200
    status, body, _ = await h.chat(REQ, {**user, "X-User-Id": "56"})
    assert status == 403 and body["error"]["code"] == "permission_denied"
    status, body, _ = await h.chat(REQ, {**user, "X-Skip-Charge": "true"})
    assert status == 403
    status, body, _ = await h.chat(REQ, {"Authorization": "Bearer sk-not-a-key"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = await h.chat(REQ, {"X-Nothing": "no key at all"})
    assert status == 401
    # A service key acts for another user, and may skip the charge.
    status, _, _ = await h.chat(
        REQ,
        {"Authorization": f"Bearer {SERVICE_KEY}", "X-User-Id": "56", "X-Billing-Scene": "Agent"},
    )
    assert status == 200
    await h.flush_events()
    events = await h.wait_events(2)
    assert [(e["user_id"], e["scene"]) for e in events] == [(55, "unknown"), (56, "agent")]
    # Keys never reach the upstream.
    assert all(
        created.api_key not in str(r["headers"]) and SERVICE_KEY not in str(r["headers"])
        for r in h.recorder.requests
    )


async def test_cached_guard_serves_then_sees_a_block(
    start_proxy: StartProxy, redis_server, redis_client, redis_prefix: str
) -> None:
    """Through the proxy with the local guard cache (on by default): repeated
    requests are decided from the cache (metrics say so), and a block written
    to Redis afterwards still stops the next requests before the upstream."""
    from tests.integration.test_observability import scrape, value

    h = await guarded(start_proxy, redis_server, redis_prefix, guard=CHECK_MODE)
    guard = h.state.guard
    assert guard is not None and guard.cache is not None
    for _ in range(300):
        if guard.cache.live:
            break
        await asyncio.sleep(0.01)
    assert guard.cache.live
    await redis_client.set(RedisKeys(redis_prefix).snapshot(7), snapshot(10**6))
    for _ in range(10):
        status, _, _ = await h.chat(REQ)
        assert status == 200
    got = await scrape(h)
    assert value(got, "llm_proxy_guard_cache_live") == 1
    hits = value(got, "llm_proxy_guard_cache_lookups_total", result="hit")
    misses = value(got, "llm_proxy_guard_cache_lookups_total", result="miss")
    assert hits is not None and misses is not None
    assert hits + misses == 10 and hits >= 8  # the setup write may cost a second miss

    await redis_client.set(RedisKeys(redis_prefix).blocked(7), b"ledger")
    served = len(h.recorder.requests)
    statuses = []
    for _ in range(100):  # the invalidation travels one hop, like a read would
        status, _, _ = await h.chat(REQ)
        statuses.append(status)
        if status == 402:
            break
        await asyncio.sleep(0.01)
    assert statuses[-1] == 402
    assert len(h.recorder.requests) == served + len(statuses) - 1
    status, _, _ = await h.chat({**REQ, "stream": True})
    assert status == 402
