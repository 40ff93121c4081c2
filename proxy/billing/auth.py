"""Authentication: an API key (and, for service keys, the user they act for) into a
`BillingContext`.

Two kinds of keys, both given as `Authorization: Bearer <key>`:

* service keys (listed in config by their sha256) are trusted back-ends that act
  for users: `X-User-Id` (or, failing that, the body `user` field; the header
  wins over the body; both must be canonical ids, else 400 `invalid_user`),
  `X-Billing-Scene` (must be one of the key's scenes, "unknown" when absent),
  `X-Conversation-Id`, and `X-Skip-Charge` only with `may_skip_charge: true`;
* user keys are looked up in Redis (`<prefix>apikey:<sha256 hex>` -> user id) and
  always bill their own user; they may pick a scene (it does not change who
  pays) but may not act for someone else nor skip charging.

Auth fails closed: when Redis cannot be asked about an uncached user key the
request gets 503, because serving it would mean not knowing whom to charge.
Keys and Authorization headers are never logged, not even in part.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Final

import redis.asyncio as aioredis
from multidict import istr
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.billing.payer import (
    BillingContext,
    body_user_id,
    parse_bool,
    parse_conversation_id,
    parse_request_id,
    parse_scene,
    parse_user_id,
)
from proxy.config.model import AuthConfig, AuthMode, ServiceKey
from proxy.contract.bearer import MalformedAuthorization, bearer_key
from proxy.contract.payers import stored_user_id
from proxy.contract.redis_keys import RedisKeys, key_digest
from proxy.errors import auth_unavailable, forbidden, unauthorized

log = logging.getLogger(__name__)

# Header names as multidict's case-insensitive strings: aiohttp's headers look them up
# without folding the name again (a plain str key works the same in any Mapping).
_AUTHORIZATION: Final = istr("Authorization")
_X_USER_ID: Final = istr("X-User-Id")
_X_BILLING_SCENE: Final = istr("X-Billing-Scene")
_X_REQUEST_ID: Final = istr("X-Request-Id")
_X_CONVERSATION_ID: Final = istr("X-Conversation-Id")
_X_SKIP_CHARGE: Final = istr("X-Skip-Charge")

# Authorization values that matched a service key, remembered (bounded) so that a
# back-end's every call skips parsing, sha256 and the key comparison.
SERVICE_MATCH_CACHE_SIZE: Final = 64


class _ServiceKeyMatches:
    """Authorization header value -> the service key it matched, at most `size` of them.

    Only values that matched a configured key get in (a refused or unknown key never
    does, so guessing fills nothing); a value is found only by being equal to one that
    matched, so a hit authenticates exactly what a full check would. The oldest entry
    leaves when full (a service key has a few header spellings at most). Holds header
    values, which contain keys: never logged or shown (no __repr__ of the values).
    """

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = SERVICE_MATCH_CACHE_SIZE) -> None:
        self._size = size
        self._entries: dict[str, ServiceKey] = {}

    def __repr__(self) -> str:
        return f"<_ServiceKeyMatches {len(self._entries)}/{self._size}>"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, header: str) -> ServiceKey | None:
        return self._entries.get(header)

    def put(self, header: str, key: ServiceKey) -> None:
        if self._size <= 0:
            return
        entries = self._entries
        while len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[header] = key


class _UserKeyCache:
    """Bounded LRU of sha256 -> (expires_at, user id or None for 'no such key')."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, int | None]] = OrderedDict()

    def get(self, digest: str) -> tuple[bool, int | None]:
        entry = self._entries.get(digest)
        if entry is None:
            return False, None
        expires_at, user_id = entry
        if self._clock() >= expires_at:
            del self._entries[digest]
            return False, None
        self._entries.move_to_end(digest)
        return True, user_id

    def put(self, digest: str, user_id: int | None, ttl: float) -> None:
        if ttl <= 0 or self._size <= 0:
            return
        self._entries[digest] = (self._clock() + ttl, user_id)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Authenticator:
    """Turns request headers into a BillingContext or raises ApiError (400/401/403/503)."""

    def __init__(
        self,
        config: AuthConfig,
        redis: aioredis.Redis | RedisCluster | None,
        prefix: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._cache = _UserKeyCache(config.user_key_cache_size, clock)
        self._service_matches = _ServiceKeyMatches()
        # One Redis lookup per key at a time, however many requests carry it.
        self._inflight: dict[str, asyncio.Task[int | None]] = {}

    def callers(self) -> str | None:
        """Who can be authenticated at all; None when nobody can (then every call is a
        401: no service key is configured and user keys need Redis)."""
        c = self._config
        if c.mode is AuthMode.NONE:
            return "anyone (auth mode none)"
        kinds = []
        if c.service_keys:
            kinds.append(f"{len(c.service_keys)} service key(s)")
        if self._redis is not None:
            kinds.append("user keys (Redis)")
        return " and ".join(kinds) or None

    def describe(self) -> str:
        """One line for start-up logs; names and counts only, no hashes or keys."""
        c = self._config
        if c.mode is AuthMode.NONE:
            return "auth mode=none: NO API KEYS CHECKED, X-User-Id is trusted (development only)"
        names = ", ".join(k.name for k in c.service_keys) or "-"
        user_keys = "redis" if self._redis is not None else "disabled (no Redis)"
        return (
            f"auth mode=keys service_keys=[{names}] user_keys={user_keys} "
            f"user_key_cache_ttl_s={c.user_key_cache_ttl_s:g}"
        )

    def log_startup(self, logger: logging.Logger | None = None) -> None:
        """Log describe(); a loud WARNING when mode is none."""
        logger = logger or log
        if self._config.mode is AuthMode.NONE:
            logger.warning("!!! %s !!!", self.describe())
        else:
            logger.info("%s", self.describe())

    async def authenticate(
        self, headers: Mapping[str, str], body_user: str | None = None
    ) -> BillingContext:
        """`headers` must be case-insensitive (aiohttp's CIMultiDictProxy is)."""
        if self._config.mode is AuthMode.NONE:
            return self._acting_for(headers, body_user, principal="anonymous", key=None)
        header = headers.get(_AUTHORIZATION)
        service = None if header is None else self._service_matches.get(header)
        if service is not None:  # this very value matched a service key before
            return self._acting_for(headers, body_user, principal=service.name, key=service)
        key = _bearer_key(header)
        digest = key_digest(key)
        service = self._match_service_key(digest)
        if service is not None:
            assert header is not None  # a key was read from it
            self._service_matches.put(header, service)
            return self._acting_for(headers, body_user, principal=service.name, key=service)
        user_id = await self._user_for(digest.hex())
        if user_id is None:
            raise unauthorized("Incorrect API key provided", invalid_token=True)
        return self._for_user(headers, user_id)

    # -- service keys / mode none ----------------------------------------------------

    def _match_service_key(self, digest: bytes) -> ServiceKey | None:
        # Compare against every entry, without early exit, so timing reveals nothing.
        found: ServiceKey | None = None
        for candidate in self._config.service_keys:
            if hmac.compare_digest(digest, candidate.sha256):
                found = candidate
        return found

    def _acting_for(
        self,
        headers: Mapping[str, str],
        body_user: str | None,
        *,
        principal: str,
        key: ServiceKey | None,
    ) -> BillingContext:
        header_user = (headers.get(_X_USER_ID) or "").strip(" \t")
        # Precedence: X-User-Id header, then the body `user`, else nobody (0). Both
        # follow one canonical rule (payer.parse_user_id); a bad one is a 400.
        user_id = parse_user_id(header_user) if header_user else body_user_id(body_user)
        ctx = _context(headers, user_id, principal)
        if key is not None and ctx.skip_charge and not key.may_skip_charge:
            raise forbidden(
                f"service key {key.name!r} may not skip charging "
                "(its auth.service_keys entry lacks may_skip_charge: true)",
                param="X-Skip-Charge",
            )
        if key is not None and not key.allows(ctx.scene):
            allowed = ", ".join(sorted(key.scenes))
            raise forbidden(
                f"service key {key.name!r} may not bill scene {ctx.scene!r}; "
                f"send X-Billing-Scene with one of: {allowed}",
                param="X-Billing-Scene",
            )
        return ctx

    # -- user keys -------------------------------------------------------------------

    def _for_user(self, headers: Mapping[str, str], user_id: int) -> BillingContext:
        claimed = (headers.get(_X_USER_ID) or "").strip()
        if claimed and parse_user_id(claimed) != user_id:
            raise forbidden("a user API key cannot act for another user", param="X-User-Id")
        ctx = _context(headers, user_id, "user")
        # A false X-Skip-Charge asks for nothing special and is accepted.
        if ctx.skip_charge:
            raise forbidden("a user API key cannot skip charging", param="X-Skip-Charge")
        return ctx

    async def _user_for(self, digest_hex: str) -> int | None:
        hit, user_id = self._cache.get(digest_hex)
        if hit:
            return user_id
        if self._redis is None:
            return None  # no Redis configured: service keys are the only keys
        task = self._inflight.get(digest_hex)
        if task is None:
            task = asyncio.ensure_future(self._lookup(digest_hex))
            self._inflight[digest_hex] = task
            task.add_done_callback(lambda t: self._lookup_done(digest_hex, t))
        # Shielded: one caller giving up must not fail the others sharing the lookup.
        return await asyncio.shield(task)

    def _lookup_done(self, digest_hex: str, task: asyncio.Task[int | None]) -> None:
        self._inflight.pop(digest_hex, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have gone away

    async def _lookup(self, digest_hex: str) -> int | None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self._config.redis_timeout_s):
                raw = await self._redis.get(self._keys.apikey(digest_hex))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("user key lookup failed, answering 503: %s", type(exc).__name__)
            raise auth_unavailable() from None
        user_id = stored_user_id(raw)
        if user_id is None:
            if raw is not None:
                log.error("malformed user id stored for an API key; treating the key as unknown")
            ttl = min(self._config.user_key_negative_ttl_s, self._config.user_key_cache_ttl_s)
        else:
            ttl = self._config.user_key_cache_ttl_s
        self._cache.put(digest_hex, user_id, ttl)
        return user_id


def _context(headers: Mapping[str, str], user_id: int, principal: str) -> BillingContext:
    # BillingContext.normalize, positionally and with user_id already parsed.
    return BillingContext(
        parse_user_id(user_id),
        parse_scene(headers.get(_X_BILLING_SCENE)),
        parse_request_id(headers.get(_X_REQUEST_ID)),
        parse_conversation_id(headers.get(_X_CONVERSATION_ID)),
        parse_bool(headers.get(_X_SKIP_CHARGE), param="X-Skip-Charge"),
        principal,
    )


def _bearer_key(header: str | None) -> str:
    try:
        key = bearer_key(header)
    except MalformedAuthorization:
        raise unauthorized(
            "Malformed Authorization header: expected 'Bearer <key>'", invalid_token=True
        ) from None
    if key is None:
        raise unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>'", invalid_token=False
        )
    return key
