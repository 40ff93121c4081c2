"""Watching a relayed SSE stream: byte-faithful pass-through (or removal of the usage
we asked for on the caller's behalf), and its usage at the end, reported or
estimated (proxy.billing.metering)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tiktoken

from proxy.billing.metering import (
    Metered,
    Reply,
    accept_report,
    estimate,
    rejected,
)
from proxy.billing.usage_report import UsageReport
from proxy.billing.wire_formats import CHAT, WireFormat
from proxy.contract.usage import Usage
from proxy.upstream import sse

# Reads kept as they came, then joined into one block: what was relayed stays one
# copy of its bytes (no list of thousands of read objects, issue 23) and grows
# without the realloc copies a single growing bytearray made (~790 of the ~2,200
# instructions metering added to a pass-through chunk under callgrind).
_BLOCK = 64
# ord("\n"), ord("\r"): `int in bytes` is a memchr; `b"\n" in bytes` first tries the
# operand as an int and clears the TypeError (slower than `find`).
_LF = 10
_CR = 13


class StreamMeter:
    """Watches a relayed SSE stream.

    `relay(data)` takes one upstream read and returns the bytes to send to the
    client: the same bytes, except that, when `strip_usage` is set, the usage we
    asked for on the caller's behalf is removed (the usage-only final chunk, the
    `"usage":null` members it implies, and a usage member on a chunk that also has
    choices), so the caller sees what OpenAI would have sent it. Framing into
    events only happens in that mode; otherwise reads pass through untouched and
    the usage event is found after the stream ends by scanning its tail.

    `drain(data)` takes a read after the client left: kept for metering only.

    `fmt` is the endpoint's wire format: where its usage report is and how its
    events carry text (proxy.billing.wire_formats).
    """

    __slots__ = (
        "_blocks",
        "_close",
        "_cut",
        "_drain_framer",
        "_fmt",
        "_framer",
        "_null_tail",
        "_parts",
        "_report",
        "strip_usage",
    )

    def __init__(self, strip_usage: bool, fmt: WireFormat = CHAT) -> None:
        self.strip_usage = strip_usage
        self._fmt = fmt
        self._framer = sse.EventFramer() if strip_usage else None
        # What the client was sent (the fallback estimate needs it): the latest reads
        # (fewer than _BLOCK), and the earlier ones joined _BLOCK at a time.
        self._parts: list[bytes] = []
        self._blocks: list[bytes] = []
        self._report: UsageReport | None = None
        # `,"usage":null}` + the stream's event separator, once that is known.
        self._null_tail: bytes | None = None
        self._close = b""  # `}` + the separator: what the cut leaves of that tail
        self._cut = 0  # -len(_null_tail)
        self._drain_framer: sse.EventFramer | None = None

    def relay(self, data: bytes) -> bytes:
        framer = self._framer
        if framer is None:
            parts = self._parts  # = self._keep_bytes(data), inlined: a call a chunk
            parts.append(data)
            if len(parts) >= _BLOCK:
                self._fold()
            return data
        cut = self._cut
        if cut and data[cut:] == self._null_tail and not framer.pending:
            head = data[:cut]
            if _LF not in head and _CR not in head:
                # The usual read: exactly one complete single-line event (no line
                # break before its terminator; JSON holds no raw CR or LF) whose last
                # member, closing the top-level object, is `"usage":null`. Cut that
                # member and nothing else needs looking at (~0.15 us a chunk
                # in-process, against ~0.6 for framing + replace + scan). A slice
                # compare and `int in bytes` (a memchr) instead of `endswith` and
                # `find`, whose argument parsing cost more than their scans (~900 of
                # the instructions metering added a chunk, under callgrind).
                out = head + self._close
                parts = self._parts  # = self._keep_bytes(out), inlined
                parts.append(out)
                if len(parts) >= _BLOCK:
                    self._fold()
                return out
        out = framer.feed_complete(data)
        if not out:
            return b""
        if not cut and framer.separator is not None:
            self._close = b"}" + framer.separator
            self._null_tail = sse.USAGE_NULL + self._close
            self._cut = -len(self._null_tail)
        # Chunks carry `"usage":null` only because we asked for usage; the caller
        # did not, so it gets the chunks it would have got. `replace` returns the
        # same object when there is nothing to remove, so it runs unguarded: a
        # guarding `in` would cost a second scan of every chunk. Once the nulls are
        # gone, no `"usage"` left means no usage object to look at (a JSON string
        # cannot hold the raw bytes `"usage"`; its quotes are escaped), unless a
        # key is written with escapes: events with a `\u` are decoded too.
        out = out.replace(sse.USAGE_NULL, b"")
        if sse.USAGE_KEY in out or sse.ESCAPE in out:
            split = sse.EventFramer()
            events = split.feed(out, whole=True)
            out = b"".join(self._strip_event(e) for e in events) + split.pending
            if not out:
                return b""
        self._keep_bytes(out)
        return out

    def _keep_bytes(self, data: bytes) -> None:
        parts = self._parts
        parts.append(data)
        if len(parts) >= _BLOCK:
            self._fold()

    def _fold(self) -> None:
        self._blocks.append(b"".join(self._parts))
        self._parts.clear()

    def drain(self, data: bytes) -> None:
        """A read after the client left (disconnect policy `drain`): nothing is sent,
        but its usage report (and its text, for an estimate) counts."""
        framer = self._framer
        if framer is None:  # pass-through mode frames nothing; draining must
            framer = self._drain_framer = self._drain_framer or sse.EventFramer()
            self._keep_bytes(data)  # reads, contiguous with the relayed ones
        events = framer.feed(data)
        if self._framer is not None:
            self._keep_bytes(b"".join(events))  # whole events, like the relayed ones
        for event in events:
            if sse.USAGE_KEY in event or sse.ESCAPE in event:
                self._strip_event(event)

    def has_report(self) -> bool:
        """A plausible usage report has been seen (a drain can stop)."""
        return self._report is not None and self._report.valid

    def _strip_event(self, event: bytes) -> bytes:
        """Record a usage report in this event; return what the client gets of it."""
        obj = sse.decode_event(event)
        if obj is None:
            return event
        report = self._fmt.find_report(obj)
        if report is not None:
            self._keep(report)
        if "usage" not in obj:
            return event
        if sse.is_usage_only_chunk(obj):
            return b""
        return sse.without_usage(event, obj)

    def _keep(self, report: UsageReport) -> None:
        # The last report wins (gateways may repeat a cumulative one), but a valid
        # report is never replaced by an implausible one.
        if report.valid or self._report is None or not self._report.valid:
            self._report = report

    def unterminated(self) -> bytes:
        """What is left in the framer when the stream ended (strip mode only): an
        event without its blank line (or whose final CR could not be told from half
        a CRLF), relayed as it is unless it is usage we asked for."""
        if self._framer is None or not self._framer.pending:
            return b""
        out = self._framer.pending
        if sse.USAGE_KEY in out or sse.ESCAPE in out:
            split = sse.EventFramer()
            events = split.feed(out, whole=True)
            out = b"".join(self._strip_event(e) for e in events) + split.pending
        self._keep_bytes(out)
        return out

    def relayed(self) -> bytes:
        """Every byte the client was sent (and, after a drain, read for metering)."""
        if self._parts:
            self._fold()
        blocks = self._blocks
        if len(blocks) > 1:
            blocks[:] = [b"".join(blocks)]  # joined once, however often asked
        return blocks[0] if blocks else b""

    def _tail(self) -> bytes:
        """The relayed bytes from the start of the event holding the last `"usage"`
        on (all of them when there is none): the report is in that event or a later
        one, and joining the whole stream for it would copy every byte once more.
        The tail takes 1, 2, 4, ... of the last pieces until it holds that event's
        start: a blank line before the `"usage"` (a piece ends anywhere, and the
        usage event may be large: `response.completed` repeats the whole output)."""
        pieces = self._blocks + self._parts
        n = 1
        while n < len(pieces):
            tail = b"".join(pieces[-n:])
            pos = tail.rfind(sse.USAGE_KEY)
            if pos >= 0 and sse.last_event_end(tail, pos) > 0:
                return tail
            n *= 2
        return self.relayed()

    def report(self) -> UsageReport | None:
        if self._report is None and self._framer is None and (self._parts or self._blocks):
            # (After a drain in pass-through mode `_report` may be set already.)
            self._report = _report_in_tail(self._tail(), self._fmt)
        return self._report

    @property
    def fmt(self) -> WireFormat:
        return self._fmt

    def upstream_usage(self) -> Usage | None:
        """The plausible usage report's counts, if one was seen."""
        report = self.report()
        return report.usage if report is not None else None


