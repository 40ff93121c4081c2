"""The Redis side of the reference ledger, against a real redis-server: charge apply
(idempotent, blocking), grants (unblocking), the ledger stream, API keys, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

import proxy
from proxy.billing.auth import Authenticator
from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.payer import BillingContext
from proxy.config import AuthConfig, EnvSettings, GuardConfig
from proxy.contract.charge_event import ChargeEvent, new_event_id
from proxy.contract.outcome import Outcome
from proxy.contract.redis_keys import RedisKeys, decode_snapshot, key_sha256
from proxy.contract.usage import Usage, UsageSource
from proxy.errors import ApiError
from proxy.ledger import cli as ledger_cli
from proxy.ledger.apikeys import KEY_PREFIX, ApiKeyStore
from proxy.ledger.consumer import ChargeApplier
from proxy.ledger.store import CreditStore
from tests.fixtures_redis import RedisServer


def charge_event(user_id: int, credits: int, *, event_id: str | None = None) -> ChargeEvent:
    return ChargeEvent(
        event_id=event_id or new_event_id(time.time_ns() // 1_000_000),
        occurred_at="2024-05-01T12:00:00.123Z",
        started_at="2024-05-01T12:00:00.110Z",
        request_id=f"req-{credits}",
        user_id=user_id,
        scene="chat",
        conversation_id=None,
        alias="gpt-4o",
        provider="openai",
        upstream_model="gpt-4o-2024-08-06",
        stream=False,
        usage=Usage(prompt_tokens=10, completion_tokens=5),
        usage_source=UsageSource.UPSTREAM,
        price_rule="gpt4o",
        credits=credits,
        outcome=Outcome.COMPLETED,
        latency_ms=12.5,
        ttft_ms=None,
    )


@pytest.fixture
def store(redis_client: Redis, redis_prefix: str) -> CreditStore:
    return CreditStore(redis_client, prefix=redis_prefix)


@pytest.fixture
def applier(redis_client: Redis, redis_prefix: str) -> ChargeApplier:
    return ChargeApplier(redis_client, prefix=redis_prefix)


async def snapshot(redis: Redis, keys: RedisKeys, user_id: int) -> dict[str, object]:
    raw = await redis.get(keys.snapshot(user_id))
    assert raw is not None
    data = orjson.loads(raw)
    # What the ledger writes is what the guard reads, and it does not expire.
    assert decode_snapshot(raw) == data["available_credit"]
    assert await redis.ttl(keys.snapshot(user_id)) == -1
    return data


async def test_same_event_twice_debits_once(
    store: CreditStore, applier: ChargeApplier, redis_client: Redis
) -> None:
    await store.grant(7, 100)
    event = charge_event(7, 30)

    first = await applier.apply(event)
    second = await applier.apply(event)

    assert (first.applied, first.balance) == (True, 70)
    assert (second.applied, second.balance) == (False, 70)
    assert await store.balance(7) == 70
    charges = [e for e in await store.entries(7) if e.kind == "charge"]
    assert len(charges) == 1
    ttl = await redis_client.ttl(store.keys.applied(event.event_id))
    assert 0 < ttl <= 7 * 24 * 3600


async def test_distinct_events_all_apply(store: CreditStore, applier: ChargeApplier) -> None:
    await store.grant(3, 1000)
    for credits in (1, 2, 3, 0, 40):
        assert (await applier.apply(charge_event(3, credits))).applied
    assert await store.balance(3) == 1000 - 46


async def test_charge_to_zero_blocks_and_rewrites_snapshot(
    store: CreditStore, applier: ChargeApplier, redis_client: Redis
) -> None:
    await store.grant(5, 20)
    assert await redis_client.exists(store.keys.blocked(5)) == 0

    await applier.apply(charge_event(5, 20))

    assert await redis_client.exists(store.keys.blocked(5)) == 1
    # No TTL by default: only a grant lifts a ledger block.
    assert await redis_client.ttl(store.keys.blocked(5)) == -1
    snap = await snapshot(redis_client, store.keys, 5)
    assert snap["available_credit"] == 0
    assert isinstance(snap["updated_at"], str) and snap["updated_at"].endswith("Z")


async def test_charge_leaving_credit_does_not_block(
    store: CreditStore, applier: ChargeApplier, redis_client: Redis
) -> None:
    await store.grant(5, 21)
    await applier.apply(charge_event(5, 20))
    assert await redis_client.exists(store.keys.blocked(5)) == 0
    assert (await snapshot(redis_client, store.keys, 5))["available_credit"] == 1


async def test_charge_without_any_grant_goes_negative_and_blocks(
    store: CreditStore, applier: ChargeApplier, redis_client: Redis
) -> None:
    await applier.apply(charge_event(9, 15))
    assert await store.balance(9) == -15
    assert await redis_client.exists(store.keys.blocked(9)) == 1
    assert (await snapshot(redis_client, store.keys, 9))["available_credit"] == -15


async def test_blocked_ttl_is_configurable(
    redis_client: Redis, redis_prefix: str, store: CreditStore
) -> None:
    applier = ChargeApplier(redis_client, prefix=redis_prefix, blocked_ttl_s=600)
    await applier.apply(charge_event(4, 1))
    assert 0 < await redis_client.ttl(store.keys.blocked(4)) <= 600


async def test_grant_unblocks_only_when_balance_becomes_positive(
    store: CreditStore, applier: ChargeApplier, redis_client: Redis
) -> None:
    await store.grant(2, 10)
    await applier.apply(charge_event(2, 40))  # balance -30, blocked
    blocked = store.keys.blocked(2)

    partial = await store.grant(2, 30, reason="not enough")
    assert partial.balance == 0
    assert await redis_client.exists(blocked) == 1

    topped = await store.grant(2, 50, reason="top-up")
    assert topped.balance == 50
    assert await redis_client.exists(blocked) == 0
    assert (await snapshot(redis_client, store.keys, 2))["available_credit"] == 50


async def test_grant_clears_a_guard_set_block(store: CreditStore, redis_client: Redis) -> None:
    # The guard blocks with a TTL from the snapshot it saw; a grant must lift it at once.
    await redis_client.set(store.keys.blocked(8), "1", ex=300)
    await store.grant(8, 5)
    assert await redis_client.exists(store.keys.blocked(8)) == 0


async def test_grant_with_id_is_idempotent(store: CreditStore) -> None:
    first = await store.grant(6, 25, grant_id="payment-123")
    again = await store.grant(6, 25, grant_id="payment-123")
    other = await store.grant(6, 25, grant_id="payment-124")
    assert (first.applied, again.applied, other.applied) == (True, False, True)
    assert await store.balance(6) == 50


async def test_grants_without_id_all_apply(store: CreditStore) -> None:
    await store.grant(6, 1)
    await store.grant(6, 1)
    assert await store.balance(6) == 2


@pytest.mark.parametrize("amount", [0, -5, True, 1.5])
async def test_grant_rejects_non_positive_amounts(store: CreditStore, amount: object) -> None:
    with pytest.raises(ValueError, match="amount"):
        await store.grant(1, amount)  # type: ignore[arg-type]
    assert await store.balance(1) == 0


async def test_big_balances_stay_exact_in_snapshot(store: CreditStore, redis_client: Redis) -> None:
    # cjson would print 10**15 + 1 as 1e+15; the snapshot must keep every digit.
    await store.grant(1, 10**15 + 1)
    assert (await snapshot(redis_client, store.keys, 1))["available_credit"] == 10**15 + 1


async def test_ledger_stream_records_charges_and_grants_newest_first(
    store: CreditStore, applier: ChargeApplier
) -> None:
    await store.grant(11, 100, reason="welcome")
    event = charge_event(11, 30)
    await applier.apply(event)
    await store.grant(11, 5, reason="goodwill")

    entries = await store.entries(11)
    assert [(e.kind, e.amount, e.balance_after) for e in entries] == [
        ("grant", 5, 75),
        ("charge", 30, 70),
        ("grant", 100, 100),
    ]
    charge = entries[1]
    assert charge.event_id == event.event_id
    assert charge.request_id == event.request_id
    assert entries[0].reason == "goodwill"
    assert [e.kind for e in await store.entries(11, limit=1)] == ["grant"]
    assert await store.entries(11, limit=0) == ()


async def test_ledger_stream_is_trimmed(redis_client: Redis, redis_prefix: str) -> None:
    applier = ChargeApplier(redis_client, prefix=redis_prefix, stream_maxlen=10)
    for _ in range(400):
        await applier.apply(charge_event(12, 1))
    length = await redis_client.xlen(RedisKeys(redis_prefix).ledger(12))
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default), so not to 10.
    assert length < 400
    assert await CreditStore(redis_client, prefix=redis_prefix).balance(12) == -400


async def test_show_reports_balance_block_and_recent_entries(
    store: CreditStore, applier: ChargeApplier
) -> None:
    await store.grant(13, 10)
    await applier.apply(charge_event(13, 12))
    state = await store.show(13, limit=1)
    assert state.balance == -2
    assert state.blocked and state.blocked_ttl_s is None
    assert [e.kind for e in state.entries] == ["charge"]
    assert state.snapshot is not None and '"available_credit":-2' in state.snapshot

    empty = await store.show(14)
    assert (empty.balance, empty.blocked, empty.entries, empty.snapshot) == (0, False, (), None)


async def test_users_are_independent(store: CreditStore, applier: ChargeApplier) -> None:
    await store.grant(21, 10)
    await store.grant(22, 10)
    await applier.apply(charge_event(21, 10))
    assert (await store.balance(21), await store.balance(22)) == (0, 10)
    assert (await store.show(22)).blocked is False


# -- API keys ---------------------------------------------------------------------


async def all_keys_and_values(redis: Redis, prefix: str) -> list[bytes]:
    out: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}*"):
        out.append(key)
        kind = await redis.type(key)
        if kind == b"string":
            out.append(await redis.get(key))
        elif kind == b"hash":
            for field, value in (await redis.hgetall(key)).items():
                out += [field, value]
    return out


async def user_of(redis: Redis, prefix: str, api_key: str) -> int | None:
    """Whom the proxy bills for `api_key`: what it looks up (the key contract)."""
    raw = await redis.get(RedisKeys(prefix).apikey(key_sha256(api_key)))
    return int(raw) if raw is not None else None


async def test_key_create_stores_only_the_hash(redis_client: Redis, redis_prefix: str) -> None:
    keys = ApiKeyStore(redis_client, prefix=redis_prefix)
    created = await keys.create(42)

    assert created.api_key.startswith(KEY_PREFIX)
    assert len(created.api_key) >= len(KEY_PREFIX) + 43  # 32 bytes, base64url
    assert created.api_key not in repr(created)
    sha = key_sha256(created.api_key)
    assert created.sha256 == sha
    assert await redis_client.get(f"{redis_prefix}apikey:{sha}") == b"42"
    stored = b"\n".join(await all_keys_and_values(redis_client, redis_prefix))
    assert created.api_key.encode() not in stored
    assert created.api_key[len(KEY_PREFIX) :].encode() not in stored
    assert [k.sha256 for k in await keys.list(42)] == [sha]


async def test_keys_are_unique(redis_client: Redis, redis_prefix: str) -> None:
    keys = ApiKeyStore(redis_client, prefix=redis_prefix)
    made = {(await keys.create(1)).api_key for _ in range(20)}
    assert len(made) == 20
    assert len(await keys.list(1)) == 20


async def test_key_revoke_round_trip(redis_client: Redis, redis_prefix: str) -> None:
    keys = ApiKeyStore(redis_client, prefix=redis_prefix)
    a = await keys.create(5)
    b = await keys.create(5)

    assert await keys.revoke(api_key=a.api_key) == 5
    assert await user_of(redis_client, redis_prefix, a.api_key) is None
    assert await user_of(redis_client, redis_prefix, b.api_key) == 5
    assert [k.sha256 for k in await keys.list(5)] == [b.sha256]
    assert await keys.revoke(api_key=a.api_key) is None

    assert await keys.revoke(sha256=b.sha256.upper()) == 5
    assert await user_of(redis_client, redis_prefix, b.api_key) is None
    assert await keys.list(5) == ()


async def test_key_revoke_validates_arguments(redis_client: Redis, redis_prefix: str) -> None:
    keys = ApiKeyStore(redis_client, prefix=redis_prefix)
    with pytest.raises(ValueError):
        await keys.revoke()
    with pytest.raises(ValueError):
        await keys.revoke(sha256="not-a-hash")


# -- CLI (in-process; asyncio.run needs a thread without a running loop) -------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-proxy")
    ledger_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args, EnvSettings.from_env()))


def cli(redis_url: str, prefix: str, *argv: str) -> list[str]:
    return [*argv, "--redis-url", redis_url, "--prefix", prefix]


def test_cli_grant_show_ledger_and_keys(
    redis_server: RedisServer,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, prefix = redis_server.url, redis_prefix

    assert (
        run_cli(cli(url, prefix, "credits", "grant", "77", "50", "--reason", "hi", "--json")) == 0
    )
    assert orjson.loads(capsys.readouterr().out) == {
        "user_id": 77,
        "applied": True,
        "balance": 50,
    }

    assert run_cli(cli(url, prefix, "credits", "show", "77", "--json")) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert (shown["balance"], shown["blocked"]) == (50, False)
    assert shown["entries"][0]["reason"] == "hi"

    assert run_cli(cli(url, prefix, "credits", "ledger", "77", "--limit", "5")) == 0
    assert "grant" in capsys.readouterr().out

    assert run_cli(cli(url, prefix, "keys", "create", "--user", "77", "--json")) == 0
    created = orjson.loads(capsys.readouterr().out)
    assert created["api_key"].startswith(KEY_PREFIX)

    assert run_cli(cli(url, prefix, "keys", "list", "--user", "77")) == 0
    assert created["sha256"] in capsys.readouterr().out

    monkeypatch.setattr("sys.stdin", io.StringIO(created["api_key"] + "\n"))
    assert run_cli(cli(url, prefix, "keys", "revoke", "-")) == 0
    assert "revoked" in capsys.readouterr().out
    assert run_cli(cli(url, prefix, "keys", "revoke", "--sha256", created["sha256"])) == 1
    assert run_cli(cli(url, prefix, "keys", "revoke")) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["credits", "grant", "1", "0"],
        ["credits", "grant", "0", "5"],
        ["keys", "create", "--user", "-3"],
        ["ledger", "--applied-ttl", "0"],
    ],
)
def test_cli_rejects_bad_numbers(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli([*argv, "--prefix", "x:"])


async def test_user_ids_outside_the_billing_range_are_refused(
    store: CreditStore, redis_client: Redis, redis_prefix: str
) -> None:
    for bad in (0, -1, 2**63):
        with pytest.raises(ValueError, match="user id"):
            await store.grant(bad, 1)
        with pytest.raises(ValueError, match="user id"):
            await ApiKeyStore(redis_client, prefix=redis_prefix).create(bad)


# -- contracts with the proxy side (guard and authenticator read what we write) -----


async def test_guard_blocks_after_the_ledger_debit_and_serves_again_after_a_grant(
    store: CreditStore, applier: ChargeApplier, redis_client: Redis, redis_prefix: str
) -> None:
    guard = CreditBalanceGuard(
        redis_client, GuardConfig(prefix=redis_prefix, coalesce=False, budget_ms=5000)
    )
    ctx = BillingContext.normalize(user_id=31, scene="chat")
    try:
        await store.grant(31, 10)
        assert await guard.check(ctx) == GuardDecision.ALLOW
        await applier.apply(charge_event(31, 10))
        assert await guard.check(ctx) == GuardDecision.BLOCK
        await store.grant(31, 1)
        assert await guard.check(ctx) == GuardDecision.ALLOW
    finally:
        await guard.close()


async def test_authenticator_accepts_a_created_key_and_refuses_it_once_revoked(
    redis_client: Redis, redis_prefix: str
) -> None:
    keys = ApiKeyStore(redis_client, prefix=redis_prefix)
    created = await keys.create(32)
    headers = {"Authorization": f"Bearer {created.api_key}"}

    ctx = await Authenticator(AuthConfig(), redis_client, redis_prefix).authenticate(headers)
    assert (ctx.user_id, ctx.principal) == (32, "user")

    await keys.revoke(api_key=created.api_key)
    # A fresh authenticator: no lookup cache standing between it and Redis.
    with pytest.raises(ApiError) as err:
        await Authenticator(AuthConfig(), redis_client, redis_prefix).authenticate(headers)
    assert err.value.status == 401


def test_cli_takes_the_prefix_from_the_config_file(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    demo = (Path(proxy.__file__).parent / "devtools" / "demo_aliases.yaml").read_text()
    config = tmp_path / "aliases.yaml"
    config.write_text(f"{demo}\nguard:\n  prefix: '{redis_prefix}'\n")
    argv = ["credits", "grant", "61", "9", "--config", str(config), "--redis-url", redis_server.url]
    assert run_cli(argv) == 0

    async def balance() -> int:
        client = Redis.from_url(redis_server.url)
        try:
            return await CreditStore(client, prefix=redis_prefix).balance(61)
        finally:
            await client.aclose()

    assert asyncio.run(balance()) == 9


def test_cli_reports_a_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("guard: [1, 2]\n")
    assert run_cli(["credits", "show", "1", "--config", str(config)]) == 2
    assert "broken.yaml" in capsys.readouterr().err
