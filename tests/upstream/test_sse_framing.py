"""SSE framing: every separator form, mixed in one stream, split at any byte."""

from __future__ import annotations

import random

import pytest

from proxy.upstream import sse

EVENTS = [b'data: {"n":%d}' % i for i in range(12)]
SEPARATORS = [b"\n\n", b"\r\n\r\n", b"\r\r", b"\r\n\n", b"\n\r\n", b"\n\r", b"\r\n\r"]


def build(rng: random.Random) -> tuple[bytes, list[bytes]]:
    events = [b": keep-alive\n\n"]  # a comment first, LF, then anything
    for payload in EVENTS:
        eol = rng.choice([b"\n", b"\r\n", b"\r"])
        lines = [b"event: message", payload] if rng.random() < 0.3 else [payload]
        events.append(eol.join(lines) + rng.choice(SEPARATORS))
    return b"".join(events), events


@pytest.mark.parametrize("seed", range(30))
def test_events_are_found_whatever_the_separators_and_splits(seed: int) -> None:
    rng = random.Random(seed)
    body, events = build(rng)
    framer = sse.EventFramer()
    got: list[bytes] = []
    i = 0
    while i < len(body):
        n = rng.randint(1, 25)
        got += framer.feed(body[i : i + n])
        i += n
    got += sse.EventFramer().feed(framer.pending, whole=True)
    assert got == events  # each event exactly, separators and all
    assert [sse.decode_event(e) for e in got] == [None] + [{"n": i} for i in range(12)]


@pytest.mark.parametrize("seed", range(10))
def test_feed_complete_cuts_only_at_event_ends(seed: int) -> None:
    rng = random.Random(seed)
    body, _ = build(rng)
    framer = sse.EventFramer()
    out = b""
    for i in range(0, len(body), 7):
        piece = framer.feed_complete(body[i : i + 7])
        assert sse.EventFramer().feed(piece, whole=True) or not piece
        out += piece
    assert out + framer.pending == body


def test_a_final_cr_waits_for_a_possible_lf() -> None:
    framer = sse.EventFramer()
    assert framer.feed(b"data: 1\r\n\r") == []  # the last CR may be half of a CRLF
    assert framer.feed(b"\n") == [b"data: 1\r\n\r\n"]
    assert framer.separator == b"\r\n\r\n"


def test_relayed_text_sees_non_empty_fragments_only() -> None:
    assert not sse.relayed_text(b'data: {"choices":[{"delta":{"content":""}}]}\n\n')
    assert sse.relayed_text(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    assert sse.relayed_text(b'{"function":{"arguments":"{}"}}')
