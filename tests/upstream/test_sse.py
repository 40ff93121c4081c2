"""SSE helpers not covered by tests/billing/test_metering.py: the error event, event
decoding of [DONE]/comments/junk, and the usage-object scan's edge cases."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.upstream import sse


def test_error_event_is_one_terminal_openai_shaped_event() -> None:
    event = sse.error_event("upstream went away", "upstream_error", "upstream_stream_error")
    assert event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    lines = event[:-2].split(b"\n")
    assert lines[0] == b"event: error"
    assert lines[1].startswith(b"data: ") and len(lines) == 2
    assert orjson.loads(lines[1][6:]) == {
        "error": {
            "message": "upstream went away",
            "type": "upstream_error",
            "code": "upstream_stream_error",
            "param": None,
        }
    }


def test_error_event_is_framed_and_decoded_as_one_event() -> None:
    event = sse.error_event('quote " and\nnewline', "t", "c")
    framer = sse.EventFramer()
    assert framer.feed(event) == [event]
    obj = sse.decode_event(event)
    assert obj is not None and obj["error"]["message"] == 'quote " and\nnewline'


@pytest.mark.parametrize(
    "event",
    [
        b"data: [DONE]\n\n",
        b"data:[DONE]\n\n",
        b": keep-alive comment\n\n",
        b"event: ping\n\n",
        b"data: \n\n",
        b"data: {not json\n\n",
        b"data: [1, 2]\n\n",
        b'data: "a string"\n\n',
        b"",
    ],
)
def test_decode_event_gives_none_for_done_comments_and_junk(event: bytes) -> None:
    assert sse.decode_event(event) is None


def test_decode_event_joins_multi_line_data() -> None:
    event = b'event: message\ndata: {"a":\ndata: 1}\n\n'
    assert sse.event_data(event) == b'{"a":\n1}'
    assert sse.decode_event(event) == {"a": 1}


def test_decode_event_reads_crlf_events() -> None:
    assert sse.decode_event(b'data: {"x": true}\r\n\r\n') == {"x": True}


def test_event_data_is_none_without_data_lines() -> None:
    assert sse.event_data(b": only a comment\n\n") is None


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data: {"usage":{"prompt_tokens":1}}\n\n', True),
        (b'data: {"usage" : \t{"prompt_tokens":1}}\n\n', True),
        (b'data: {"usage":null}\n\n', False),
        (b'data: {"choices":[]}\n\n', False),
        (b'data: {"usage":"{"}\n\n', False),
        # A null usage first, a real one later in the same event.
        (b'data: {"usage":null,"x":{"usage":{"total_tokens":2}}}\n\n', True),
        (b'data: {"usage"', False),
        (b'data: {"usage":', False),
    ],
)
def test_has_usage_object(event: bytes, expected: bool) -> None:
    assert sse.has_usage_object(event) is expected


def test_iter_event_objects_keeps_a_truncated_but_whole_last_event() -> None:
    body = b'data: {"a":1}\n\ndata: [DONE]\n\n: c\n\ndata: {"b":2}'
    assert list(sse.iter_event_objects(body)) == [{"a": 1}, {"b": 2}]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"choices": [], "usage": {"prompt_tokens": 1}}, True),
        ({"usage": {"prompt_tokens": 1}}, True),
        ({"choices": [{"index": 0}], "usage": {"prompt_tokens": 1}}, False),
        ({"choices": [], "usage": None}, False),
        ({"choices": []}, False),
    ],
)
def test_is_usage_only_chunk(obj: dict[str, object], expected: bool) -> None:
    assert sse.is_usage_only_chunk(obj) is expected


# -- last_event_end -------------------------------------------------------------------

_SEPS = ("\n\n", "\r\n\r\n", "\r\r", "\n\r\n", "\r\n\n")


@given(
    st.lists(
        st.tuples(st.text(alphabet='ab: {}"', min_size=1, max_size=12), st.sampled_from(_SEPS)),
        min_size=1,
        max_size=8,
    ),
    st.data(),
)
def test_last_event_end_is_where_the_event_holding_a_byte_starts(
    events: list[tuple[str, str]], data: st.DataObject
) -> None:
    raw = b""
    spans = []  # (start, end) of each event's data line, its separator excluded
    for text, sep in events:
        line = ("data: " + text).encode()
        spans.append((len(raw), len(raw) + len(line)))
        raw += line + sep.encode()
    # A byte of an event's line (where a `"usage"` key can be), never of a separator.
    start, end = spans[data.draw(st.integers(0, len(spans) - 1))]
    pos = data.draw(st.integers(start, end - 1))
    assert sse.last_event_end(raw, pos) == start
    assert sse.last_event_end(bytearray(raw), pos) == start


@pytest.mark.parametrize(
    ("raw", "event"),
    [
        # Each blank line kind right after an LF one: the searches start where the one
        # before found its blank line and must still see a separator that starts there.
        (b"data: a\n\ndata: b\r\rdata: u", b"data: u"),
        (b"data: a\n\nd: b\r\n\r\ndata: u", b"data: u"),
        (b"data: a\r\n\r\n:\n\ndata: u", b"data: u"),
        (b"data: a\n\n\r\rdata: u", b"data: u"),
        (b"data: a\n\n\r\n\ndata: u", b"data: u"),
        (b"data: a\n\r\ndata: u", b"data: u"),
        (b"data: a\r\n\n" + b"data: b\n\n" * 200 + b"data: u", b"data: u"),
    ],
)
def test_last_event_end_after_mixed_blank_lines(raw: bytes, event: bytes) -> None:
    pos = raw.rindex(b"u")
    assert raw[sse.last_event_end(raw, pos) :] == event
    assert sse.last_event_end(bytearray(raw), pos) == len(raw) - len(event)
