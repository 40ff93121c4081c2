"""Field readers of the charge event's strict reader (`ChargeEvent.from_json`):
each names the field it rejects."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any, Final

from proxy.contract.timestamps import format_timestamp
from proxy.contract.usage import Usage

_OCCURRED_AT_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


class InvalidChargeEvent(ValueError):
    """A message that is not a valid charge event; `field` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid charge event: {field}: {reason}")
        self.field = field
        self.reason = reason


def json_type(value: object) -> str:
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


def read_field(obj: dict[str, Any], name: str, prefix: str = "") -> Any:
    try:
        return obj[name]
    except KeyError:
        raise InvalidChargeEvent(prefix + name, "missing") from None


def read_str(obj: dict[str, Any], name: str) -> str:
    value = read_field(obj, name)
    if not isinstance(value, str):
        raise InvalidChargeEvent(name, f"must be a string, got {json_type(value)}")
    if not value:
        raise InvalidChargeEvent(name, "must not be empty")
    return value


def read_opt_str(obj: dict[str, Any], name: str) -> str | None:
    return None if read_field(obj, name) is None else read_str(obj, name)


def read_int(
    obj: dict[str, Any],
    name: str,
    *,
    prefix: str = "",
    minimum: int | None = 0,
    maximum: int | None = None,
) -> int:
    value = read_field(obj, name, prefix)
    if type(value) is not int:  # JSON true/false are not integers
        raise InvalidChargeEvent(prefix + name, f"must be an integer, got {json_type(value)}")
    if minimum is not None and value < minimum:
        raise InvalidChargeEvent(prefix + name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidChargeEvent(prefix + name, f"must be <= {maximum}, got {value}")
    return value


def read_bool(obj: dict[str, Any], name: str) -> bool:
    value = read_field(obj, name)
    if not isinstance(value, bool):
        raise InvalidChargeEvent(name, f"must be a boolean, got {json_type(value)}")
    return value


def read_choice(obj: dict[str, Any], name: str, allowed: frozenset[str]) -> str:
    value = read_field(obj, name)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidChargeEvent(name, f"must be one of {sorted(allowed)}, got {value!r}")
    return value


def read_duration(obj: dict[str, Any], name: str) -> float:
    value = read_field(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidChargeEvent(name, f"must be a number, got {json_type(value)}")
    if not math.isfinite(value) or value < 0:
        raise InvalidChargeEvent(name, f"must be a finite number >= 0, got {value}")
    return value


def read_opt_duration(obj: dict[str, Any], name: str) -> float | None:
    return None if read_field(obj, name) is None else read_duration(obj, name)


def read_timestamp(obj: dict[str, Any], name: str) -> str:
    value = read_str(obj, name)
    try:
        if not _OCCURRED_AT_RE.fullmatch(value):
            raise ValueError
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")  # catches month 13 etc.
    except ValueError:
        raise InvalidChargeEvent(
            name, f"must be UTC 'YYYY-MM-DDTHH:MM:SS.mmmZ', got {value!r}"
        ) from None
    return value


def v1_started_at(occurred_at: str, latency_ms: float) -> str:
    """Version 1 had no start time: the end minus the latency it measured."""
    end = datetime.strptime(occurred_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    end_ms = int(end.timestamp() * 1000)
    return format_timestamp(max(end_ms - int(latency_ms), 0))


def read_usage(obj: dict[str, Any], keys: tuple[str, ...], max_tokens: int) -> Usage:
    """`usage` with every count in 0..max_tokens (total up to twice that)."""
    raw = read_field(obj, "usage")
    if not isinstance(raw, dict):
        raise InvalidChargeEvent("usage", f"must be an object, got {json_type(raw)}")
    for key in raw:
        if key not in keys:
            raise InvalidChargeEvent(f"usage.{key}", "unknown field")
    n = {
        key: read_int(
            raw, key, prefix="usage.", maximum=2 * max_tokens if key == "total" else max_tokens
        )
        for key in keys
    }
    prompt, completion, cached, reasoning, total = (
        n[k] for k in ("prompt", "completion", "cached", "reasoning", "total")
    )
    write, audio_in, audio_out = (
        n.get(k, 0) for k in ("cache_write", "audio_prompt", "audio_completion")
    )
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
    if cached + write + audio_in > prompt:
        raise InvalidChargeEvent("usage.prompt", "is less than cached + cache_write + audio_prompt")
    if reasoning + audio_out > completion:
        raise InvalidChargeEvent("usage.completion", "is less than reasoning + audio_completion")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        cache_write_tokens=write,
        audio_prompt_tokens=audio_in,
        audio_completion_tokens=audio_out,
    )
