"""Admission that holds under concurrency (guard.mode: reserve) against real servers:
redis-server and the 3-node Redis Cluster, the embedded ledger on SQLite and
PostgreSQL, real `llm-proxy serve` processes. README "Credit guard" names these as
the tests that hold the overdraft bound."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.billing.estimate import Estimate, estimate_request
from proxy.config import load_config
from proxy.contract.redis_keys import RedisKeys, decode_hold, decode_snapshot, key_sha256
from proxy.devtools.fake_upstream import Behaviour, build_fake_app
from proxy.ledger.apikeys import ApiKeyStore
from proxy.ledger.book import Book, grant
from proxy.ledger.embedded import open_embedded_ledger
from proxy.ledger.reads import Reader
from proxy.server.chat_request import parse_chat_request
from tests.fixtures_proxy import SERVICE_KEY, ProxyHarness, StartProxy
from tests.fixtures_redis import RedisServer, fund
from tests.servers import free_port

# 10 credits a token: one call costs ~160 credits, its estimate ~450.
REQ = {
    "model": "premium",
    "messages": [{"role": "user", "content": "what do figs cost?"}],
    "max_tokens": 16,
}


# A clamping alias at REQ's price: served with a lower output limit when the credit
# left affords at least 8 output tokens.
THRIFTY = (
    "  thrifty: {provider: fake, model: fake-model-pro, price_rule: premium,"
    " on_insufficient: clamp, clamp_min_tokens: 8}\n"
)


def estimate_of(h: ProxyHarness, body: dict[str, Any]) -> Estimate:
    return estimate_request(parse_chat_request(dict(body), h.config.aliases, started_ms=0))


async def concurrent(
    proxies: list[ProxyHarness], n: int, user: int, body: dict[str, Any] = REQ
) -> list[int]:
    async def one(i: int) -> int:
        h = proxies[i % len(proxies)]
        status, _, _ = await h.chat({**body, "stream": i % 2 == 0}, h.headers(user_id=user))
        return status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def holds(client: Any, prefix: str, user: int) -> dict[str, tuple[int, int]]:
    raw = await client.hgetall(RedisKeys(prefix).holds(user))
    return {k.decode(): decode_hold(v) for k, v in raw.items()}  # type: ignore[misc]


async def wait_no_holds(client: Any, prefix: str, user: int) -> None:
    for _ in range(300):
        if not await holds(client, prefix, user):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"holds left: {await holds(client, prefix, user)}")


async def reserving_proxy(
    start_proxy: StartProxy,
    redis_target: tuple[str, bool, str],
    *,
    ledger_url: str | None = None,
    **kw: Any,
) -> ProxyHarness:
    url, is_cluster, prefix = redis_target
    overrides: dict[str, Any] = {"redis_cluster": is_cluster}
    if ledger_url is not None:
        overrides["ledger_database_url"] = ledger_url
    return await start_proxy(
        redis_url=url,
        guard_prefix=prefix,
        # A generous budget: 50 first calls at once open 50 Redis connections on a
        # busy test machine, and a fail-open would serve them (a policy, tested in
        # test_guard_redis.py); here the question is what the reservations decide.
        guard={"budget_ms": 5000, **kw.pop("guard", {})},
        settings_overrides=overrides,
        embedded_ledger=open_embedded_ledger if ledger_url is not None else None,
        behaviour=Behaviour(chunks=8, chunk_delay=0.01, first_byte_delay=0.05),
        **kw,
    )


async def test_fifty_concurrent_calls_on_credit_for_one_serve_exactly_one(
    start_proxy: StartProxy,
    redis_target: tuple[str, bool, str],
    target_client: Any,
    ledger_url: str,
    ledger_engine: AsyncEngine,
) -> None:
    h = await reserving_proxy(start_proxy, redis_target, ledger_url=ledger_url)
    est = estimate_of(h, REQ)
    user = 31
    await grant(Book(ledger_engine), user, est.credits, "one call")
    statuses = await concurrent([h], 50, user)
    assert statuses.count(200) == 1, statuses
    assert statuses.count(402) == 49
    await h.flush_events()
    account = await Reader(ledger_engine).account(user)
    charged = account.lifetime_charged
    assert 0 < charged <= est.credits  # the estimate bounds the charge ...
    assert account.balance >= -(charged - est.credits)  # ... so nothing is overdrawn
    # The ledger released the hold in the step that wrote the new balance.
    prefix = redis_target[2]
    await wait_no_holds(target_client, prefix, user)
    snap = await target_client.get(RedisKeys(prefix).snapshot(user))
    assert decode_snapshot(snap) == account.balance


async def test_two_proxies_sharing_redis_serve_exactly_one(
    start_proxy: StartProxy, redis_target: tuple[str, bool, str], target_client: Any
) -> None:
    """Two independent proxies (each its own guard, pools and cache) against one Redis."""
    a = await reserving_proxy(start_proxy, redis_target)
    b = await reserving_proxy(start_proxy, redis_target)
    est = estimate_of(a, REQ)
    user = 32
    await fund(target_client, redis_target[2], user, credit=est.credits)
    statuses = await concurrent([a, b], 50, user)
    assert statuses.count(200) == 1, statuses
    assert statuses.count(402) == 49


async def test_back_to_back_calls_overdraw_at_most_one_estimate_error(
    start_proxy: StartProxy,
    redis_target: tuple[str, bool, str],
    ledger_url: str,
    ledger_engine: AsyncEngine,
) -> None:
    """A fast upstream and calls one after another; the alias reserves 2 output
    tokens where the upstream sends ~40 (an estimate error), so the ledger's debits lag
    and the estimates undershoot: the overdraft stays within one request's error."""
    h = await reserving_proxy(
        start_proxy,
        redis_target,
        ledger_url=ledger_url,
        extra_aliases=(
            "  tight: {provider: fake, model: fake-model-pro, price_rule: premium,"
            " reserve_output_tokens: 2}\n"
        ),
    )
    h.behaviour.first_byte_delay = h.behaviour.chunk_delay = 0.0
    h.behaviour.chunks = 40
    body = {"model": "tight", "messages": REQ["messages"]}
    est = estimate_of(h, body)
    user = 33
    await grant(Book(ledger_engine), user, 5 * est.credits, "a few calls")
    served, errors = 0, []
    for _ in range(100):
        status, _, _ = await h.chat(body, h.headers(user_id=user))
        if status == 402:
            break
        assert status == 200
        served += 1
    else:
        raise AssertionError("never refused")
    await h.flush_events()
    reader = Reader(ledger_engine)
    entries = (await reader.history(user, limit=100)).entries
    charges = [-e.amount for e in entries if e.kind == "charge"]
    assert len(charges) == served >= 2
    errors = [c - est.credits for c in charges]
    assert max(errors) > 0  # the test does exercise an estimate error
    account = await reader.account(user)
    assert account.balance >= -max(errors)


