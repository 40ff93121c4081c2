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

Version 2 added `started_at`, `service_tier`, `price_version`, `client_disconnected`
and the usage parts `cache_write`, `audio_prompt`, `audio_completion`. The reader still accepts
version 1 events (still in an outbox during a rolling upgrade), exactly in their
own shape, and reads them as what they meant: none of the new parts, no dated
price version, started `latency_ms` before `occurred_at`.

Version 3 added `endpoint` (which API the call used: chat.completions, responses,
embeddings, completions) and `attempts` (upstream attempts the request made, the
served one included; failed attempts before the first byte are never charged).
Version 1 and 2 events read as one chat.completions attempt.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import field
from typing import Any, Final

import orjson

from proxy.contract.event_fields import (
    InvalidChargeEvent,
    json_type,
    read_bool,
    read_choice,
    read_duration,
    read_int,
    read_opt_duration,
    read_opt_str,
    read_str,
    read_timestamp,
    read_usage,
    v1_started_at,
)
from proxy.contract.outcome import Outcome
from proxy.contract.records import record
from proxy.contract.timestamps import format_timestamp
from proxy.contract.usage import Usage, UsageSource

__all__ = [
    "DEFAULT_ENDPOINT",
    "ENDPOINTS",
    "EVENT_TYPE",
    "FIELDS",
    "SCHEMA_VERSION",
    "ChargeEvent",
    "InvalidChargeEvent",
    "new_event_id",
]

EVENT_TYPE: Final = "credit.charge.requested"
SCHEMA_VERSION: Final = 3
_READABLE_VERSIONS: Final = (1, 2, 3)
# The APIs a charge can come from (`endpoint`); older events are all chat completions.
ENDPOINTS: Final = ("chat.completions", "responses", "embeddings", "completions")
DEFAULT_ENDPOINT: Final = "chat.completions"
MAX_ATTEMPTS: Final = 1000
# Bounds every value of an event keeps, so that it serialises (orjson: 64-bit ints)
# and any ledger can add it up without overflow (Lua numbers are doubles: exact to
# 2**53; a sum of 9,000 maximal charges still is). Metering caps what it accepts at
# MAX_TOKENS per count and pricing caps credits at MAX_CREDITS.
MAX_TOKENS: Final = 10**9
MAX_CREDITS: Final = 10**12

_EVENT_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_OUTCOMES: Final = frozenset(o.value for o in Outcome)
_ENDPOINT_SET: Final = frozenset(ENDPOINTS)
_USAGE_SOURCES: Final = frozenset(s.value for s in UsageSource)
_USAGE_KEYS_V1: Final = ("prompt", "completion", "cached", "reasoning", "total")
_USAGE_KEYS: Final = (
    "prompt",
    "completion",
    "cached",
    "cache_write",
    "audio_prompt",
    "reasoning",
    "audio_completion",
    "total",
)

# Top-level keys in the order to_json emits them (the order is part of "stable").
FIELDS: Final = (
    "event_id",
    "event_type",
    "schema_version",
    "occurred_at",
    "started_at",
    "request_id",
    "user_id",
    "scene",
    "conversation_id",
    "alias",
    "provider",
    "upstream_model",
    "stream",
    "service_tier",
    "usage",
    "usage_source",
    "price_rule",
    "price_version",
    "credits",
    "outcome",
    "latency_ms",
    "ttft_ms",
    "client_disconnected",
    "endpoint",
    "attempts",
)
_V3_ONLY: Final = frozenset({"endpoint", "attempts"})
_V2_ONLY: Final = frozenset({"started_at", "service_tier", "price_version", "client_disconnected"})
FIELDS_V2: Final = tuple(f for f in FIELDS if f not in _V3_ONLY)
FIELDS_V1: Final = tuple(f for f in FIELDS_V2 if f not in _V2_ONLY)
_FIELD_SETS: Final = {1: frozenset(FIELDS_V1), 2: frozenset(FIELDS_V2), 3: frozenset(FIELDS)}


