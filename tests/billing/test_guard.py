"""Guard pieces that need no Redis: config, error shape, snapshot codec, provider client.

`FakeProvider` (a real aiohttp server that counts calls) is shared with
tests/integration/test_guard_redis.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.payer import BillingContext
from proxy.billing.snapshot_client import Snapshot, SnapshotClient, SnapshotError, parse_snapshot
from proxy.config import GuardConfig
from proxy.config.load import parse_guard
from proxy.contract.redis_keys import RedisKeys, decode_snapshot, encode_snapshot
from proxy.errors import ConfigError, insufficient_credit
from proxy.logs import ThrottledLog
from tests.fixtures_redis import free_port

# -- fake snapshot provider ------------------------------------------------------------


@dataclass
class FakeProvider:
    """Answers `/users/{id}/credit-snapshot` from `answers`; counts calls per user."""

    answers: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    delay_s: float = 0.0
    calls: dict[int, int] = field(default_factory=dict)
    url: str = ""
    called: asyncio.Event = field(default_factory=asyncio.Event)
    # When set, answers wait for it: "slower than any budget" without a timing bet.
    gate: asyncio.Event | None = None

    def set(self, user_id: int, balance: int, is_blocked: bool = False) -> None:
        body = orjson.dumps({"balance": balance, "is_blocked": is_blocked})
        self.answers[user_id] = (200, body)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    async def handle(self, request: web.Request) -> web.Response:
        user_id = int(request.match_info["user_id"])
        self.calls[user_id] = self.calls.get(user_id, 0) + 1
        self.called.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.gate is not None:
            await self.gate.wait()
        status, body = self.answers.get(user_id, (404, b'{"error":"no such user"}'))
        return web.Response(status=status, body=body, content_type="application/json")


@pytest.fixture
async def fake_provider(aiohttp_server) -> FakeProvider:  # type: ignore[no-untyped-def]
    fake = FakeProvider()
    app = web.Application()
    app.router.add_get("/users/{user_id}/credit-snapshot", fake.handle)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("/"))
    return fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- config and values -----------------------------------------------------------------


def test_guard_config_defaults_when_absent() -> None:
    c = parse_guard(None)
    assert (c.prefix, c.budget_ms, c.blocked_ttl_s, c.snapshot_ttl_s) == ("llmproxy:", 50, 300, 300)
    assert (c.provider_timeout_s, c.fail_open_log_interval_s, c.coalesce) == (1.0, 60, True)
    assert (c.local_cache, c.local_cache_max_age_s, c.local_cache_max_entries) == (
        True,
        1.0,
        100_000,
    )


def test_guard_config_reads_values() -> None:
    c = parse_guard(
        {"prefix": "x:", "budget_ms": 20, "blocked_ttl_s": 60, "coalesce": False}, "guard"
    )
    assert (c.prefix, c.budget_ms, c.blocked_ttl_s, c.coalesce) == ("x:", 20, 60, False)
    assert isinstance(c.blocked_ttl_s, int)
    c = parse_guard(
        {"local_cache": False, "local_cache_max_age_s": 0.25, "local_cache_max_entries": 10}
    )
    assert (c.local_cache, c.local_cache_max_age_s, c.local_cache_max_entries) == (False, 0.25, 10)


def test_guard_without_local_cache_has_none() -> None:
    client = aioredis.Redis(port=1)  # never connected: nothing here does I/O
    assert CreditBalanceGuard(client, GuardConfig(local_cache=False)).cache is None
    assert CreditBalanceGuard(client, GuardConfig()).cache is not None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"budget_ms": 0}, "guard.budget_ms: must be a positive number"),
        ({"budget_ms": "fast"}, "guard.budget_ms: must be a positive number, got 'fast'"),
        ({"blocked_ttl_s": 1.5}, "guard.blocked_ttl_s: must be a positive whole number"),
        ({"snapshot_ttl_s": True}, "guard.snapshot_ttl_s"),
        ({"prefix": "a b"}, "guard.prefix: must be a string without spaces"),
        ({"coalesce": "yes"}, "guard.coalesce: must be true or false"),
        ({"local_cache": 1}, "guard.local_cache: must be true or false, got 1"),
        ({"local_cache_max_age_s": 0}, "guard.local_cache_max_age_s: must be a positive number"),
        ({"local_cache_max_entries": 0.5}, "guard.local_cache_max_entries: must be a positive"),
        ({"local_cache_max_entries": 1}, "guard.local_cache_max_entries: must be at least 2"),
        ({"budget": 5}, "guard.budget: unknown key"),
        (["x"], "guard: must be a mapping"),
    ],
)
def test_guard_config_errors_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_guard(raw, "guard")
    assert message in str(info.value)


def test_insufficient_credit_error_shape() -> None:
    err = insufficient_credit()
    assert err.status == 402
    body = orjson.loads(err.response().body)
    assert body["error"]["type"] == "insufficient_quota"
    assert body["error"]["code"] == "credit_balance_insufficient"
    assert body["error"]["message"]


def test_redis_key_names() -> None:
    # The user id is a Redis Cluster hash tag: both keys of a user share a slot.
    assert RedisKeys("llmproxy:").blocked(42) == "llmproxy:credit:{42}:blocked"
    assert RedisKeys("llmproxy:").snapshot(42) == "llmproxy:credit:{42}:snapshot"
    assert RedisKeys("llmproxy:").credit_prefix == "llmproxy:credit:{"


def test_snapshot_codec_round_trip() -> None:
    raw = encode_snapshot(1234, "2024-05-01T12:00:00.000Z")
    assert orjson.loads(raw) == {"available_credit": 1234, "updated_at": "2024-05-01T12:00:00.000Z"}
    assert decode_snapshot(raw) == 1234
    assert decode_snapshot(encode_snapshot(-5)) == -5


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"available_credit": true}',
        b'{"available_credit": null}',
        b'{"available_credit": "ten"}',
        b'{"available_credit": "NaN"}',
        b'{"available_credit": "-Infinity"}',
        b'{"available_credit": [5]}',
        b'{"available_credit": {"v": 5}}',
    ],
)
def test_malformed_snapshot_decodes_to_none(raw: bytes) -> None:
    assert decode_snapshot(raw) is None


@pytest.mark.parametrize(
    ("raw", "credit"),
    [
        (b'{"available_credit": -5.0}', -5),
        (b'{"available_credit": "-5"}', -5),
        (b'{"available_credit": "-5.0"}', -5),
        (b'{"available_credit": "10"}', 10),
        (b'{"available_credit": 10.0}', 10),
        (b'{"available_credit": 0.0}', 0),
        (b'{"available_credit": "0"}', 0),
        # A fraction keeps its sign: "> 0?" is answered as the value answers it.
        (b'{"available_credit": 0.25}', 1),
        (b'{"available_credit": -0.25}', 0),
        (b'{"available_credit": "1e999999"}', 2**63),
        (b'{"available_credit": -1e300}', -(2**63)),
    ],
)
def test_snapshot_numbers_are_read_by_value(raw: bytes, credit: int) -> None:
    assert decode_snapshot(raw) == credit


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = ThrottledLog(logging.getLogger("proxy.billing.guard"), 60.0, lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="proxy.billing.guard"):
        limited.warning("first")
        limited.warning("second")
        limited.warning("third")
        now[0] += 61
        limited.warning("fourth")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["first (0 similar suppressed)", "fourth (2 similar suppressed)"]


async def test_skipped_without_touching_redis() -> None:
    # Nothing listens on this port: any Redis call would fail open, not skip.
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    guard = CreditBalanceGuard(dead, GuardConfig(budget_ms=500))
    try:
        nobody = BillingContext.normalize(user_id=0)
        skip = BillingContext.normalize(user_id=7, skip_charge=True)
        assert await guard.check(nobody) is GuardDecision.SKIPPED
        assert await guard.check(skip) is GuardDecision.SKIPPED
        assert await guard.check(BillingContext.normalize(user_id=7)) is GuardDecision.FAIL_OPEN
    finally:
        await guard.close()
        await dead.aclose()


# -- snapshot provider client ------------------------------------------------------------


def test_parse_snapshot_checks_types() -> None:
    assert parse_snapshot(b'{"balance": 5, "is_blocked": false}') == Snapshot(5, False)
    for bad in (b'{"balance": true, "is_blocked": false}', b'{"balance": 5}', b"[1]", b"x"):
        with pytest.raises(SnapshotError):
            parse_snapshot(bad)


async def test_provider_fetch_ok(fake_provider: FakeProvider, http: aiohttp.ClientSession) -> None:
    fake_provider.set(9, 250, is_blocked=True)
    provider = SnapshotClient(fake_provider.url, 2.0, http)
    assert await provider.fetch(9) == Snapshot(balance=250, is_blocked=True)
    assert fake_provider.calls == {9: 1}


async def test_provider_errors(fake_provider: FakeProvider, http: aiohttp.ClientSession) -> None:
    provider = SnapshotClient(fake_provider.url, 2.0, http)
    with pytest.raises(SnapshotError, match="HTTP 404"):
        await provider.fetch(1)
    fake_provider.answers[2] = (200, b"<html>")
    with pytest.raises(SnapshotError, match="not JSON"):
        await provider.fetch(2)
    fake_provider.answers[3] = (200, b'{"balance": "1", "is_blocked": false}')
    with pytest.raises(SnapshotError, match="balance"):
        await provider.fetch(3)


async def test_provider_timeout(fake_provider: FakeProvider, http: aiohttp.ClientSession) -> None:
    fake_provider.set(4, 10)
    fake_provider.delay_s = 1.0
    provider = SnapshotClient(fake_provider.url, 0.05, http)
    with pytest.raises(SnapshotError, match="timed out"):
        await provider.fetch(4)


async def test_provider_unreachable(http: aiohttp.ClientSession) -> None:
    provider = SnapshotClient(f"http://127.0.0.1:{free_port()}", 1.0, http)
    with pytest.raises(SnapshotError, match="unreachable"):
        await provider.fetch(4)


def test_provider_rejects_non_http_url() -> None:
    with pytest.raises(ValueError):
        SnapshotClient("redis://x", 1.0, None)  # type: ignore[arg-type]
