"""The Redis key layout shared by the proxy (guard, auth) and the ledger, and the
snapshot codec. The one place that spells key names and the snapshot JSON.

Keys (prefix default `llmproxy:`):
- `credit:{<uid>}:blocked`   any value = blocked (the guard refuses the user)
- `credit:{<uid>}:snapshot`  JSON `{"available_credit": int, "updated_at": iso8601}`
- `holds:{<uid>}`            hash request id -> `"<credits>:<expires_at_ms>"`: credit
                             reserved by requests in flight or settled but not yet
                             applied by the ledger (which deletes the field in the
                             same script that rewrites the snapshot). A hold past its
                             expiry (Unix ms, Redis clock) counts for nothing. Same
                             slot as the credit keys (the hash tag), but outside the
                             `credit:{` prefix the guard cache tracks: the holds
                             change twice a request, and every change would be an
                             invalidation pushed to every proxy.
- `holds:{<uid>}:total`      integer: the sum of the credits of the fields of
                             `holds:{<uid>}` (live or past expiry, not yet purged), so
                             a reservation reads what is held without walking the holds
- `holds:{<uid>}:expiry`     zset request id -> expires_at_ms, the same fields: the
                             reservation purges what is due from its low end. Every
                             script that writes a hold keeps the three in step (and the
                             same TTL); a reservation that finds them out of step
                             (HLEN != ZCARD: the hash deleted or written by something
                             else) sums the hash and rebuilds the other two.
- `limits:{<uid>}:override`  hash rpm/tpm/concurrency: the user's own limits (over the
                             `limits.user` defaults; -1 = unlimited), set by
                             `llm-proxy limits set`
- `limits:{<uid>}:<scope>:<rpm|tpm>`  hash v (level) / t (ms): a token bucket of the
                             rate limiter; scope `user`, or `key:<principal>` (the caller
                             key acting for that user)
- `limits:{<uid>}:<scope>:conc`  zset request id -> expiry (Unix ms): concurrency slots
- `apikey:<sha256 hex>`      user API key -> user id (decimal string)
- `apikeys:user:<uid>`       hash sha256 hex -> created_at (index of a user's keys)

The user id in braces is a Redis Cluster hash tag: one user's credit and limit keys
share a slot, so the scripts and MGETs that touch several stay valid on a cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation

import orjson

from proxy.contract.timestamps import utc_now_iso

DEFAULT_PREFIX = "llmproxy:"
_CREDIT_BOUND = Decimal(2**63)  # beyond any balance; bounds what a snapshot can say


def key_digest(api_key: str) -> bytes:
    """sha256 of an API key: what config and Redis store instead of the key."""
    return hashlib.sha256(api_key.encode("utf-8")).digest()


def key_sha256(api_key: str) -> str:
    """`key_digest` as hex, the form in config files and Redis key names."""
    return key_digest(api_key).hex()


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = DEFAULT_PREFIX

    def blocked(self, user_id: int) -> str:
        return f"{self.prefix}credit:{{{user_id}}}:blocked"

    def snapshot(self, user_id: int) -> str:
        return f"{self.prefix}credit:{{{user_id}}}:snapshot"

    def holds(self, user_id: int) -> str:
        return f"{self.prefix}holds:{{{user_id}}}"

    def holds_total(self, user_id: int) -> str:
        return f"{self.prefix}holds:{{{user_id}}}:total"

    def holds_expiry(self, user_id: int) -> str:
        return f"{self.prefix}holds:{{{user_id}}}:expiry"

    def hold_keys(self, user_id: int) -> tuple[str, str, str]:
        """The holds hash, its running total and its expiry index, in script order."""
        return (self.holds(user_id), self.holds_total(user_id), self.holds_expiry(user_id))

    @property
    def credit_prefix(self) -> str:
        """What every user's credit keys start with (the guard cache tracks it)."""
        return f"{self.prefix}credit:{{"

    def limits_override(self, user_id: int) -> str:
        return f"{self.prefix}limits:{{{user_id}}}:override"

    def limit(self, user_id: int, scope: str, kind: str) -> str:
        """A limiter key: `scope` "user" or "key:<principal>", `kind` rpm, tpm or conc."""
        return f"{self.prefix}limits:{{{user_id}}}:{scope}:{kind}"

    def apikey(self, sha256_hex: str) -> str:
        return f"{self.prefix}apikey:{sha256_hex}"

    def apikeys_of(self, user_id: int) -> str:
        return f"{self.prefix}apikeys:user:{user_id}"


def encode_snapshot(available_credit: int, updated_at: str | None = None) -> bytes:
    return orjson.dumps(
        {"available_credit": available_credit, "updated_at": updated_at or utc_now_iso()}
    )


def decode_snapshot(raw: bytes) -> int | None:
    """available_credit, or None when the value is not a readable snapshot.

    Read strictly and conservatively: an integer as it is; a decimal number or a
    numeric string by its value (`-5.0` and `"-5"` block). A fraction is rounded
    up, which keeps the guard's only question, "> 0?", exactly as the value
    answers it. Anything else (not JSON, no number, true, NaN) is None, which the
    guard treats as a missing snapshot: it asks the snapshot provider, never
    takes it for credit.

    `updated_at` is informational (for people and the billing side); the TTL is
    what bounds staleness.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    credit = data.get("available_credit") if isinstance(data, dict) else None
    if isinstance(credit, bool) or credit is None:
        return None
    if isinstance(credit, int):
        return credit
    if isinstance(credit, float | str):
        try:
            value = Decimal(str(credit).strip())
        except InvalidOperation:
            return None
        if not value.is_finite():
            return None
        # Clamp before int(): "1e999999999" must not build a billion-digit int.
        value = max(min(value, _CREDIT_BOUND), -_CREDIT_BOUND)
        return int(value.to_integral_value(rounding=ROUND_CEILING))
    return None


def encode_hold(credits: int, expires_at_ms: int) -> bytes:
    return f"{credits}:{expires_at_ms}".encode()


def decode_hold(raw: bytes | str) -> tuple[int, int] | None:
    """(credits, expires_at_ms) of a hold field, or None when it is not one."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    credits, sep, expires = text.partition(":")
    if not sep or not credits.isdigit() or not expires.isdigit():
        return None
    return int(credits), int(expires)


def live_held(values: Iterable[bytes | str], now_ms: int) -> int:
    """Credit held by the holds that have not expired at `now_ms`."""
    total = 0
    for raw in values:
        hold = decode_hold(raw)
        if hold is not None and hold[1] > now_ms:
            total += hold[0]
    return total
