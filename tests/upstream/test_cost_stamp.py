"""Cost in band: the usage event gains `cost`; every other byte passes unchanged."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.contract.usage import Usage
from proxy.upstream.cost_stamp import StreamCostStamp, stamp_json

USAGE = b'{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}'
CHUNK = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
FINAL = b'data: {"id":"c","choices":[],"usage":' + USAGE + b"}\n\n"
DONE = b"data: [DONE]\n\n"


def quote(usage: Usage) -> int:
    return usage.prompt_tokens * 100 + usage.completion_tokens  # distinct per usage


def test_usage_event_gains_cost_and_the_rest_is_untouched() -> None:
    stamp = StreamCostStamp(quote)
    out = stamp.feed(CHUNK) + stamp.feed(FINAL + DONE) + stamp.tail()
    first, final, done = out.split(b"\n\n")[:3]
    assert first + b"\n\n" == CHUNK
    assert orjson.loads(final[6:])["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cost": 1005,
    }
    assert done + b"\n\n" == DONE


def test_usage_event_split_across_reads_is_still_stamped() -> None:
    stamp = StreamCostStamp(quote)
    data = CHUNK + FINAL + DONE
    out = b"".join(stamp.feed(data[i : i + 7]) for i in range(0, len(data), 7)) + stamp.tail()
    assert out.startswith(CHUNK) and out.endswith(DONE)
    assert b'"cost":1005' in out


def test_crlf_streams_keep_their_separator() -> None:
    stamp = StreamCostStamp(quote)
    out = stamp.feed(FINAL.replace(b"\n\n", b"\r\n\r\n"))
    assert out.endswith(b"}\r\n\r\n") and b'"cost":1005' in out


def test_json_body_gains_cost() -> None:
    body = b'{"id":"c","usage":' + USAGE + b"}"
    stamped, credits = stamp_json(body, quote)
    assert credits == 1005 and orjson.loads(stamped)["usage"]["cost"] == 1005
    assert stamp_json(b'{"id":"c"}', quote) == (b'{"id":"c"}', None)
    assert stamp_json(b"not json", quote) == (b"not json", None)


SPACED_NULL = CHUNK.replace(b'"usage":null', b'"usage": null')
FINAL_CRLF = FINAL.replace(b"\n\n", b"\r\n\r\n")


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(st.sampled_from([CHUNK, SPACED_NULL, DONE]), max_size=12),
    final_at=st.integers(0, 12),
    crlf=st.booleans(),
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=5),
)
def test_only_the_usage_event_changes_whatever_the_reads(events, final_at, crlf, sizes) -> None:
    # Chunks carrying `"usage":null` (how a stream the caller asked usage for looks)
    # pass byte for byte, however reads cut them; the usage event gains its cost.
    final = FINAL_CRLF if crlf else FINAL
    stamped = final.replace(USAGE[:-1], USAGE[:-1] + b',"cost":1005')
    at = final_at % (len(events) + 1)
    data = b"".join([*events[:at], final, *events[at:]])
    want = b"".join([*events[:at], stamped, *events[at:]])
    stamp = StreamCostStamp(quote)
    out, pos, i = [], 0, 0
    while pos < len(data):
        out.append(stamp.feed(data[pos : pos + sizes[i % len(sizes)]]))
        pos += sizes[i % len(sizes)]
        i += 1
    assert b"".join(out) + stamp.tail() == want
