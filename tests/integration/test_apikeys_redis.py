"""API keys in Redis (created, looked up, revoked) and the contracts with the proxy side:
the authenticator accepts what `keys` writes; against a real redis-server."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from proxy.billing.auth import Authenticator
from proxy.config import AuthConfig
from proxy.contract.redis_keys import RedisKeys, key_sha256
from proxy.errors import ApiError
from proxy.ledger.apikeys import KEY_PREFIX, ApiKeyStore


async def test_user_ids_outside_the_billing_range_are_refused(
    redis_client: Redis, redis_prefix: str
) -> None:
    for bad in (0, -1, 2**63):
        with pytest.raises(ValueError, match="user id"):
            await ApiKeyStore(redis_client, prefix=redis_prefix).create(bad)


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
