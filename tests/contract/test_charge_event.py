from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.billing.pricing import price
from proxy.config import parse_price_rules
from proxy.contract.charge_event import (
    EVENT_TYPE,
    FIELDS,
    SCHEMA_VERSION,
    ChargeEvent,
    InvalidChargeEvent,
    new_event_id,
)
from proxy.contract.outcome import Outcome
from proxy.contract.timestamps import format_timestamp
from proxy.contract.usage import Usage, UsageSource

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "charge-event.schema.json"
USAGE = Usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=100, reasoning_tokens=20)
RULE = parse_price_rules({"gpt4o": {"input": 2.5, "output": 10}})["gpt4o"]
NOW_NS = 1_714_564_800_123_456_789  # 2024-05-01T12:00:00.123456789Z


def make_event(**overrides: Any) -> ChargeEvent:
    facts: dict[str, Any] = {
        "request_id": "req_abc123",
        "user_id": 42,
        "scene": "chat",
        "conversation_id": "conv-1",
        "alias": "gpt-4o",
        "provider": "openai",
        "upstream_model": "gpt-4o-2024-08-06",
        "stream": True,
        "usage": USAGE,
        "usage_source": UsageSource.UPSTREAM,
        "outcome": Outcome.COMPLETED,
        "latency_ms": 1234.5,
        "ttft_ms": 210.25,
    }
    charge = overrides.pop("charge", None) or price(RULE, overrides.get("usage", USAGE))
    facts.update(overrides)
    facts.update(price_rule=charge.rule_id, credits=charge.credits)
    return ChargeEvent.create(**facts)


def valid_dict() -> dict[str, Any]:
    return orjson.loads(make_event().to_json())


# ---------------------------------------------------------------------------
# creation and serialisation


def test_create_fills_identity_and_charge() -> None:
    event = make_event(now_ns=NOW_NS)
    assert event.event_type == EVENT_TYPE == "credit.charge.requested"
    assert event.schema_version == SCHEMA_VERSION == 3
    assert (event.endpoint, event.attempts) == ("chat.completions", 1)
    assert event.client_disconnected is False
    assert event.occurred_at == "2024-05-01T12:00:00.123Z"
    assert re.fullmatch(r"[0-9a-f]{32}", event.event_id)
    assert event.price_rule == "gpt4o"
    # 1100*2.5 + 100*2.5 + 280*10 + 20*10 = 6000 -> 0.006 -> 1
    assert event.credits == 1


def test_create_free_alias_event() -> None:
    event = make_event(charge=price(None, USAGE))
    assert (event.price_rule, event.credits) == ("free", 0)


def test_to_json_has_stable_keys_and_values() -> None:
    event = make_event(now_ns=NOW_NS)
    data = orjson.loads(event.to_json())
    assert list(data) == list(FIELDS)
    assert data == {
        "event_id": event.event_id,
        "event_type": "credit.charge.requested",
        "schema_version": 3,
        "occurred_at": "2024-05-01T12:00:00.123Z",
        "started_at": "2024-05-01T11:59:58.889Z",  # occurred_at - latency_ms (1234.5)
        "request_id": "req_abc123",
        "user_id": 42,
        "scene": "chat",
        "conversation_id": "conv-1",
        "alias": "gpt-4o",
        "provider": "openai",
        "upstream_model": "gpt-4o-2024-08-06",
        "stream": True,
        "service_tier": None,
        "usage": {
            "prompt": 1200,
            "completion": 300,
            "cached": 100,
            "cache_write": 0,
            "audio_prompt": 0,
            "reasoning": 20,
            "audio_completion": 0,
            "total": 1500,
        },
        "usage_source": "upstream",
        "price_rule": "gpt4o",
        "price_version": None,
        "credits": 1,
        "outcome": "completed",
        "latency_ms": 1234.5,
        "ttft_ms": 210.25,
        "client_disconnected": False,
        "endpoint": "chat.completions",
        "attempts": 1,
    }
    assert list(data["usage"]) == [
        "prompt",
        "completion",
        "cached",
        "cache_write",
        "audio_prompt",
        "reasoning",
        "audio_completion",
        "total",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"conversation_id": None, "ttft_ms": None, "stream": False},
        {"latency_ms": 0, "ttft_ms": 0},
        {"usage": Usage(), "usage_source": UsageSource.ESTIMATED, "outcome": Outcome.REJECTED},
        {"usage": Usage(prompt_tokens=10**9, completion_tokens=10**9), "user_id": 2**62},
        {"client_disconnected": True, "outcome": Outcome.CLIENT_ABORTED},
        {"outcome": Outcome.CLIENT_ABORTED, "scene": "naïve ☃"},
        {
            "usage": Usage(
                prompt_tokens=100,
                cached_tokens=10,
                cache_write_tokens=20,
                audio_prompt_tokens=30,
                completion_tokens=50,
                reasoning_tokens=5,
                audio_completion_tokens=40,
            ),
            "service_tier": "priority",
            "price_version": "2027-01-01T00:00:00Z",
            "started_ms": 1_714_564_799_000,
            "now_ns": NOW_NS,
        },
    ],
)
def test_round_trip(overrides: dict[str, Any]) -> None:
    event = make_event(**overrides)
    again = ChargeEvent.from_json(event.to_json())
    assert again == event
    assert isinstance(again.outcome, Outcome)
    assert isinstance(again.usage_source, UsageSource)
    assert again.to_json() == event.to_json()


