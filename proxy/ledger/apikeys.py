"""User API keys: create, revoke, list. Only the key's SHA-256 is ever stored.

Keys (proxy/contract/redis_keys.py): `apikey:<sha256 hex>` -> user id, what the proxy
looks up; `apikeys:user:<uid>`, an index for `list` and for revoking all of a user's keys.

The proxy caches lookups for ~30 s, so a revoked key may keep working that long.
Every command touches one key, so the store works on a Redis Cluster too.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from proxy.contract.payers import check_user_id
from proxy.contract.redis_keys import DEFAULT_PREFIX, RedisKeys, key_sha256
from proxy.contract.timestamps import utc_now_iso

KEY_PREFIX = "sk-llmp-"
_HEX = frozenset("0123456789abcdef")


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


@dataclass(frozen=True, slots=True)
class CreatedKey:
    api_key: str  # shown once; never stored
    sha256: str
    user_id: int

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"CreatedKey(sha256={self.sha256!r}, user_id={self.user_id})"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    sha256: str
    created_at: str


class ApiKeyStore:
    def __init__(self, redis: Redis | RedisCluster, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self._keys = RedisKeys(prefix)

    def lookup_key(self, sha256: str) -> str:
        return self._keys.apikey(sha256)

    def user_index_key(self, user_id: int) -> str:
        return self._keys.apikeys_of(user_id)

    async def create(self, user_id: int) -> CreatedKey:
        check_user_id(user_id)
        # 32 random bytes = 256 bits; url-safe so it survives headers and shells.
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        sha = key_sha256(api_key)
        index = self.user_index_key(user_id)
        # Two keys in different cluster slots, so no MULTI: the index first, so that a
        # crash in between never leaves a working key that `list` cannot show.
        await self._redis.hset(index, sha, utc_now_iso())
        if not await self._redis.set(self.lookup_key(sha), str(user_id), nx=True):
            # 2^-256 odds; refuse rather than re-point someone's key
            await self._redis.hdel(index, sha)
            raise RuntimeError("generated key collides with an existing one")
        return CreatedKey(api_key=api_key, sha256=sha, user_id=user_id)

    async def revoke(self, *, api_key: str | None = None, sha256: str | None = None) -> int | None:
        """Delete the key; returns the user id it belonged to, or None if unknown."""
        if (api_key is None) == (sha256 is None):
            raise ValueError("give exactly one of api_key or sha256")
        sha = key_sha256(api_key) if api_key is not None else (sha256 or "").lower()
        if not is_sha256_hex(sha):
            raise ValueError("sha256 must be 64 hex digits")
        lookup = self.lookup_key(sha)
        # GETDEL keeps "who owned it" and the delete one atomic step.
        raw = await self._redis.getdel(lookup)
        if raw is None:
            return None
        user_id = int(raw)
        await self._redis.hdel(self.user_index_key(user_id), sha)
        return user_id

    async def list(self, user_id: int) -> tuple[KeyInfo, ...]:
        raw = await self._redis.hgetall(self.user_index_key(user_id))
        infos = (KeyInfo(_s(sha), _s(at)) for sha, at in raw.items())
        return tuple(sorted(infos, key=lambda i: i.created_at))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
