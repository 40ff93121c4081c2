"""Watching a relayed SSE stream: byte-faithful pass-through (or removal of the usage
chunk we asked for on the caller's behalf), and its usage at the end, reported or
estimated (proxy.billing.metering)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tiktoken

from proxy.billing.metering import Metered, estimate_stream, usage_from_report
from proxy.contract.usage import Usage, UsageSource
from proxy.upstream import sse


class StreamMeter:
    """Watches a relayed SSE stream.

    `relay(data)` takes one upstream read and returns the bytes to send to the
    client: the same bytes, except that the usage-only final chunk we asked for
    on the caller's behalf is removed when `strip_usage` is set. Framing into
    events only happens in that mode; otherwise reads pass through untouched and
    the usage event is found after the stream ends by scanning its tail.
    """

    __slots__ = ("_chunks", "_close", "_framer", "_null_tail", "_sep_len", "_usage", "strip_usage")

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self._framer = sse.EventFramer() if strip_usage else None
        self._chunks: list[bytes] = []  # what the client was sent (references, no copies)
        self._usage: Usage | None = None
        # `,"usage":null}` + the stream's event separator, once that is known.
        self._null_tail: bytes | None = None
        self._close = b""  # `}` + the separator: what the cut leaves of that tail
        self._sep_len = 0

    def relay(self, data: bytes) -> bytes:
        framer = self._framer
        if framer is None:
            self._chunks.append(data)
            return data
        tail = self._null_tail
        if (
            tail is not None
            and data.endswith(tail)
            and data.find(b"\n") >= len(data) - self._sep_len
            and not framer.pending
        ):
            # The usual read: exactly one complete single-line event (its first
            # newline is its terminator; JSON holds no raw newlines) whose last
            # member, closing the top-level object, is `"usage":null`. Cut that
            # member and nothing else needs looking at: ~0.25 us per chunk
            # instead of ~0.6 for framing + replace + scan (measured in-process).
            out = data[: -len(tail)] + self._close
            self._chunks.append(out)
            return out
        out = framer.feed_complete(data)
        if not out:
            return b""
        if tail is None and framer.separator is not None:
            self._close = b"}" + framer.separator
            self._null_tail = sse.USAGE_NULL + self._close
            self._sep_len = len(framer.separator)
        # Chunks carry `"usage":null` only because we asked for usage; the caller
        # did not, so it gets the chunks it would have got. `replace` returns the
        # same object when there is nothing to remove, so it runs unguarded: a
        # guarding `in` would cost a second scan of every chunk. Once the nulls are
        # gone, no `"usage"` left means no usage object to look at (a JSON string
        # cannot hold the raw bytes `"usage"`; its quotes are escaped).
        out = out.replace(sse.USAGE_NULL, b"")
        if sse.USAGE_KEY in out:  # once per stream: the usage event is here
            split = sse.EventFramer()
            events = split.feed(out)
            kept = b"".join(e for e in events if not self._take_usage_event(e))
            out = kept + split.pending  # a stray blank line stays relayed
            if not out:
                return b""
        self._chunks.append(out)
        return out

    def _take_usage_event(self, event: bytes) -> bool:
        """Record usage from this event; True when the event must not be relayed."""
        if not sse.has_usage_object(event):
            return False
        obj = sse.decode_event(event)
        if obj is None:
            return False
        usage = usage_from_report(obj["usage"])
        if usage is not None:
            self._usage = usage
        return sse.is_usage_only_chunk(obj)

    def unterminated(self) -> bytes:
        """An event left incomplete when the stream ended (strip mode only)."""
        return self._framer.pending if self._framer is not None else b""

    def relayed(self) -> bytes:
        return b"".join(self._chunks)

    def upstream_usage(self) -> Usage | None:
        if self._usage is None and self._framer is None and self._chunks:
            self._usage = _usage_in_tail(self._chunks)
        return self._usage


def _usage_in_tail(chunks: list[bytes]) -> Usage | None:
    """Find the usage event near the end of a pass-through stream.

    It is the last data event before `[DONE]`, so scanning backwards over the
    last few reads is enough; only that one event is JSON-decoded.
    """
    tail = b""
    for chunk in reversed(chunks):
        tail = chunk + tail
        if sse.USAGE_KEY in tail and len(tail) > 4096:
            break
    for event in reversed(sse.EventFramer().feed(tail)):
        if sse.has_usage_object(event):
            obj = sse.decode_event(event)
            if obj is not None:
                return usage_from_report(obj["usage"])
    return None


def meter_stream(
    meter: StreamMeter, request_body: Mapping[str, Any], enc: tiktoken.Encoding
) -> Metered:
    usage = meter.upstream_usage()
    if usage is not None:
        return Metered(usage, UsageSource.UPSTREAM)
    return estimate_stream(sse.iter_event_objects(meter.relayed()), request_body, enc)
