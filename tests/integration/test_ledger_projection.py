"""Redis as a projection of the database (real redis-server, SQLite and PostgreSQL):
what the ledger writes is what the guard reads; after Redis lost everything,
`llm-proxy ledger rebuild-projection` restores the guard's view; the snapshot API
answers from the books, so a user never seen is blocked."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.payer import BillingContext
from proxy.billing.snapshot_client import SnapshotClient
from proxy.config import EnvSettings, GuardConfig
from proxy.contract.redis_keys import RedisKeys, decode_snapshot
from proxy.ledger import cli as ledger_cli
from proxy.ledger.api import build_api
from proxy.ledger.book import Book, grant
from proxy.ledger.projection import Projection
from tests.fixtures_redis import RedisServer
from tests.ledger_events import charge_event


def guard_config(prefix: str) -> GuardConfig:
    # No local cache: each check reads Redis, which is what is under test.
    return GuardConfig(prefix=prefix, coalesce=False, budget_ms=5000, local_cache=False)


async def decisions(
    redis: Redis, prefix: str, users: list[int], provider: SnapshotClient | None = None
) -> dict[int, GuardDecision]:
    guard = CreditBalanceGuard(redis, guard_config(prefix), provider)
    try:
        return {
            u: await guard.check(BillingContext.normalize(user_id=u, scene="chat")) for u in users
        }
    finally:
        await guard.close()


async def fund(book: Book, projection: Projection) -> None:
    """31 keeps 7 credits, 32 spends all 5, 33 was never granted anything."""
    for user, amount in ((31, 10), (32, 5)):
        await grant(book, user, amount, f"g{user}")
    result = await book.apply_charges(
        [charge_event(31, 3), charge_event(32, 5), charge_event(33, 4)]
    )
    await projection.write(result.balances.items())


async def test_the_guard_reads_what_the_ledger_projects(
    ledger_engine: AsyncEngine, redis_client: Redis, redis_prefix: str
) -> None:
    book, projection = Book(ledger_engine), Projection(redis_client, redis_prefix)
    await fund(book, projection)
    keys = RedisKeys(redis_prefix)
    raw = await redis_client.get(keys.snapshot(33))
    assert raw is not None and decode_snapshot(raw) == -4
    assert await decisions(redis_client, redis_prefix, [31, 32, 33]) == {
        31: GuardDecision.ALLOW,
        32: GuardDecision.BLOCK,
        33: GuardDecision.BLOCK,
    }
    change = await grant(book, 32, 1, "top-up")
    await projection.write([(32, change.balance)])
    assert (await decisions(redis_client, redis_prefix, [32]))[32] == GuardDecision.ALLOW


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-proxy")
    ledger_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args, EnvSettings.from_env({})))


async def test_rebuild_projection_restores_the_guard_view_after_redis_lost_it(
    ledger_engine: AsyncEngine,
    ledger_url: str,
    redis_server: RedisServer,
    redis_client: Redis,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fund(Book(ledger_engine), Projection(redis_client, redis_prefix))
    before = await decisions(redis_client, redis_prefix, [31, 32, 33])
    # The Redis loss: a real FLUSHALL on the server this session owns; on a shared
    # external one (REDIS_URL) only this test's keys.
    if redis_server.external:
        async for key in redis_client.scan_iter(match=f"{redis_prefix}*"):
            await redis_client.delete(key)
    else:
        await redis_client.flushall()
    # A stale block the guard set for a user who has credit is lifted by the rebuild.
    await redis_client.set(RedisKeys(redis_prefix).blocked(31), b"snapshot", ex=300)
    lost = await decisions(redis_client, redis_prefix, [32, 33])
    assert lost == {32: GuardDecision.ALLOW, 33: GuardDecision.ALLOW}  # no evidence: allowed

    argv = ["ledger", "rebuild-projection", "--json", "--database-url", ledger_url]
    argv += ["--redis-url", redis_server.url, "--prefix", redis_prefix]
    assert await asyncio.to_thread(run_cli, argv) == 0
    assert orjson.loads(capsys.readouterr().out) == {"users": 3}
    assert await decisions(redis_client, redis_prefix, [31, 32, 33]) == before


@pytest.fixture
async def snapshot_api(ledger_engine: AsyncEngine) -> AsyncIterator[str]:
    server = TestServer(build_api(ledger_engine), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_snapshot_api_answers_from_the_books(
    ledger_engine: AsyncEngine, snapshot_api: str
) -> None:
    await grant(Book(ledger_engine), 41, 12, "g")
    async with aiohttp.ClientSession() as http:
        for path, status, body in (
            ("/users/41/credit-snapshot", 200, {"balance": 12, "is_blocked": False}),
            ("/users/42/credit-snapshot", 200, {"balance": 0, "is_blocked": True}),
            ("/users/0/credit-snapshot", 400, None),
            ("/users/abc/credit-snapshot", 400, None),
            ("/users/99999999999999999999/credit-snapshot", 400, None),
            ("/healthz", 200, {"status": "ok"}),
        ):
            async with http.get(snapshot_api + path) as resp:
                assert resp.status == status, path
                if body is not None:
                    assert await resp.json() == body


async def test_a_user_never_seen_is_blocked_by_the_guard_through_the_api(
    ledger_engine: AsyncEngine, snapshot_api: str, redis_client: Redis, redis_prefix: str
) -> None:
    await grant(Book(ledger_engine), 51, 3, "g")
    async with aiohttp.ClientSession() as http:
        provider = SnapshotClient(snapshot_api, 5.0, http)
        got = await decisions(redis_client, redis_prefix, [51, 52], provider)
    assert got == {51: GuardDecision.ALLOW, 52: GuardDecision.BLOCK}
