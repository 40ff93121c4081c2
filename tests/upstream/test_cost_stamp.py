"""Cost in band: the usage event gains `cost`; every other byte passes unchanged."""

from __future__ import annotations

import orjson

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
