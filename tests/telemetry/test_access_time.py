"""The access line's `time`: orjson's text of `datetime.now(UTC)` with OPT_UTC_Z."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from proxy.telemetry import access_log


@pytest.mark.parametrize("micros", [0, 1, 9, 10, 99_999, 100_000, 123_456, 999_999])
def test_time_text_is_what_orjson_writes(micros: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = 1_714_564_800 + micros % 7
    ns = seconds * 1_000_000_000 + micros * 1000 + 999
    monkeypatch.setattr(access_log.time, "time_ns", lambda: ns)
    when = dt.datetime.fromtimestamp(seconds, dt.UTC).replace(microsecond=micros)
    expected = orjson.dumps(when, option=orjson.OPT_UTC_Z).decode().strip('"')
    assert access_log._now_text() == expected
