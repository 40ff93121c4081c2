"""The charge event: the contract between the proxy and the credit ledger.

One `ChargeEvent` is emitted per finished request (Kafka topic keyed by user id, so
one user's charges stay in order). It is built once, on the hot path, by
`ChargeEvent.create` — which is also where `event_id` is minted, so every retry of
the same event (outbox relay, Kafka redelivery) carries the same id and the ledger
can deduplicate on it. The wire format is `to_json()`; `from_json()` is the
validating reader the ledger uses to recognise poison messages.

Compatibility rule: the reader is strict (unknown fields are rejected), because a
field the ledger does not understand could change what a charge means. Any change
to the shape, even an added field, bumps `SCHEMA_VERSION`. The JSON Schema in
docs/charge-event.schema.json describes exactly what `to_json()` emits.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson

from proxy.contract.timestamps import format_timestamp
from proxy.contract.usage import Outcome, Usage, UsageSource

EVENT_TYPE: Final = "credit.charge.requested"
SCHEMA_VERSION: Final = 2
# Bounds every value of an event keeps, so that it serialises (orjson: 64-bit ints)
# and any ledger can add it up without overflow (Lua numbers are doubles: exact to
# 2**53; a sum of 9,000 maximal charges still is). Metering caps what it accepts at
# MAX_TOKENS per count and pricing caps credits at MAX_CREDITS.
MAX_TOKENS: Final = 10**9
MAX_CREDITS: Final = 10**12

_EVENT_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_OCCURRED_AT_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_OUTCOMES: Final = frozenset(o.value for o in Outcome)
_USAGE_SOURCES: Final = frozenset(s.value for s in UsageSource)
_USAGE_KEYS: Final = ("prompt", "completion", "cached", "reasoning", "total")

# Top-level keys in the order to_json emits them (the order is part of "stable").
FIELDS: Final = (
    "event_id",
    "event_type",
    "schema_version",
    "occurred_at",
    "request_id",
    "user_id",
    "scene",
    "conversation_id",
    "alias",
    "provider",
    "upstream_model",
    "stream",
    "usage",
    "usage_source",
    "price_rule",
    "credits",
    "outcome",
    "latency_ms",
    "ttft_ms",
    "client_disconnected",
)
_FIELD_SET: Final = frozenset(FIELDS)


class InvalidChargeEvent(ValueError):
    """A message that is not a valid charge event; `field` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid charge event: {field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChargeEvent:
    event_id: str  # 32 lowercase hex digits, UUIDv7 layout (time-ordered to the ms)
    occurred_at: str  # ISO-8601 UTC, milliseconds, "Z": 2024-05-01T12:00:00.123Z
    request_id: str
    user_id: int
    scene: str
    conversation_id: str | None
    alias: str  # the model name the client asked for
    provider: str
    upstream_model: str
    stream: bool
    usage: Usage
    usage_source: UsageSource
    price_rule: str  # PriceRule.id, or "free"
    credits: int
    outcome: Outcome
    latency_ms: float
    ttft_ms: float | None
    # The caller went away before the response ended (the disconnect policy decided
    # what was still read and charged; see proxy.upstream.relay).
    client_disconnected: bool = False
    # Constants of this schema version; not settable, so no event can lie about them.
    event_type: str = field(default=EVENT_TYPE, init=False)
    schema_version: int = field(default=SCHEMA_VERSION, init=False)

    @classmethod
    def create(
        cls,
        *,
        request_id: str,
        user_id: int,
        scene: str,
        conversation_id: str | None,
        alias: str,
        provider: str,
        upstream_model: str,
        stream: bool,
        usage: Usage,
        usage_source: UsageSource,
        price_rule: str,
        credits: int,
        outcome: Outcome,
        latency_ms: float,
        ttft_ms: float | None,
        client_disconnected: bool = False,
        now_ns: int | None = None,
    ) -> ChargeEvent:
        """Build the event for a finished request, minting `event_id` and `occurred_at`.

        Deliberately light on validation (hot path): a malformed event still gets
        through the outbox and is caught by the ledger's `from_json`, which keeps
        it for inspection instead of losing the charge here.
        """
        unix_ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
        return cls(
            event_id=new_event_id(unix_ms),
            occurred_at=format_timestamp(unix_ms),
            request_id=request_id,
            user_id=user_id,
            scene=scene,
            conversation_id=conversation_id,
            alias=alias,
            provider=provider,
            upstream_model=upstream_model,
            stream=stream,
            usage=usage,
            usage_source=usage_source,
            price_rule=price_rule,
            credits=credits,
            outcome=outcome,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            client_disconnected=client_disconnected,
        )

    def to_dict(self) -> dict[str, Any]:
        u = self.usage
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "occurred_at": self.occurred_at,
            "request_id": self.request_id,
            "user_id": self.user_id,
            "scene": self.scene,
            "conversation_id": self.conversation_id,
            "alias": self.alias,
            "provider": self.provider,
            "upstream_model": self.upstream_model,
            "stream": self.stream,
            "usage": {
                "prompt": u.prompt_tokens,
                "completion": u.completion_tokens,
                "cached": u.cached_tokens,
                "reasoning": u.reasoning_tokens,
                "total": u.prompt_tokens + u.completion_tokens,
            },
            "usage_source": self.usage_source,
            "price_rule": self.price_rule,
            "credits": self.credits,
            "outcome": self.outcome,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "client_disconnected": self.client_disconnected,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def kafka_key(self) -> bytes:
        """Partition key: all of one user's charges land on one partition, in order."""
        return str(self.user_id).encode()

    @classmethod
    def from_json(cls, data: bytes | bytearray | memoryview | str) -> ChargeEvent:
        """Parse and validate; raises InvalidChargeEvent (a ValueError) naming the field."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidChargeEvent("$", f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise InvalidChargeEvent("$", f"must be a JSON object, got {_json_type(obj)}")
        # Identity first: a message of another type or version may legitimately have
        # other fields, and saying so is more useful than "unknown field".
        if obj.get("event_type") != EVENT_TYPE:
            raise InvalidChargeEvent(
                "event_type", f"must be {EVENT_TYPE!r}, got {obj.get('event_type')!r}"
            )
        version = obj.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise InvalidChargeEvent(
                "schema_version", f"unsupported version {version!r} (this reader: {SCHEMA_VERSION})"
            )
        for key in obj:
            if key not in _FIELD_SET:
                raise InvalidChargeEvent(key, "unknown field")
        event_id = _str(obj, "event_id")
        if not _EVENT_ID_RE.fullmatch(event_id):
            raise InvalidChargeEvent("event_id", "must be 32 lowercase hex digits")
        return cls(
            event_id=event_id,
            occurred_at=_timestamp(obj),
            request_id=_str(obj, "request_id"),
            user_id=_int(obj, "user_id", minimum=None),
            scene=_str(obj, "scene"),
            conversation_id=_opt_str(obj, "conversation_id"),
            alias=_str(obj, "alias"),
            provider=_str(obj, "provider"),
            upstream_model=_str(obj, "upstream_model"),
            stream=_bool(obj, "stream"),
            usage=_usage(obj),
            usage_source=UsageSource(_choice(obj, "usage_source", _USAGE_SOURCES)),
            price_rule=_str(obj, "price_rule"),
            credits=_int(obj, "credits", maximum=MAX_CREDITS),
            outcome=Outcome(_choice(obj, "outcome", _OUTCOMES)),
            latency_ms=_duration(obj, "latency_ms"),
            ttft_ms=_opt_duration(obj, "ttft_ms"),
            client_disconnected=_bool(obj, "client_disconnected"),
        )


def new_event_id(unix_ms: int) -> str:
    """A UUIDv7-layout id as 32 hex digits: 48-bit ms timestamp, then 74 random bits.

    Sorts by creation time (to the millisecond; ids minted in the same ms are in
    random order), which keeps ledger indexes append-mostly.
    """
    rand = int.from_bytes(os.urandom(10))  # 80 bits; 74 are used
    value = (
        (unix_ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version 7
        | (rand >> 68) << 64  # rand_a: 12 bits
        | 0b10 << 62  # RFC 4122 variant
        | rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b: 62 bits
    )
    return f"{value:032x}"


# ---------------------------------------------------------------------------
# field readers for from_json; each names the field it rejects


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _get(obj: dict[str, Any], name: str, prefix: str = "") -> Any:
    try:
        return obj[name]
    except KeyError:
        raise InvalidChargeEvent(prefix + name, "missing") from None


def _str(obj: dict[str, Any], name: str) -> str:
    value = _get(obj, name)
    if not isinstance(value, str):
        raise InvalidChargeEvent(name, f"must be a string, got {_json_type(value)}")
    if not value:
        raise InvalidChargeEvent(name, "must not be empty")
    return value


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    return None if _get(obj, name) is None else _str(obj, name)


def _int(
    obj: dict[str, Any],
    name: str,
    *,
    prefix: str = "",
    minimum: int | None = 0,
    maximum: int | None = None,
) -> int:
    value = _get(obj, name, prefix)
    if type(value) is not int:  # JSON true/false are not integers
        raise InvalidChargeEvent(prefix + name, f"must be an integer, got {_json_type(value)}")
    if minimum is not None and value < minimum:
        raise InvalidChargeEvent(prefix + name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidChargeEvent(prefix + name, f"must be <= {maximum}, got {value}")
    return value


def _bool(obj: dict[str, Any], name: str) -> bool:
    value = _get(obj, name)
    if not isinstance(value, bool):
        raise InvalidChargeEvent(name, f"must be a boolean, got {_json_type(value)}")
    return value


def _choice(obj: dict[str, Any], name: str, allowed: frozenset[str]) -> str:
    value = _get(obj, name)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidChargeEvent(name, f"must be one of {sorted(allowed)}, got {value!r}")
    return value


def _duration(obj: dict[str, Any], name: str) -> float:
    value = _get(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidChargeEvent(name, f"must be a number, got {_json_type(value)}")
    if not math.isfinite(value) or value < 0:
        raise InvalidChargeEvent(name, f"must be a finite number >= 0, got {value}")
    return value


def _opt_duration(obj: dict[str, Any], name: str) -> float | None:
    return None if _get(obj, name) is None else _duration(obj, name)


def _timestamp(obj: dict[str, Any]) -> str:
    value = _str(obj, "occurred_at")
    try:
        if not _OCCURRED_AT_RE.fullmatch(value):
            raise ValueError
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")  # catches month 13 etc.
    except ValueError:
        raise InvalidChargeEvent(
            "occurred_at", f"must be UTC 'YYYY-MM-DDTHH:MM:SS.mmmZ', got {value!r}"
        ) from None
    return value


def _usage(obj: dict[str, Any]) -> Usage:
    raw = _get(obj, "usage")
    if not isinstance(raw, dict):
        raise InvalidChargeEvent("usage", f"must be an object, got {_json_type(raw)}")
    for key in raw:
        if key not in _USAGE_KEYS:
            raise InvalidChargeEvent(f"usage.{key}", "unknown field")
    prompt, completion, cached, reasoning = (
        _int(raw, key, prefix="usage.", maximum=MAX_TOKENS) for key in _USAGE_KEYS[:4]
    )
    total = _int(raw, "total", prefix="usage.", maximum=2 * MAX_TOKENS)
    if total != prompt + completion:
        raise InvalidChargeEvent(
            "usage.total", f"must equal prompt + completion ({prompt + completion}), got {total}"
        )
    if cached > prompt:
        raise InvalidChargeEvent("usage.cached", f"exceeds usage.prompt ({cached} > {prompt})")
    if reasoning > completion:
        raise InvalidChargeEvent(
            "usage.reasoning", f"exceeds usage.completion ({reasoning} > {completion})"
        )
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )
