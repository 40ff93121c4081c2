"""The stream meter keeps what it relayed as reads folded into blocks (issue 23): long
streams of small reads come back whole, and the pass-through tail scan finds the
same usage report as a scan of the whole stream, wherever reads and blocks end; the
strip fast path cuts what framing the whole stream cuts."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.billing.wire_formats import RESPONSES
from proxy.contract.usage import Usage
from proxy.upstream import stream_meter
from proxy.upstream.sse import EventFramer
from proxy.upstream.stream_meter import StreamMeter, _report_in_tail

SEPARATORS = [b"\n\n", b"\r\n\r\n", b"\r\r", b"\r\n\n"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
# Content with escapes, multi-byte text and a quoted "usage" (escaped in JSON: never a key).
WORDS = st.lists(st.sampled_from([" fig", " é", "\\n", "\\r", ' "usage"', "🙂"]), max_size=60)
SEPS = st.lists(st.sampled_from(SEPARATORS), min_size=1, max_size=3)


def chat_stream(words: list[str], seps: list[bytes], usage: bool, done: bool) -> bytes:
    events = [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": w}}], "usage": None}
        for w in words
    ]
    if usage:
        events.append({"id": "c", "choices": [], "usage": USAGE})
    out = [b"data: " + orjson.dumps(e) + seps[i % len(seps)] for i, e in enumerate(events)]
    if done:
        out.append(b"data: [DONE]" + seps[0])
    return b"".join(out)


def relay_in_reads(meter: StreamMeter, data: bytes, sizes: list[int]) -> tuple[bytes, int]:
    sent, pos, reads = [], 0, 0
    while pos < len(data):
        n = sizes[reads % len(sizes)]
        sent.append(meter.relay(data[pos : pos + n]))
        pos += n
        reads += 1
    return b"".join(sent), reads


@settings(max_examples=150, deadline=None)
@given(
    words=WORDS,
    seps=SEPS,
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    usage=st.booleans(),
    done=st.booleans(),
)
def test_pass_through_tail_scan_agrees_with_a_scan_of_the_whole_stream(
    words, seps, sizes, usage, done
) -> None:
    data = chat_stream(words, seps, usage, done)
    meter = StreamMeter(strip_usage=False)
    sent, _ = relay_in_reads(meter, data, sizes)
    assert sent == data  # byte-faithful
    report = meter.report()
    assert report == _report_in_tail(data)  # the whole stream, scanned as before
    if usage:
        assert report is not None and report.usage == Usage(11, 7)
    assert meter.relayed() == data  # after the tail scan, still every byte


def test_a_usage_event_spanning_many_blocks_is_found() -> None:
    # A `response.completed` of ~36 KB read 50 bytes at a time: the event spans
    # several blocks of reads, so the tail has to reach back over more than one.
    words = [" fig"] * 9000
    usage = {"input_tokens": 12, "output_tokens": 900, "total_tokens": 912}
    item = {"type": "message", "content": [{"type": "output_text", "text": "".join(words)}]}
    done = {"type": "response.completed", "response": {"output": [item], "usage": usage}}
    deltas = [{"type": "response.output_text.delta", "delta": w} for w in words[:200]]
    data = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in [*deltas, done]
    )
    meter = StreamMeter(strip_usage=False, fmt=RESPONSES)
    sent, reads = relay_in_reads(meter, data, [50])
    assert sent == data
    assert len(done["response"]["output"][0]["content"][0]["text"]) > 4 * 50 * stream_meter._BLOCK
    assert reads > 8 * stream_meter._BLOCK
    report = meter.report()
    assert report is not None and report.usage == Usage(12, 900)
    assert meter.relayed() == data


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.sampled_from([" a", " b"]), min_size=1, max_size=80),
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    cut=st.integers(0, 100_000),
    strip=st.booleans(),
)
def test_reads_after_the_client_left_join_the_relayed_ones(words, sizes, cut, strip) -> None:
    data = chat_stream(words, [b"\n\n"], True, True)
    cut %= len(data) + 1
    meter = StreamMeter(strip_usage=strip)
    sent, _ = relay_in_reads(meter, data[:cut], sizes)
    sent += meter.unterminated() if cut == len(data) else b""
    for i in range(cut, len(data), 7):  # the client left: the rest is drained
        meter.drain(data[i : i + 7])
    kept = meter.relayed()
    if strip:
        assert kept.startswith(sent)  # the client's bytes, then whole drained events
    else:
        assert kept == data  # reads, contiguous
    assert meter.upstream_usage() == Usage(11, 7)


@settings(max_examples=200, deadline=None)
@given(
    words=WORDS,
    seps=SEPS,
    groups=st.lists(st.integers(1, 3), min_size=1, max_size=5),
    usage=st.booleans(),
)
def test_strip_fast_path_agrees_with_framing_the_whole_stream(words, seps, groups, usage) -> None:
    # Reads of whole events, one to three at a time and with mixed separators: the
    # one-event fast path (taken once the separator is known) must cut exactly what
    # framing the whole stream cuts, and never take a read of two events for one.
    data = chat_stream(words, seps, usage, done=True)
    events = sse_events(data)
    reference = StreamMeter(strip_usage=True)
    expected = reference.relay(data) + reference.unterminated()
    meter = StreamMeter(strip_usage=True)
    sent, i, g = [], 0, 0
    while i < len(events):
        n = groups[g % len(groups)]
        sent.append(meter.relay(b"".join(events[i : i + n])))
        i, g = i + n, g + 1
    sent.append(meter.unterminated())
    assert b"".join(sent) == expected
    assert b'"usage":null' not in expected and b'"usage":{' not in expected
    assert meter.upstream_usage() == (Usage(11, 7) if usage else None)


def sse_events(data: bytes) -> list[bytes]:
    framer = EventFramer()
    return framer.feed(data, whole=True) + ([framer.pending] if framer.pending else [])
