"""Server-sent events: framing and cheap byte scanning.

The relay must stay byte-faithful and cheap, so nothing here parses JSON per
chunk: we look for the bytes `"usage"` and only the (single, final) event that
carries a usage object is ever decoded. Completion text is decoded only on the
rare estimate path, after the stream has ended.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from proxy.errors import error_body

USAGE_KEY = b'"usage"'
USAGE_NULL = b',"usage":null'
# A JSON key may be written with escapes (`"\u0075sage"`): events holding one are
# decoded too (an escape is rare outside non-ASCII text from ensure_ascii encoders).
ESCAPE = b"\\u"
# Fragments of text a client can receive, for the cheap "was anything relayed" check.
_TEXT_KEYS = (b'content":"', b'arguments":"', b'transcript":"', b'refusal":"')
DONE_PAYLOAD = b"[DONE]"


# A blank line ends an event; a line ends with CRLF, LF or a lone CR (the SSE spec,
# "Interpreting an event stream"). A lone CR must not be the first half of a CRLF.
_EOL = rb"(?:\r\n|\r(?!\n)|\n)"
_EVENT_END = re.compile(_EOL + _EOL)


class EventFramer:
    """Splits an arbitrary byte stream into complete SSE events.

    Upstream reads end anywhere (mid-line, mid-event); `feed` returns the complete
    events (each with its terminating blank line, bytes untouched) and keeps the
    remainder. Every separator form is understood, mixed within one stream
    (`\n\n`, `\r\n\r\n`, `\r\r`, `\r\n\n`, ...). The common case, a stream
    of `\n` line endings only, takes a fast path (`find` instead of a regex); the
    first separator seen is kept as `separator` for StreamMeter's fast path.
    """

    __slots__ = ("_sep", "pending")

    def __init__(self) -> None:
        # Bytes of an event not terminated yet: a plain attribute, not a property,
        # because the relay's per-chunk fast paths read it (a property is a Python
        # call each time).
        self.pending = b""
        self._sep: bytes | None = None

    def _ends(self, buf: bytes, whole: bool = False) -> list[int]:
        """End offsets of the complete events in `buf` (`whole`: buf ends where an
        event does, so a final CR is a line ending, not half of a CRLF)."""
        ends: list[int] = []
        if b"\r" not in buf:  # LF only: JSON data never holds a raw CR
            start = 0
            while True:
                end = buf.find(b"\n\n", start)
                if end < 0:
                    break
                start = end + 2
                ends.append(start)
        else:
            for m in _EVENT_END.finditer(buf):
                # A CR at the very end may be the first half of a CRLF still to come.
                if not whole and m.end() == len(buf) and buf.endswith(b"\r"):
                    break
                ends.append(m.end())
        if ends and self._sep is None:
            found = _EVENT_END.search(buf, 0, ends[0])
            self._sep = found.group(0) if found is not None else b"\n\n"
        return ends

    def feed(self, data: bytes, *, whole: bool = False) -> list[bytes]:
        """The complete events so far; `whole` says `data` ends at an event's end
        (what `feed_complete` returned, or a stream that has ended)."""
        buf = self.pending + data if self.pending else data
        events: list[bytes] = []
        start = 0
        for end in self._ends(buf, whole):
            events.append(buf[start:end])
            start = end
        self.pending = buf[start:] if start < len(buf) else b""
        return events

    def feed_complete(self, data: bytes) -> bytes:
        """Like `feed`, but the complete events come back as one bytes object.

        The relay's per-chunk path: no list, no slicing when a read holds whole
        events (the usual case), which is most reads.
        """
        buf = self.pending + data if self.pending else data
        sep = self._sep
        if sep is not None and buf.endswith(sep) and b"\r" not in sep and b"\r" not in buf:
            self.pending = b""
            return buf
        ends = self._ends(buf)
        if not ends:
            self.pending = buf
            return b""
        last = ends[-1]
        self.pending = buf[last:]
        return buf[:last] if last < len(buf) else buf

    @property
    def separator(self) -> bytes | None:
        """The first event separator seen (None until one arrived)."""
        return self._sep


def has_event_end(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """True when `data[start:end]` holds the blank line that ends an event."""
    stop = len(data) if end is None else end
    if data.find(b"\n\n", start, stop) >= 0:
        return True
    return b"\r" in data and _EVENT_END.search(data, start, stop) is not None


def last_event_end(data: bytes | bytearray, end: int) -> int:
    """Where the event holding `data[end]` starts: just after the last blank line
    before `end` (0 when there is none)."""
    # Each later search starts where the one before found a blank line, so a long
    # pass-through stream (LF only) is not scanned whole for CRs (most of the meter's
    # end-of-stream cost before, issue 23). The CRLF search only saves the regex scan
    # on CRLF streams; the regex alone finds every kind of blank line after `best`.
    cut = data.rfind(b"\n\n", 0, end)
    best = cut + 2 if cut >= 0 else 0
    cut = data.rfind(b"\r\n\r\n", best, end)
    if cut >= 0:
        best = cut + 4
    if data.find(b"\r", best, end) >= 0:  # mixed or lone-CR line ends after that
        for m in _EVENT_END.finditer(data, best, end):
            best = m.end()
    return best


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
    events = framer.feed(body, whole=True)
    if framer.pending:
        events.append(framer.pending)  # a truncated last event may still be whole JSON
    for event in events:
        obj = decode_event(event)
        if obj is not None:
            yield obj


def is_usage_only_chunk(obj: dict[str, Any]) -> bool:
    """The extra final chunk OpenAI sends for `include_usage`: no choices, a usage object."""
    choices = obj.get("choices")
    no_choices = not choices or not isinstance(choices, list | dict)
    return no_choices and isinstance(obj.get("usage"), dict)


def without_usage(event: bytes, obj: dict[str, Any]) -> bytes:
    """The event re-written without its `usage` member (a chunk that carries choices
    and the usage we asked for on the caller's behalf): its data lines become one
    `data:` line of the re-encoded object; other lines and the line ending stay."""
    eol = b"\r\n" if b"\r\n" in event else (b"\r" if b"\r" in event else b"\n")
    rest = {k: v for k, v in obj.items() if k != "usage"}
    lines = [line for line in event.splitlines() if line and not line.startswith(b"data:")]
    lines.append(b"data: " + orjson.dumps(rest))
    return eol.join(lines) + eol + eol


def relayed_text(body: bytes, keys: tuple[bytes, ...] = _TEXT_KEYS) -> bool:
    """True when `body` carries a non-empty text or argument fragment (a byte scan;
    escaped keys are not seen, so this can only say yes too rarely). `keys`: the
    fragments that start text in the endpoint's events (proxy.billing.wire_formats)."""
    for key in keys:
        pos = body.find(key)
        while pos >= 0:
            end = pos + len(key)
            if end < len(body) and body[end] != 0x22:  # not an empty string
                return True
            pos = body.find(key, end)
    return False


def error_event(message: str, type: str, code: str) -> bytes:
    """A terminal SSE error event; the OpenAI SDKs raise APIError on it."""
    return b"event: error\ndata: " + error_body(message, type, code) + b"\n\n"
