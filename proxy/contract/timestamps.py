"""The one timestamp format of the contract: ISO-8601 UTC with milliseconds and `Z`."""

from __future__ import annotations

import time


def format_timestamp(unix_ms: int) -> str:
    """`2024-05-01T12:00:00.123Z` — cheaper than datetime.isoformat() + replace."""
    seconds, millis = divmod(unix_ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


def utc_now_iso() -> str:
    return format_timestamp(time.time_ns() // 1_000_000)
