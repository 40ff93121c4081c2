"""Errors defined once: the redaction of upstream error bodies (issue 16)."""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import redact_secrets, upstream_status_body


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"key sk-abc123 used", b"key sk-[redacted] used"),
        (b"key sk-proj-a_b-c.d used", b"key sk-[redacted] used"),
        (b"task-force and risk-free stay", b"task-force and risk-free stay"),
        (b"Authorization: Bearer abc.def", b"Authorization: Bearer [redacted]"),
        (b"BEARER   x+y/z=", b"Bearer [redacted]"),
        (b"nothing to see", b"nothing to see"),
    ],
)
def test_key_like_strings_are_redacted(raw: bytes, clean: bytes) -> None:
    assert redact_secrets(raw) == clean


def test_the_configured_secret_is_redacted_whatever_its_shape() -> None:
    assert redact_secrets(b"used AKIA-looking-secret-1", "AKIA-looking-secret-1") == (
        b"used [redacted]"
    )
    assert redact_secrets(b"short abc", "abc") == b"short abc"  # too short to mean anything


def test_redacted_json_bodies_stay_json() -> None:
    body = orjson.dumps({"error": {"message": 'sk-abc "quoted" Bearer tok\\en', "code": "x"}})
    out = upstream_status_body(400, body)
    assert orjson.loads(out)["error"]["code"] == "x"
    assert b"sk-abc" not in out and b"Bearer tok" not in out


def test_non_json_bodies_are_wrapped_not_relayed() -> None:
    out = orjson.loads(upstream_status_body(502, b"<html>sk-secret</html>"))
    assert out["error"]["code"] == "upstream_http_502"