async def test_a_never_granted_user_key_is_refused_on_its_first_call(
    start_proxy: StartProxy,
    redis_target: tuple[str, bool, str],
    target_client: Any,
    ledger_url: str,
) -> None:
    h = await reserving_proxy(start_proxy, redis_target, ledger_url=ledger_url)
    h.behaviour.first_byte_delay = 0.0
    prefix = redis_target[2]
    key = (await ApiKeyStore(target_client, prefix=prefix).create(34)).api_key
    status, body, _ = await h.chat(REQ, {"Authorization": f"Bearer {key}"})
    assert status == 402 and isinstance(body, dict)
    assert body["error"]["code"] == "credit_balance_insufficient"
    assert "0 credits available" in body["error"]["message"]
    assert h.recorder.requests == []


async def test_clamp_mode_lowers_the_output_limit_and_serves(
    start_proxy: StartProxy, redis_target: tuple[str, bool, str], target_client: Any
) -> None:
    h = await reserving_proxy(
        start_proxy,
        redis_target,
        extra_aliases=THRIFTY,
    )
    body = {**REQ, "model": "thrifty", "max_tokens": 1000}
    est = estimate_of(h, body)
    user = 35
    # Enough for the prompt bound and 40 output tokens, far from the 1000 asked for.
    credit = est.credits - (1000 - 40) * 10
    await fund(target_client, redis_target[2], user, credit=credit)
    status, _, _ = await h.chat(body, h.headers(user_id=user))
    assert status == 200
    sent = h.recorder.requests[-1]["body"]
    assert sent["max_tokens"] == 40 and "max_completion_tokens" not in sent
    # Not even clamp_min_tokens affordable: refused.
    await fund(target_client, redis_target[2], user, credit=est.credits - (1000 - 4) * 10)
    # No ledger here to apply the first call's charge and release its settled hold.
    await target_client.delete(RedisKeys(redis_target[2]).holds(user))
    status, _, _ = await h.chat(body, h.headers(user_id=user))
    assert status == 402