@record
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
    # When the request arrived (same format as occurred_at): picks the price version.
    # Required: an event without it would not pass the reader.
    started_at: str
    service_tier: str | None = None  # the request's service_tier, when it gave one
    # effective_from of the price rule's version that priced it; None: its undated rates.
    price_version: str | None = None
    # The caller went away before the response ended (the disconnect policy decided
    # what was still read and charged; see proxy.upstream.relay).
    client_disconnected: bool = False
    endpoint: str = DEFAULT_ENDPOINT  # one of ENDPOINTS
    attempts: int = 1  # upstream attempts made, the one that answered included
    # Constants of this schema version; not settable, so no event can lie about them.
    event_type: str = field(default=EVENT_TYPE, init=False)
    schema_version: int = field(default=SCHEMA_VERSION, init=False)

    @classmethod
    def create(
        cls,
        # Positional or keyword: the request path (proxy.billing.settlement) passes
        # them positionally: a call with more than 15 keywords is compiled to build a
        # dict of them (CALL_FUNCTION_EX), ~2 us for 21 where positional cost 0.2.
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
        started_ms: int | None = None,
        service_tier: str | None = None,
        price_version: str | None = None,
        client_disconnected: bool = False,
        endpoint: str = DEFAULT_ENDPOINT,
        attempts: int = 1,
        now_ns: int | None = None,
    ) -> ChargeEvent:
        """Build the event for a finished request, minting `event_id` and `occurred_at`.

        Deliberately light on validation (hot path): a malformed event still gets
        through the outbox and is caught by the ledger's `from_json`, which keeps
        it for inspection instead of losing the charge here.
        """
        unix_ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
        if started_ms is None:  # never raise here: a bad latency is the reader's to catch
            started_ms = unix_ms - (int(latency_ms) if math.isfinite(latency_ms) else 0)
        # Positional, in field order (tests/contract/test_charge_event.py checks it):
        # 23 keywords cost ~9k interpreter instructions more.
        return cls(
            new_event_id(unix_ms),  # event_id
            format_timestamp(unix_ms),  # occurred_at
            request_id,
            user_id,
            scene,
            conversation_id,
            alias,
            provider,
            upstream_model,
            stream,
            usage,
            usage_source,
            price_rule,
            credits,
            outcome,
            latency_ms,
            ttft_ms,
            format_timestamp(started_ms if started_ms < unix_ms else unix_ms),  # started_at
            service_tier,
            price_version,
            client_disconnected,
            endpoint,
            attempts,
        )

    def to_dict(self) -> dict[str, Any]:
        u = self.usage
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "occurred_at": self.occurred_at,
            "started_at": self.started_at,
            "request_id": self.request_id,
            "user_id": self.user_id,
            "scene": self.scene,
            "conversation_id": self.conversation_id,
            "alias": self.alias,
            "provider": self.provider,
            "upstream_model": self.upstream_model,
            "stream": self.stream,
            "service_tier": self.service_tier,
            "usage": {
                "prompt": u.prompt_tokens,
                "completion": u.completion_tokens,
                "cached": u.cached_tokens,
                "cache_write": u.cache_write_tokens,
                "audio_prompt": u.audio_prompt_tokens,
                "reasoning": u.reasoning_tokens,
                "audio_completion": u.audio_completion_tokens,
                "total": u.prompt_tokens + u.completion_tokens,
            },
            "usage_source": self.usage_source,
            "price_rule": self.price_rule,
            "price_version": self.price_version,
            "credits": self.credits,
            "outcome": self.outcome,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "client_disconnected": self.client_disconnected,
            "endpoint": self.endpoint,
            "attempts": self.attempts,
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
            raise InvalidChargeEvent("$", f"must be a JSON object, got {json_type(obj)}")
        # Identity first: a message of another type or version may legitimately have
        # other fields, and saying so is more useful than "unknown field".
        if obj.get("event_type") != EVENT_TYPE:
            raise InvalidChargeEvent(
                "event_type", f"must be {EVENT_TYPE!r}, got {obj.get('event_type')!r}"
            )
        version = obj.get("schema_version")
        if type(version) is not int or version not in _READABLE_VERSIONS:
            raise InvalidChargeEvent(
                "schema_version", f"unsupported version {version!r} (this reader: 1, 2, 3)"
            )
        fields = _FIELD_SETS[version]
        for key in obj:
            if key not in fields:
                raise InvalidChargeEvent(key, "unknown field")
        event_id = read_str(obj, "event_id")
        if not _EVENT_ID_RE.fullmatch(event_id):
            raise InvalidChargeEvent("event_id", "must be 32 lowercase hex digits")
        occurred_at = read_timestamp(obj, "occurred_at")
        latency_ms = read_duration(obj, "latency_ms")
        if version == 1:
            started_at = v1_started_at(occurred_at, latency_ms)
            service_tier = price_version = None
        else:
            started_at = read_timestamp(obj, "started_at")
            if started_at > occurred_at:  # same fixed-width format: text order is time order
                raise InvalidChargeEvent("started_at", "must not be after occurred_at")
            service_tier = read_opt_str(obj, "service_tier")
            price_version = read_opt_str(obj, "price_version")
        # Positional, in field order (23 keywords are compiled to a dict of them and
        # CALL_FUNCTION_EX, ~2 us a call; this is the ledger's
        # per-event path): tests/contract/test_charge_event.py reads every field back.
        return cls(
            event_id,
            occurred_at,
            read_str(obj, "request_id"),
            read_int(obj, "user_id", minimum=None),
            read_str(obj, "scene"),
            read_opt_str(obj, "conversation_id"),
            read_str(obj, "alias"),
            read_str(obj, "provider"),
            read_str(obj, "upstream_model"),
            read_bool(obj, "stream"),
            read_usage(obj, _USAGE_KEYS_V1 if version == 1 else _USAGE_KEYS, MAX_TOKENS),
            UsageSource(read_choice(obj, "usage_source", _USAGE_SOURCES)),
            read_str(obj, "price_rule"),
            read_int(obj, "credits", maximum=MAX_CREDITS),
            Outcome(read_choice(obj, "outcome", _OUTCOMES)),
            latency_ms,
            read_opt_duration(obj, "ttft_ms"),
            started_at,
            service_tier,
            price_version,
            False if version == 1 else read_bool(obj, "client_disconnected"),
            DEFAULT_ENDPOINT if version < 3 else read_choice(obj, "endpoint", _ENDPOINT_SET),
            1 if version < 3 else read_int(obj, "attempts", minimum=1, maximum=MAX_ATTEMPTS),
        )


def new_event_id(unix_ms: int) -> str:
    """A UUIDv7-layout id as 32 hex digits: 48-bit ms timestamp, then 74 random bits.

    Sorts by creation time (to the millisecond; ids minted in the same ms are in
    random order), which keeps ledger indexes append-mostly. The bits only need to
    be unique, not secret: `random` (seeded from the OS, reseeded in every forked
    worker) costs ~0.1 us where `os.urandom` is a system call (~0.8 us).
    """
    rand = random.getrandbits(74)
    value = (
        (unix_ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version 7
        | (rand >> 62) << 64  # rand_a: 12 bits
        | 0b10 << 62  # RFC 4122 variant
        | rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b: 62 bits
    )
    return f"{value:032x}"
