"""The guard, the ledger's projection and the API key store against a real 3-node
Redis Cluster: the hash-tagged keys keep each user's two credit keys in one slot, so
the guard's MGET and scripts and the projection's pipelines work across the nodes."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import redis
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.payer import BillingContext
from proxy.billing.snapshot_client import SnapshotClient
from proxy.config import EnvSettings, GuardConfig
from proxy.contract.redis_keys import RedisKeys, decode_snapshot
from proxy.ledger import cli as ledger_cli
from proxy.ledger.api import build_api
from proxy.ledger.apikeys import ApiKeyStore
from proxy.ledger.book import Book, grant
from proxy.ledger.projection import Projection
from proxy.ledger.reads import Reader
from tests.fixtures_redis_cluster import RedisClusterServers
from tests.ledger_events import charge_event

USERS = list(range(1, 41))  # enough users to land on every node


def guard(client: RedisCluster, prefix: str, provider: SnapshotClient | None = None):
    # One MGET per check and no invalidation subscription: both are per-node matters
    # a cluster client does not do (the keys of one check share a slot).
    config = GuardConfig(prefix=prefix, coalesce=False, local_cache=False, budget_ms=5000)
    return CreditBalanceGuard(client, config, provider)  # type: ignore[arg-type]


async def check(g: CreditBalanceGuard, user: int) -> GuardDecision:
    return await g.check(BillingContext.normalize(user_id=user, scene="chat"))


@pytest.fixture
async def funded(ledger_engine: AsyncEngine) -> AsyncIterator[dict[int, int]]:
    """Even users keep credit, odd users spent it all."""
    book = Book(ledger_engine)
    for u in USERS:
        await grant(book, u, 10, f"g{u}")
    result = await book.apply_charges([charge_event(u, 10 if u % 2 else 4) for u in USERS])
    yield dict(result.balances)


async def test_projection_and_guard_across_the_cluster(
    ledger_engine: AsyncEngine,
    funded: dict[int, int],
    cluster_client: RedisCluster,
    cluster_prefix: str,
) -> None:
    keys = RedisKeys(cluster_prefix)
    slots = {cluster_client.keyslot(keys.snapshot(u)) for u in USERS}
    nodes = {cluster_client.get_node_from_key(keys.snapshot(u)).name for u in USERS}
    assert len(nodes) == 3 and len(slots) > 3  # really spread over the cluster
    for u in USERS:
        assert cluster_client.keyslot(keys.snapshot(u)) == cluster_client.keyslot(keys.blocked(u))

    assert await Projection(cluster_client, cluster_prefix).write(funded.items()) == len(USERS)
    g = guard(cluster_client, cluster_prefix)
    try:
        for u in USERS:
            expected = GuardDecision.BLOCK if u % 2 else GuardDecision.ALLOW
            assert await check(g, u) == expected, u
    finally:
        await g.close()

    # Redis lost everything: the rebuild restores every user on every node.
    for u in USERS:
        await cluster_client.delete(keys.snapshot(u), keys.blocked(u))
    assert await Projection(cluster_client, cluster_prefix).rebuild(Reader(ledger_engine)) == 40
    for u in USERS:
        raw = await cluster_client.get(keys.snapshot(u))
        assert raw is not None and decode_snapshot(raw) == funded[u]
        assert (await cluster_client.exists(keys.blocked(u))) == (u % 2)


async def test_guard_back_fills_from_the_ledger_api_on_the_cluster(
    ledger_engine: AsyncEngine, cluster_client: RedisCluster, cluster_prefix: str
) -> None:
    await grant(Book(ledger_engine), 7, 5, "g")
    server = TestServer(build_api(ledger_engine), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            provider = SnapshotClient(str(server.make_url("")).rstrip("/"), 5.0, http)
            g = guard(cluster_client, cluster_prefix, provider)
            try:
                assert await check(g, 7) == GuardDecision.ALLOW
                assert await check(g, 8) == GuardDecision.BLOCK  # never seen: balance 0
            finally:
                await g.close()
    finally:
        await server.close()
    keys = RedisKeys(cluster_prefix)
    raw = await cluster_client.get(keys.snapshot(7))  # the back-fill script ran
    assert raw is not None and decode_snapshot(raw) == 5
    assert await cluster_client.exists(keys.blocked(8)) == 1


def test_rebuild_projection_cli_on_the_cluster(
    ledger_url: str,
    funded: dict[int, int],
    redis_cluster: RedisClusterServers,
    cluster_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="llm-proxy")
    ledger_cli.register(parser.add_subparsers(dest="command", required=True))
    argv = ["ledger", "rebuild-projection", "--json", "--database-url", ledger_url]
    argv += ["--redis-url", redis_cluster.url, "--redis-cluster", "--prefix", cluster_prefix]
    args = parser.parse_args(argv)
    assert args.func(args, EnvSettings.from_env({})) == 0
    assert orjson.loads(capsys.readouterr().out) == {"users": len(USERS)}
    client = redis.RedisCluster.from_url(redis_cluster.url)
    try:
        keys = RedisKeys(cluster_prefix)
        for u in USERS:
            assert decode_snapshot(client.get(keys.snapshot(u)) or b"") == funded[u]
    finally:
        client.close()


async def test_api_keys_on_the_cluster(cluster_client: RedisCluster, cluster_prefix: str) -> None:
    store = ApiKeyStore(cluster_client, prefix=cluster_prefix)
    keys = RedisKeys(cluster_prefix)
    created = [await store.create(5) for _ in range(6)]
    nodes = {cluster_client.get_node_from_key(keys.apikey(c.sha256)).name for c in created}
    while len(nodes) < 2 and len(created) < 60:  # 6 random keys on one node: 1 run in 243
        created.append(await store.create(5))
        nodes.add(cluster_client.get_node_from_key(keys.apikey(created[-1].sha256)).name)
    assert len(nodes) > 1  # the lookups live on several nodes
    assert {k.sha256 for k in await store.list(5)} == {c.sha256 for c in created}
    assert await cluster_client.get(keys.apikey(created[0].sha256)) == b"5"
    assert await store.revoke(api_key=created[0].api_key) == 5
    assert await cluster_client.get(keys.apikey(created[0].sha256)) is None
    assert len(await store.list(5)) == len(created) - 1


async def test_rate_limiter_scripts_across_the_cluster(
    cluster_client: RedisCluster, cluster_prefix: str
) -> None:
    """One script per request: every key of it in the user's slot, on whichever node."""
    from proxy.billing.limits import ALLOW, LIMITED, RateLimiter
    from proxy.config.model import LimitsConfig, LimitSet

    config = LimitsConfig(
        user=LimitSet(rpm=2, tpm=1000), key=LimitSet(concurrency=5), budget_ms=5000, enabled=True
    )
    lim = RateLimiter(cluster_client, config, cluster_prefix)  # type: ignore[arg-type]
    for u in USERS:
        ctx = BillingContext.normalize(user_id=u, scene="chat", principal="svc")
        assert len({cluster_client.keyslot(k) for k in lim.keys_for(ctx)}) == 1
        first = await lim.admit(ctx, 10, f"a{u}")
        assert first.result == ALLOW
        assert (await lim.admit(ctx, 10, f"b{u}")).result == ALLOW
        assert (await lim.admit(ctx, 10, f"c{u}")).result == LIMITED
        lim.finish(first, 5, f"a{u}")
    await lim.close()
    assert lim.pending == 0