async def test_reservation_metrics(
    start_proxy: StartProxy, redis_server: RedisServer, redis_client: Any, redis_prefix: str
) -> None:
    from tests.integration.test_observability import scrape, value

    h = await reserving_proxy(start_proxy, (redis_server.url, False, redis_prefix))
    est = estimate_of(h, REQ)
    await fund(redis_client, redis_prefix, 36, credit=est.credits)
    assert sorted(await concurrent([h], 3, 36)) == [200, 402, 402]
    got = await scrape(h)
    assert value(got, "llm_proxy_reservations_total", result="admitted") == 1
    assert value(got, "llm_proxy_reservations_total", result="refused") == 2
    assert value(got, "llm_proxy_credit_held") == 0  # nothing in flight


SERVE_YAML = """
providers:
  fake: {{base_url: "http://127.0.0.1:{port}/v1", stream_usage: true}}
price_rules:
  premium: {{input: 10000000, output: 10000000}}
aliases:
  premium: {{provider: fake, model: fake-model-pro, price_rule: premium}}
auth:
  service_keys:
    - {{name: svc, sha256: "{sha}", scenes: ["*"], may_skip_charge: false}}
guard: {{prefix: "{prefix}", hold_ttl_s: {ttl}, budget_ms: 5000}}
"""


async def serve(tmp_path: Path, name: str, config: Path, env: dict[str, str]) -> tuple[Any, int]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "proxy", "serve", "--config", str(config), "--port", str(port)),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=open(tmp_path / f"{name}.log", "ab"),  # noqa: SIM115
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return proc, port
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("proxy did not start: " + (tmp_path / f"{name}.log").read_text())