def _report_in_tail(relayed: bytes, fmt: WireFormat = CHAT) -> UsageReport | None:
    """Find the usage event near the end of a pass-through stream.

    It is the last data event before `[DONE]` (chat) or the last event
    (`response.completed`, which repeats the whole output and may be large), so the
    events from the last blank line before the last `"usage"` on are enough; only
    events that name `"usage"` are JSON-decoded. (A report under an escaped key is
    found by the estimate path, which decodes every event.)
    """
    pos = relayed.rfind(sse.USAGE_KEY)
    if pos < 0:
        return None
    start = sse.last_event_end(relayed, pos)
    for event in reversed(sse.EventFramer().feed(relayed[start:], whole=True)):
        if sse.USAGE_KEY in event:
            obj = sse.decode_event(event)
            report = fmt.find_report(obj) if obj is not None else None
            if report is not None:
                return report
    return None


def meter_stream(
    meter: StreamMeter,
    request_body: Mapping[str, Any],
    enc: tiktoken.Encoding,
    size: int | None = None,
) -> Metered:
    """The stream's usage: the report when plausible, else the estimate (which may be
    a BOUNDED one, for the caller to refine off the loop)."""
    fmt = meter.fmt
    report = meter.report()
    if report is not None and report.usage is not None:
        # Plausible for what was relayed: a report of no completion at all while text
        # was relayed is not (a cheap check; only done when the report says zero).
        floor = 1 if report.usage.completion_tokens == 0 and _text_relayed(meter) else 0
        accepted = accept_report(report, floor)
        if accepted is not None:
            return accepted
    objects = list(sse.iter_event_objects(meter.relayed()))
    if report is None:
        # Keys written with escapes hide from the byte scans; decoding finds them.
        for obj in reversed(objects):
            found = fmt.find_report(obj)
            if found is not None:
                report = found
                break
    reply = fmt.stream_reply(objects)
    accepted = accept_report(report, reply.floor)
    if accepted is not None:
        return accepted
    return estimate(request_body, reply, enc, size=size, flags=rejected(report), fmt=fmt)


def estimate_reply(meter: StreamMeter) -> Reply:
    """What the client received, decoded (for an off-loop refinement)."""
    return meter.fmt.stream_reply(sse.iter_event_objects(meter.relayed()))


def _text_relayed(meter: StreamMeter) -> bool:
    return sse.relayed_text(meter.relayed(), meter.fmt.text_keys)
