"""Server-sent events: framing and cheap byte scanning.

The relay must stay byte-faithful and cheap, so nothing here parses JSON per
chunk: we look for the bytes `"usage"` and only the (single, final) event that
carries a usage object is ever decoded. Completion text is decoded only on the
rare estimate path, after the stream has ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from proxy.errors import error_body

USAGE_KEY = b'"usage"'
USAGE_NULL = b',"usage":null'
DONE_PAYLOAD = b"[DONE]"


class EventFramer:
    """Splits an arbitrary byte stream into complete SSE events.

    Upstream reads end anywhere (mid-line, mid-event); `feed` returns the complete
    events (each with its terminating blank line, bytes untouched) and keeps the
    remainder. The separator (`\\n\\n` or `\\r\\n\\r\\n`) is learnt from the first
    line ending seen, since one upstream never mixes them.
    """

    __slots__ = ("_buf", "_sep")

    def __init__(self) -> None:
        self._buf = b""
        self._sep: bytes | None = None

    def _learn_separator(self, buf: bytes) -> bytes | None:
        """From the first line ending (None until one arrived); called until then only."""
        nl = buf.find(b"\n")
        if nl < 0:
            return None
        self._sep = b"\r\n\r\n" if nl > 0 and buf[nl - 1] == 0x0D else b"\n\n"
        return self._sep

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        sep = self._sep or self._learn_separator(buf)
        if sep is None:
            self._buf = buf
            return []
        events: list[bytes] = []
        start = 0
        step = len(sep)
        while True:
            end = buf.find(sep, start)
            if end < 0:
                break
            events.append(buf[start : end + step])
            start = end + step
        self._buf = buf[start:] if start < len(buf) else b""
        return events

    def feed_complete(self, data: bytes) -> bytes:
        """Like `feed`, but the complete events come back as one bytes object.

        The relay's per-chunk path: no list, no slicing when a read holds whole
        events (the usual case), which is most reads.
        """
        buf = self._buf + data if self._buf else data
        sep = self._sep or self._learn_separator(buf)
        if sep is None:
            self._buf = buf
            return b""
        if buf.endswith(sep):
            self._buf = b""
            return buf
        # Cut after the last separator, found scanning forward as `feed` does.
        # (The same bytes come out either way; runs of extra blank lines may only
        # be cut at a different place.)
        start = 0
        step = len(sep)
        while True:
            end = buf.find(sep, start)
            if end < 0:
                break
            start = end + step
        self._buf = buf[start:]
        return buf[:start]

    @property
    def separator(self) -> bytes | None:
        """The event separator, once the first line ending has been seen."""
        return self._sep

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been terminated yet."""
        return self._buf


def has_usage_object(event: bytes) -> bool:
    """True when the event carries `"usage": {...}` (not `"usage": null`)."""
    pos = event.find(USAGE_KEY)
    while pos >= 0:
        i = pos + len(USAGE_KEY)
        n = len(event)
        while i < n and event[i] in b" \t:":
            i += 1
        if i < n and event[i] == 0x7B:  # "{"
            return True
        pos = event.find(USAGE_KEY, i)
    return False


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` payload of one SSE event, or None if it has none."""
    parts = [
        line[5:].lstrip(b" ") if line.startswith(b"data:") else None for line in event.splitlines()
    ]
    data = [p for p in parts if p is not None]
    return b"\n".join(data) if data else None


def decode_event(event: bytes) -> dict[str, Any] | None:
    """JSON object of the event's data, or None for `[DONE]`, comments or junk."""
    payload = event_data(event)
    if not payload or payload == DONE_PAYLOAD:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def iter_event_objects(body: bytes) -> Iterator[dict[str, Any]]:
    """Every decodable JSON object in a relayed SSE body (estimate path only)."""
    framer = EventFramer()
    events = framer.feed(body)
    if framer.pending:
        events.append(framer.pending)  # a truncated last event may still be whole JSON
    for event in events:
        obj = decode_event(event)
        if obj is not None:
            yield obj


def is_usage_only_chunk(obj: dict[str, Any]) -> bool:
    """The extra final chunk OpenAI sends for `include_usage`: no choices, a usage object."""
    return not obj.get("choices") and isinstance(obj.get("usage"), dict)


def error_event(message: str, type: str, code: str) -> bytes:
    """A terminal SSE error event; the OpenAI SDKs raise APIError on it."""
    return b"event: error\ndata: " + error_body(message, type, code) + b"\n\n"