def test_event_ids_are_unique_and_time_ordered() -> None:
    ids = [make_event().event_id for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    early, late = new_event_id(1_000), new_event_id(2_000)
    assert early < late
    assert early[:12] == f"{1_000:012x}"  # 48-bit ms timestamp first
    assert early[12] == "7"  # UUID version 7
    assert early[16] in "89ab"  # RFC 4122 variant


def test_event_id_is_fixed_at_creation() -> None:
    # Retries re-serialise the same object: the id must not change between sends.
    event = make_event()
    assert event.to_json() == event.to_json()
    assert ChargeEvent.from_json(event.to_json()).event_id == event.event_id


def test_format_timestamp() -> None:
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(1_714_564_800_007) == "2024-05-01T12:00:00.007Z"


def test_kafka_key_is_the_user_id() -> None:
    assert make_event(user_id=42).kafka_key() == b"42"


# ---------------------------------------------------------------------------
# validation of incoming messages


def _set(path: str, value: Any) -> dict[str, Any]:
    data = valid_dict()
    *parents, last = path.split(".")
    target = data
    for part in parents:
        target = target[part]
    target[last] = value
    return data


def _drop(path: str) -> dict[str, Any]:
    data = valid_dict()
    *parents, last = path.split(".")
    target = data
    for part in parents:
        target = target[part]
    del target[last]
    return data


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (b"{not json", "$", "not valid JSON"),
        (b"\xff\xfe", "$", "not valid JSON"),
        (b"[1, 2]", "$", "must be a JSON object, got array"),
        (b"null", "$", "must be a JSON object, got null"),
        (_set("event_type", "credit.refund.requested"), "event_type", "must be"),
        (_drop("event_type"), "event_type", "must be"),
        (_set("schema_version", 4), "schema_version", "unsupported version 4"),
        (_set("schema_version", 2), "endpoint", "unknown field"),  # v2 has its own shape
        (_set("endpoint", "images"), "endpoint", "must be one of"),
        (_set("attempts", 0), "attempts", "must be >= 1"),
        (_set("attempts", True), "attempts", "must be an integer"),
        (_set("schema_version", 1), "started_at", "unknown field"),  # v1 has its own shape
        (_set("schema_version", "1"), "schema_version", "unsupported version '1'"),
        (_set("schema_version", True), "schema_version", "unsupported version True"),
        (_drop("schema_version"), "schema_version", "unsupported version None"),
        (_set("refund", True), "refund", "unknown field"),
        (_set("usage.audio", 3), "usage.audio", "unknown field"),
        (_drop("started_at"), "started_at", "missing"),
        (_set("started_at", "2024-05-01T12:00:00Z"), "started_at", "must be UTC"),
        (_set("started_at", "2999-01-01T00:00:00.000Z"), "started_at", "not be after"),
        (_drop("service_tier"), "service_tier", "missing"),
        (_set("service_tier", ""), "service_tier", "must not be empty"),
        (_set("price_version", 2027), "price_version", "must be a string"),
        (_drop("price_version"), "price_version", "missing"),
        (_drop("usage.audio_prompt"), "usage.audio_prompt", "missing"),
        (_set("usage.cache_write", -1), "usage.cache_write", "must be >= 0"),
        (_set("usage.cache_write", 1150), "usage.prompt", "less than cached + cache_write"),
        (_set("usage.audio_completion", 290), "usage.completion", "less than reasoning"),
        (_drop("event_id"), "event_id", "missing"),
        (_set("event_id", "not-hex"), "event_id", "32 lowercase hex"),
        (_set("event_id", 123), "event_id", "must be a string, got number"),
        (_set("occurred_at", "2024-05-01T12:00:00Z"), "occurred_at", "must be UTC"),
        (_set("occurred_at", "2024-13-01T12:00:00.000Z"), "occurred_at", "must be UTC"),
        (_set("occurred_at", "2024-05-01T12:00:00.000+00:00"), "occurred_at", "must be UTC"),
        (_drop("request_id"), "request_id", "missing"),
        (_set("request_id", ""), "request_id", "must not be empty"),
        (_set("user_id", "42"), "user_id", "must be an integer, got string"),
        (_set("user_id", 4.2), "user_id", "must be an integer, got number"),
        (_set("user_id", True), "user_id", "must be an integer, got boolean"),
        (_drop("scene"), "scene", "missing"),
        (_set("scene", None), "scene", "must be a string, got null"),
        (_drop("conversation_id"), "conversation_id", "missing"),
        (_set("conversation_id", 7), "conversation_id", "must be a string"),
        (_set("alias", ["gpt-4o"]), "alias", "must be a string, got array"),
        (_set("provider", {}), "provider", "must be a string, got object"),
        (_drop("upstream_model"), "upstream_model", "missing"),
        (_set("stream", "true"), "stream", "must be a boolean"),
        (_set("stream", 1), "stream", "must be a boolean"),
        (_drop("usage"), "usage", "missing"),
        (_set("usage", [1, 2]), "usage", "must be an object"),
        (_drop("usage.cached"), "usage.cached", "missing"),
        (_set("usage.prompt", -1), "usage.prompt", "must be >= 0"),
        (_set("usage.completion", 1.5), "usage.completion", "must be an integer"),
        (_set("usage.total", 1), "usage.total", "must equal prompt + completion"),
        (_set("usage.cached", 5000), "usage.cached", "exceeds usage.prompt"),
        (_set("usage.reasoning", 5000), "usage.reasoning", "exceeds usage.completion"),
        (_set("usage_source", "guessed"), "usage_source", "must be one of"),
        (_set("price_rule", ""), "price_rule", "must not be empty"),
        (_set("credits", -1), "credits", "must be >= 0, got -1"),
        (_set("credits", 1.0), "credits", "must be an integer"),
        (_drop("credits"), "credits", "missing"),
        (_set("outcome", "exploded"), "outcome", "must be one of"),
        (_set("outcome", None), "outcome", "must be one of"),
        (_set("latency_ms", -0.5), "latency_ms", "must be a finite number >= 0"),
        (_set("latency_ms", None), "latency_ms", "must be a number, got null"),
        (_set("latency_ms", "12"), "latency_ms", "must be a number, got string"),
        (_set("ttft_ms", -1), "ttft_ms", "must be a finite number >= 0"),
        (_set("ttft_ms", False), "ttft_ms", "must be a number, got boolean"),
        (_drop("ttft_ms"), "ttft_ms", "missing"),
        (_drop("client_disconnected"), "client_disconnected", "missing"),
        (_set("client_disconnected", 0), "client_disconnected", "must be a boolean"),
        (_set("client_disconnected", None), "client_disconnected", "must be a boolean"),
        (_set("credits", 10**12 + 1), "credits", "must be <= 1000000000000"),
        (_set("usage.prompt", 10**9 + 1), "usage.prompt", "must be <= 1000000000"),
    ],
)
def test_from_json_rejects_bad_messages(
    data: bytes | dict[str, Any], field: str, reason: str
) -> None:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    with pytest.raises(InvalidChargeEvent) as info:
        ChargeEvent.from_json(raw)
    assert info.value.field == field
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)  # the ledger's contract: ValueError
    assert f"{field}: " in str(info.value)


def v1_dict() -> dict[str, Any]:
    """What a version-1 proxy emitted (still in outboxes during an upgrade)."""
    data = valid_dict()
    for key in ("started_at", "service_tier", "price_version", "client_disconnected"):
        del data[key]
    for key in ("endpoint", "attempts"):
        del data[key]
    for key in ("cache_write", "audio_prompt", "audio_completion"):
        del data["usage"][key]
    data["schema_version"] = 1
    data["occurred_at"] = "2024-05-01T12:00:00.123Z"
    return data


def v2_dict() -> dict[str, Any]:
    """What a version-2 proxy emitted: no endpoint, no attempts."""
    data = valid_dict()
    del data["endpoint"], data["attempts"]
    data["schema_version"] = 2
    return data


def test_version_2_events_read_as_one_chat_completions_attempt() -> None:
    event = ChargeEvent.from_json(orjson.dumps(v2_dict()))
    assert (event.endpoint, event.attempts) == ("chat.completions", 1)
    assert (event.credits, event.user_id) == (1, 42)


def test_version_3_fields_round_trip() -> None:
    event = make_event(endpoint="embeddings", attempts=3)
    back = ChargeEvent.from_json(event.to_json())
    assert (back.endpoint, back.attempts) == ("embeddings", 3)


def test_version_1_events_are_still_read_as_they_meant() -> None:
    event = ChargeEvent.from_json(orjson.dumps(v1_dict()))
    assert (event.service_tier, event.price_version) == (None, None)
    assert event.started_at == "2024-05-01T11:59:58.889Z"  # occurred_at - latency_ms
    assert event.usage == USAGE
    assert (event.credits, event.user_id) == (1, 42)


@pytest.mark.parametrize("extra", ["started_at", "price_version", "service_tier"])
def test_version_1_events_must_keep_their_own_shape(extra: str) -> None:
    data = v1_dict()
    data[extra] = None
    with pytest.raises(InvalidChargeEvent, match=f"{extra}: unknown field"):
        ChargeEvent.from_json(orjson.dumps(data))
    data = v1_dict()
    data["usage"]["cache_write"] = 0
    with pytest.raises(InvalidChargeEvent, match=r"usage\.cache_write: unknown field"):
        ChargeEvent.from_json(orjson.dumps(data))


def test_from_json_rejects_nan_latency_written_by_orjson() -> None:
    # orjson writes NaN as null; the reader must catch it rather than store a null.
    event = make_event(latency_ms=float("nan"))
    with pytest.raises(InvalidChargeEvent, match="latency_ms"):
        ChargeEvent.from_json(event.to_json())


# ---------------------------------------------------------------------------
# the published JSON Schema matches what to_json emits
#
# A deliberately minimal walker over the subset of draft 2020-12 the schema uses
# (type, const, enum, required, properties, additionalProperties, minimum, maximum,
# minLength, pattern), so the test needs no jsonschema package.

_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) in (int, float),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}
_SUPPORTED = {
    *("$schema", "$id", "title", "description", "type", "const", "enum", "required"),
    *("properties", "additionalProperties", "minimum", "maximum", "minLength", "pattern"),
}


def schema_errors(schema: dict[str, Any], value: Any, path: str = "$") -> list[str]:
    unsupported = set(schema) - _SUPPORTED
    assert not unsupported, f"extend the test walker for {unsupported}"
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        return [f"{path}: expected {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: not in enum"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_JSON_TYPES[t](value) for t in types):
            return [f"{path}: not of type {types}"]
    errors: list[str] = []
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: below minimum")
    if number and "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: above maximum")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match pattern")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}.{k}: not allowed" for k in value if k not in props]
        for key, sub in props.items():
            if key in value:
                errors += schema_errors(sub, value[key], f"{path}.{key}")
    return errors


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return orjson.loads(SCHEMA_PATH.read_bytes())


def test_schema_lists_exactly_the_emitted_fields(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == list(FIELDS)
    assert list(schema["properties"]) == list(FIELDS)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["outcome"]["enum"] == [o.value for o in Outcome]
    assert schema["properties"]["usage_source"]["enum"] == [s.value for s in UsageSource]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"conversation_id": None, "ttft_ms": None, "latency_ms": 12, "stream": False},
        {"usage": Usage(), "charge": price(None, Usage()), "outcome": Outcome.TIMEOUT},
    ],
)
def test_serialised_events_satisfy_the_schema(
    schema: dict[str, Any], overrides: dict[str, Any]
) -> None:
    assert schema_errors(schema, orjson.loads(make_event(**overrides).to_json())) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("credits", -1),
        ("usage.total", "3"),
        ("event_type", "other"),
        ("schema_version", True),
        ("occurred_at", "yesterday"),
        ("started_at", "today"),
        ("price_version", 5),
        ("usage.audio_prompt", -1),
        ("ttft_ms", "fast"),
        ("client_disconnected", "no"),
        ("credits", 10**12 + 1),
        ("outcome", "exploded"),
        ("extra", 1),
    ],
)
def test_schema_walker_catches_violations(schema: dict[str, Any], path: str, value: Any) -> None:
    # Guards the guard: the schema test above would be vacuous if the walker passed anything.
    assert schema_errors(schema, _set(path, value)) != []


def test_create_puts_every_argument_in_its_own_field() -> None:
    """`create` builds the event positionally: each value lands in the field it names."""
    usage = Usage(11, 7, 3, 2)
    args: dict[str, Any] = {
        "request_id": "req-a",
        "user_id": 41,
        "scene": "scene-b",
        "conversation_id": "conv-c",
        "alias": "alias-d",
        "provider": "prov-e",
        "upstream_model": "model-f",
        "stream": True,
        "usage": usage,
        "usage_source": UsageSource.ESTIMATED,
        "price_rule": "rule-g",
        "credits": 1234,
        "outcome": Outcome.CLIENT_ABORTED,
        "latency_ms": 55.5,
        "ttft_ms": 6.25,
        "service_tier": "flex",
        "price_version": "2024-01-01",
        "client_disconnected": True,
        "endpoint": "responses",
        "attempts": 3,
    }
    now_ms = 1_714_564_800_123
    event = ChargeEvent.create(**args, started_ms=now_ms - 2000, now_ns=now_ms * 1_000_000)
    for name, value in args.items():
        assert getattr(event, name) == value, name
    assert event.occurred_at == "2024-05-01T12:00:00.123Z"
    assert event.started_at == "2024-05-01T11:59:58.123Z"
    assert len(event.event_id) == 32 and int(event.event_id[:12], 16) == now_ms
    assert (event.event_type, event.schema_version) == (EVENT_TYPE, SCHEMA_VERSION)
    assert ChargeEvent.from_json(event.to_json()) == event
    # A start after the end is clamped to the end, as before.
    late = ChargeEvent.create(**args, started_ms=now_ms + 5, now_ns=now_ms * 1_000_000)
    assert late.started_at == late.occurred_at


def test_format_timestamp_remembers_seconds_within_a_bound() -> None:
    from proxy.contract import timestamps

    base = 1_714_564_800_000
    for i in range(timestamps._SECONDS_MAX + 10):
        ms = base + i * 1000 + i % 1000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
        assert format_timestamp(ms) == f"{expected}.{ms % 1000:03d}Z"
        assert len(timestamps._SECONDS) <= timestamps._SECONDS_MAX
    # A start and an end seconds apart, alternating, are both remembered.
    assert format_timestamp(base + 5) == "2024-05-01T12:00:00.005Z"
    assert format_timestamp(base - 3_600_000 + 50) == "2024-05-01T11:00:00.050Z"
    assert format_timestamp(base + 999) == "2024-05-01T12:00:00.999Z"
