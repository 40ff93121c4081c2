"""Cost in band (opt-in per alias, `cost_in_band: true`): the caller's copy of the
usage report gains `usage.cost`, the credits charged for it.

The upstream layer does not price: it is handed `quote`, billing's answer to "what
does this usage cost this request". Everything but the usage event passes through
byte for byte; the usage event is re-encoded with the added member.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from proxy.billing.usage_report import normalise
from proxy.contract.usage import Usage
from proxy.upstream import sse

Quote = Callable[[Usage], int]

_USAGE_NULL = sse.USAGE_KEY + b":null"


def stamp_json(body: bytes, quote: Quote) -> tuple[bytes, int | None]:
    """A non-streamed body with `usage.cost` added, and the credits (None: no usage)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body, None
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return body, None
    usage = normalise(obj["usage"])
    if usage is None:
        return body, None
    credits = quote(usage)
    obj["usage"]["cost"] = credits
    return orjson.dumps(obj), credits


class StreamCostStamp:
    """Adds `usage.cost` to the usage event of a stream the caller asked usage for."""

    __slots__ = ("_framer", "_quote")

    def __init__(self, quote: Quote) -> None:
        self._quote = quote
        self._framer = sse.EventFramer()

    def feed(self, data: bytes) -> bytes:
        """The bytes to send for one upstream read (complete events only)."""
        if (
            not self._framer.pending
            and data.endswith(b"\n\n")
            and data.count(sse.USAGE_KEY) == data.count(_USAGE_NULL)
        ):
            # The usual read: whole events, none with a usage report. A stream the
            # caller asked usage for has `"usage":null` on every chunk; counting
            # saves framing each one (a raw `"usage"` is always a key: JSON
            # strings escape their quotes).
            return data
        events = self._framer.feed(data)
        return b"".join(self._stamp(e) for e in events)

    def tail(self) -> bytes:
        """What is left when the stream ends (an unterminated event, as received)."""
        return self._framer.pending

    def _stamp(self, event: bytes) -> bytes:
        if not sse.has_usage_object(event):
            return event
        obj = sse.decode_event(event)
        usage = normalise(obj["usage"]) if obj is not None else None
        if obj is None or usage is None:
            return event
        obj["usage"]["cost"] = self._quote(usage)
        sep = b"\r\n\r\n" if event.endswith(b"\r\n\r\n") else b"\n\n"
        return b"data: " + orjson.dumps(obj) + sep
