"""Who is asking the credit API: the same keys as the proxy (proxy/billing/auth.py).

* a user API key (`Authorization: Bearer sk-llmp-…`, looked up in Redis as
  `<prefix>apikey:<sha256>`) sees only its own user; an `X-User-Id` naming anyone
  else is 403;
* a service key (`auth.service_keys`, by sha256) acts for the user in `X-User-Id`
  and is the only caller of the admin actions (marking orders paid, rewards);
* with `auth.mode: none` (development only) a request without a key acts for
  `X-User-Id`, as the proxy does; admin actions still need a service key.

Fails closed: when Redis cannot be asked about a user key the answer is 503.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.config.model import AuthConfig, AuthMode
from proxy.contract.bearer import MalformedAuthorization, bearer_key
from proxy.contract.payers import canonical_user_id, stored_user_id
from proxy.contract.redis_keys import RedisKeys, key_digest
from proxy.errors import auth_unavailable, forbidden, invalid_request, invalid_user, unauthorized

log = logging.getLogger(__name__)


class KeySource(Protocol):
    async def user_for(self, sha256_hex: str) -> int | None: ...


class RedisKeySource:
    """User keys where the proxy finds them; no cache (the credit API is not hot)."""

    def __init__(self, redis: Redis | RedisCluster, prefix: str, timeout_s: float) -> None:
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._timeout_s = timeout_s

    async def user_for(self, sha256_hex: str) -> int | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                raw = await self._redis.get(self._keys.apikey(sha256_hex))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("credit api: user key lookup failed, answering 503: %s", type(exc).__name__)
            raise auth_unavailable() from None
        return stored_user_id(raw)


class StaticKeySource:
    """Keys held in memory (sha256 hex -> user id): the demo's, which has no Redis."""

    def __init__(self, keys: Mapping[str, int]) -> None:
        self._keys = dict(keys)

    async def user_for(self, sha256_hex: str) -> int | None:
        return self._keys.get(sha256_hex)


class KeySources:
    """The first source that knows the key wins."""

    def __init__(self, *sources: KeySource) -> None:
        self._sources = sources

    async def user_for(self, sha256_hex: str) -> int | None:
        for source in self._sources:
            user = await source.user_for(sha256_hex)
            if user is not None:
                return user
        return None


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int  # whose data; 0 when a service key named nobody
    service: str | None  # the service key's name; None for a user key (or mode none)


class CreditAuth:
    def __init__(self, config: AuthConfig, keys: KeySource) -> None:
        self._config = config
        self._keys = keys

    async def caller(self, headers: Mapping[str, str]) -> Caller:
        """Who asks and for whom (401/403/400/503 as ApiError)."""
        try:
            key = bearer_key(headers.get("Authorization"))
        except MalformedAuthorization:
            raise unauthorized(
                "Malformed Authorization header: expected 'Bearer <key>'", invalid_token=True
            ) from None
        claimed = _claimed_user(headers)
        if key is None:
            if self._config.mode is AuthMode.NONE:
                return Caller(claimed, None)
            raise unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>'", invalid_token=False
            )
        digest = key_digest(key)
        service = None
        for candidate in self._config.service_keys:  # no early exit: constant time
            if hmac.compare_digest(digest, candidate.sha256):
                service = candidate.name
        if service is not None:
            return Caller(claimed, service)
        user = await self._keys.user_for(digest.hex())
        if user is None:
            raise unauthorized("Incorrect API key provided", invalid_token=True)
        if claimed and claimed != user:
            raise forbidden("a user API key cannot act for another user", param="X-User-Id")
        return Caller(user, None)

    async def user(self, headers: Mapping[str, str]) -> int:
        """The user whose data is asked for; 400 when a service key names nobody."""
        caller = await self.caller(headers)
        if caller.user_id == 0:
            raise invalid_request(
                "X-User-Id is required: name the user this request is for", param="X-User-Id"
            )
        return caller.user_id

    async def service(self, headers: Mapping[str, str]) -> str:
        """The service key's name; 403 for any other caller."""
        caller = await self.caller(headers)
        if caller.service is None:
            raise forbidden("this action needs a service key")
        return caller.service


def _claimed_user(headers: Mapping[str, str]) -> int:
    raw = (headers.get("X-User-Id") or "").strip(" \t")
    if not raw:
        return 0
    user = canonical_user_id(raw)
    if user is None:
        raise invalid_user("X-User-Id")
    return user