async def test_two_serve_processes_and_a_sigkill_mid_request(
    tmp_path: Path, redis_server: RedisServer, redis_client: Any, redis_prefix: str
) -> None:
    """Real `llm-proxy serve` processes sharing Redis: concurrent calls across both
    serve exactly one; then one is SIGKILLed mid-stream, its hold stays (the credit
    is not free while the killed request might still be billed) until hold_ttl_s,
    then it expires and the other process serves the user again."""
    fake = TestServer(build_fake_app(Behaviour(chunks=400, chunk_delay=0.01)), host="127.0.0.1")
    await fake.start_server()
    config = tmp_path / "aliases.yaml"
    config.write_text(
        SERVE_YAML.format(port=fake.port, sha=key_sha256(SERVICE_KEY), prefix=redis_prefix, ttl=3)
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    env.update(REDIS_URL=redis_server.url, LLM_PROXY_EMBEDDED_LEDGER="false")
    procs = []
    try:
        for name in ("a", "b"):
            env_one = {
                **env,
                "LLM_PROXY_OUTBOX_PATH": str(tmp_path / f"outbox-{name}.sqlite3"),
                "LLM_PROXY_SINK_PATH": str(tmp_path / f"events-{name}.jsonl"),
            }
            procs.append(await serve(tmp_path, name, config, env_one))
        user, headers = 37, {"Authorization": f"Bearer {SERVICE_KEY}", "X-User-Id": "37"}
        body = {**REQ, "stream": True}
        async with aiohttp.ClientSession() as s:

            async def call(port: int, rid: str) -> int:
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    data=orjson.dumps(body),
                    headers={**headers, "X-Request-Id": rid, "Content-Type": "application/json"},
                ) as r:
                    await r.read()
                    return r.status

            cfg = load_config(config, env={})
            est = estimate_request(
                parse_chat_request(dict(body), cfg.aliases, started_ms=0)
            ).credits
            # Credit for one estimate: whenever the others come, it is held or spent.
            await fund(redis_client, redis_prefix, user, credit=est)
            statuses = await asyncio.gather(*(call(procs[i % 2][1], f"c{i}") for i in range(50)))
            assert statuses.count(200) == 1 and statuses.count(402) == 49, statuses
            # The served call is settled: its hold is the charge, kept (no ledger here).
            await redis_client.delete(RedisKeys(redis_prefix).holds(user))
            await fund(redis_client, redis_prefix, user, credit=est + est // 2)

            # SIGKILL process a while it streams a reply.
            killed, port_a = procs[0]
            async with s.post(
                f"http://127.0.0.1:{port_a}/v1/chat/completions",
                data=orjson.dumps(body),
                headers={**headers, "X-Request-Id": "doomed", "Content-Type": "application/json"},
            ) as r:
                assert r.status == 200
                await r.content.readany()
                killed.send_signal(signal.SIGKILL)
                await killed.wait()
            left = await holds(redis_client, redis_prefix, user)
            assert set(left) == {"doomed"}
            # Meanwhile the credit is not free: the other process refuses.
            assert await call(procs[1][1], "while-held") == 402
            await asyncio.sleep(3.2)  # hold_ttl_s
            assert await call(procs[1][1], "after-expiry") == 200
            assert "doomed" not in await holds(redis_client, redis_prefix, user)
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
        await fake.close()


async def test_without_redis_the_books_hold_reservations_in_process(
    start_proxy: StartProxy, ledger_url: str, ledger_engine: AsyncEngine
) -> None:
    from proxy.billing.books_guard import BooksGuard

    h = await start_proxy(
        settings_overrides={"ledger_database_url": ledger_url},
        embedded_ledger=open_embedded_ledger,
        behaviour=Behaviour(chunks=8, chunk_delay=0.01, first_byte_delay=0.05),
        guard={"budget_ms": 5000},
    )
    guard = h.state.guard
    assert isinstance(guard, BooksGuard)
    est = estimate_of(h, REQ)
    user = 38
    await grant(Book(ledger_engine), user, est.credits, "one call")
    statuses = await concurrent([h], 50, user)
    assert statuses.count(200) == 1 and statuses.count(402) == 49, statuses
    await h.flush_events()
    account = await Reader(ledger_engine).account(user)
    assert 0 < account.lifetime_charged <= est.credits and account.balance >= 0
    assert guard.held(user) == 0  # the sink released the hold with the debit
    # What is left is free again at once: a cheap call fits.
    status, _, _ = await h.chat({**REQ, "max_tokens": 1}, h.headers(user_id=user))
    assert status == (
        200 if account.balance >= estimate_of(h, {**REQ, "max_tokens": 1}).credits else 402
    )


async def test_the_real_stack_kafka_ledger_projection_serves_exactly_one(
    start_proxy: StartProxy,
    redis_target: tuple[str, bool, str],
    target_client: Any,
    kafka_broker: Any,
    kafka_topic: str,
    ledger_engine: AsyncEngine,
) -> None:
    """Proxy -> outbox -> Kafka -> ledger consumer (SQLite/PostgreSQL) -> projection:
    50 concurrent calls on credit for one estimate; the consumer debits the one served
    and releases its hold in the script that rewrites the balance."""
    from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
    from proxy.ledger.projection import Projection
    from tests.integration.test_ledger_end_to_end import wait_applied

    h = await reserving_proxy(
        start_proxy, redis_target, kafka_bootstrap=kafka_broker.bootstrap, topic=kafka_topic
    )
    prefix = redis_target[2]
    book, projection = Book(ledger_engine), Projection(target_client, prefix)
    consumer = LedgerConsumer(
        LedgerSettings(
            topic=kafka_topic,
            bootstrap=kafka_broker.bootstrap,
            group_id=f"ledger-{kafka_topic}",
            idempotent_producer=kafka_broker.supports_idempotence,
            session_timeout_ms=3000,
            rebalance_timeout_ms=500,
        ),
        book,
        projection,
    )
    task = asyncio.create_task(consumer.run())
    try:
        est = estimate_of(h, REQ)
        user = 39
        change = await grant(book, user, est.credits, "one call")
        await projection.write([(user, change.balance)])  # what `credits grant` does
        statuses = await concurrent([h], 50, user)
        assert statuses.count(200) == 1 and statuses.count(402) == 49, statuses
        await wait_applied(consumer, 1)
        await wait_no_holds(target_client, prefix, user)
        account = await Reader(ledger_engine).account(user)
        assert 0 < account.lifetime_charged <= est.credits
        assert account.balance >= -(account.lifetime_charged - est.credits)
        snap = await target_client.get(RedisKeys(prefix).snapshot(user))
        assert decode_snapshot(snap) == account.balance
    finally:
        consumer.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


async def test_script_batcher_sends_one_tick_as_one_pipeline_and_reloads_scripts(
    redis_client: Any, redis_prefix: str
) -> None:
    from proxy.billing.script_batcher import ScriptBus

    bus = ScriptBus(redis_client)
    batcher = bus.register("return {KEYS[1], ARGV[1]}", 5.0)
    other = bus.register("return {'other', KEYS[1], ARGV[1], ARGV[2]}", 5.0)
    await redis_client.script_flush()  # a restarted Redis: the first batch gets NOSCRIPT
    keys = [f"{redis_prefix}k{i}" for i in range(5)]
    futs = [batcher.submit([k], [str(i)]) for i, k in enumerate(keys)]
    mixed = other.submit([keys[1]], ["x", "y"])  # another script, the same command
    replies = await asyncio.gather(*futs)
    assert [[r[0].decode(), r[1].decode()] for r in replies] == [
        [k, str(i)] for i, k in enumerate(keys)
    ]
    assert await mixed == [b"other", keys[1].encode(), b"x", b"y"]
    assert (await batcher.submit([keys[0]], ["lone"]))[1] == b"lone"
    await redis_client.script_flush()
    assert (await other.submit([keys[0]], ["lone", "2"]))[3] == b"2"  # a lone call reloaded
    assert bus.pending == 0
    await bus.close(1.0)


async def test_script_batcher_keeps_each_calls_reply_and_error_apart(
    redis_client: Any, redis_prefix: str
) -> None:
    """One wrapper call carries the tick's calls: each gets its own reply, a call
    that fails (an error reply, a Lua error, a Redis error) fails alone, nil stays nil."""
    from redis.exceptions import ResponseError

    from proxy.billing.script_batcher import ScriptBus

    bus = ScriptBus(redis_client)
    batcher = bus.register(
        """
if ARGV[1] == 'reply' then return redis.error_reply('refused here') end
if ARGV[1] == 'lua' then error('broken') end
if ARGV[1] == 'redis' then return redis.call('INCR', KEYS[1]) end
if ARGV[1] == 'nil' then return nil end
return {KEYS[1], ARGV[1], #KEYS, #ARGV}
""",
        5.0,
    )
    text = f"{redis_prefix}text"
    await redis_client.set(text, "not a number")
    calls = [
        ([f"{redis_prefix}a"], ["ok"]),
        ([f"{redis_prefix}b"], ["reply"]),
        ([f"{redis_prefix}c", f"{redis_prefix}d"], ["ok", "x", "y"]),
        ([f"{redis_prefix}e"], ["lua"]),
        ([text], ["redis"]),
        ([f"{redis_prefix}f"], ["nil"]),
    ]
    replies = await asyncio.gather(
        *(batcher.submit(k, a) for k, a in calls), return_exceptions=True
    )
    assert replies[0] == [f"{redis_prefix}a".encode(), b"ok", 1, 1]
    assert isinstance(replies[1], ResponseError) and "refused here" in str(replies[1])
    assert replies[2] == [f"{redis_prefix}c".encode(), b"ok", 2, 3]
    assert isinstance(replies[3], ResponseError) and "broken" in str(replies[3])
    assert isinstance(replies[4], ResponseError)
    assert replies[5] is None
    await bus.close(1.0)


async def test_script_batcher_groups_a_ticks_calls_by_slot(
    redis_target: tuple[str, bool, str], target_client: Any
) -> None:
    """On the cluster, one wrapper call per slot (sent concurrently); one node: one."""
    from proxy.billing.script_batcher import ScriptBus

    prefix = redis_target[2]
    bus = ScriptBus(target_client)
    batcher = bus.register("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[2])}", 5.0)
    # A fresh cluster client's first commands, concurrent, can race inside redis-py
    # while it connects (a connection's writer still None): the proxy loads its
    # scripts at start-up, before any request; so does this test.
    for script in bus.scripts:
        await target_client.script_load(script.script)
    calls = [
        ([f"{prefix}a:{{{u}}}", f"{prefix}n:{{{u}}}"], [str(i)])
        for i, u in enumerate([1, 2, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    ]
    replies = await asyncio.gather(*(batcher.submit(k, a) for k, a in calls))
    assert [(r[0].decode(), r[1].decode()) for r in replies] == [(k[0], a[0]) for k, a in calls]
    assert [r[2] for r in replies][:6] == [1, 1, 1, 2, 2, 2]
    await bus.close(1.0)
    await target_client.delete(*(k for keys, _ in calls for k in keys))


async def test_a_request_id_in_use_is_409_and_leaves_the_first_hold_alone(
    start_proxy: StartProxy, redis_server: RedisServer, redis_client: Any, redis_prefix: str
) -> None:
    h = await reserving_proxy(start_proxy, (redis_server.url, False, redis_prefix))
    h.behaviour.first_byte_delay = 0.5  # the first request is still in flight
    await fund(redis_client, redis_prefix, 40)
    headers = h.headers(user_id=40, **{"X-Request-Id": "same-id"})
    first = asyncio.create_task(h.chat(REQ, headers))
    for _ in range(200):
        if "same-id" in await holds(redis_client, redis_prefix, 40):
            break
        await asyncio.sleep(0.01)
    status, body, _ = await h.chat(REQ, headers)
    assert status == 409 and isinstance(body, dict)
    assert body["error"]["code"] == "request_id_in_use"
    await asyncio.sleep(0.05)  # the refused request's end has run
    assert "same-id" in await holds(redis_client, redis_prefix, 40)  # still the first's
    assert (await first)[0] == 200
