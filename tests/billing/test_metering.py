"""Unit tests of SSE framing and stream metering (no servers)."""

from __future__ import annotations

import random

import orjson
import pytest

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.metering import completion_parts, meter_json
from proxy.billing.tokens import count_chat_prompt, count_text
from proxy.billing.usage_report import normalise as usage_from_report
from proxy.contract.usage import Usage, UsageSource
from proxy.upstream import sse
from proxy.upstream.stream_meter import StreamMeter

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3},
    "completion_tokens_details": {"reasoning_tokens": 2},
}


@pytest.fixture(scope="module")
def enc():
    return EncodingRegistry().get("o200k_base")


def chunk(delta: dict, usage_null: bool = True) -> bytes:
    obj = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    raw = orjson.dumps(obj)
    if usage_null:
        raw = raw[:-1] + b',"usage":null}'
    return b"data: " + raw + b"\n\n"


def stream(words: list[str], with_usage: bool, sep: bytes = b"\n\n") -> bytes:
    parts = [chunk({"role": "assistant", "content": ""}, with_usage)]
    parts += [chunk({"content": w}, with_usage) for w in words]
    if with_usage:
        parts.append(
            b"data: " + orjson.dumps({"id": "c1", "choices": [], "usage": USAGE}) + b"\n\n"
        )
    parts.append(b"data: [DONE]\n\n")
    body = b"".join(parts)
    return body.replace(b"\n\n", sep) if sep != b"\n\n" else body


def split_randomly(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 40)
        out.append(data[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("seed", range(5))
def test_framer_reassembles_events_split_anywhere(sep: bytes, seed: int) -> None:
    body = stream(["a", "b", "c"], True, sep)
    framer = sse.EventFramer()
    events = [e for piece in split_randomly(body, seed) for e in framer.feed(piece)]
    assert b"".join(events) == body
    assert all(e.endswith(sep) for e in events)
    assert framer.pending == b""


@pytest.mark.parametrize("seed", range(10))
def test_strip_mode_removes_usage_chunk_and_records_usage(seed: int) -> None:
    with_usage = stream(["Hel", "lo", " world"], True)
    without = stream(["Hel", "lo", " world"], False)
    meter = StreamMeter(strip_usage=True)
    out = b"".join(meter.relay(p) for p in split_randomly(with_usage, seed))
    assert out == without  # exactly what the caller would have got without include_usage
    assert meter.upstream_usage() == Usage(11, 7, 3, 2)


def split_by_events(data: bytes, sep: bytes, seed: int) -> list[bytes]:
    """Reads as upstreams usually deliver them: whole events, one or a few per read,
    sometimes cut mid-event."""
    rng = random.Random(seed)
    events = [e + sep for e in data.split(sep) if e]
    out: list[bytes] = []
    i = 0
    while i < len(events):
        n = rng.choice((1, 1, 1, 2, 3))
        piece = b"".join(events[i : i + n])
        i += n
        if rng.random() < 0.2 and len(piece) > 10:  # cut one read in two
            cut = rng.randint(1, len(piece) - 1)
            out += [piece[:cut], piece[cut:]]
        else:
            out.append(piece)
    return out


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("seed", range(20))
def test_strip_mode_on_whole_event_reads(sep: bytes, seed: int) -> None:
    """The per-read fast path (one single-line event ending in `"usage":null`)
    and the general path give the same bytes, whatever mix of reads arrives."""
    words = [f"w{i}" for i in range(30)]
    body = stream(words, True, sep)
    # A comment line (keep-alive) between events: a multi-line read, general path.
    body = body.replace(sep, sep + b": keep-alive" + sep, 1)
    expected = stream(words, False, sep).replace(sep, sep + b": keep-alive" + sep, 1)
    meter = StreamMeter(strip_usage=True)
    out = b"".join(meter.relay(p) for p in split_by_events(body, sep, seed))
    assert out + meter.unterminated() == expected
    assert meter.upstream_usage() == Usage(11, 7, 3, 2)


def test_strip_mode_fast_path_leaves_other_events_alone() -> None:
    meter = StreamMeter(strip_usage=True)
    first = chunk({"content": "a"})
    assert meter.relay(first) == chunk({"content": "a"}, usage_null=False)
    # Whole single-line events without the null member pass unchanged.
    plain = chunk({"content": "b"}, usage_null=False)
    assert meter.relay(plain) == plain
    # Two events in one read: both lose their null, the usage event goes.
    usage_event = b"data: " + orjson.dumps({"id": "c1", "choices": [], "usage": USAGE}) + b"\n\n"
    assert meter.relay(chunk({"content": "c"}) + usage_event) == chunk(
        {"content": "c"}, usage_null=False
    )
    assert meter.upstream_usage() == Usage(11, 7, 3, 2)


def test_pass_through_mode_is_identity_and_finds_usage_in_tail() -> None:
    body = stream(["x"] * 300, True)
    meter = StreamMeter(strip_usage=False)
    pieces = split_randomly(body, 1)
    assert b"".join(meter.relay(p) for p in pieces) == body
    assert meter.upstream_usage() == Usage(11, 7, 3, 2)


def test_no_usage_reported_gives_none() -> None:
    meter = StreamMeter(strip_usage=False)
    meter.relay(stream(["a"], False))
    assert meter.upstream_usage() is None


def test_has_usage_object_distinguishes_null() -> None:
    assert sse.has_usage_object(b'data: {"usage": {"prompt_tokens": 1}}\n\n')
    assert not sse.has_usage_object(b'data: {"usage":null}\n\n')
    assert not sse.has_usage_object(b'data: {"content":"the \\"usage\\" word"}\n\n')


def test_completion_parts_joins_tool_call_fragments() -> None:
    body = b"".join(
        [
            chunk({"content": "Hi"}),
            chunk({"tool_calls": [{"index": 0, "function": {"name": "get_", "arguments": ""}}]}),
            chunk(
                {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"ci'}}]}
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
            b"data: {broken json\n\n",
            b"data: [DONE]\n\n",
        ]
    )
    text, calls = completion_parts(sse.iter_event_objects(body))
    assert text == "Hi"
    assert calls == [("get_weather", '{"city": "Oslo"}')]


def test_usage_from_report_clamps_inconsistent_subsets() -> None:
    u = usage_from_report(
        {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 9},
            "completion_tokens_details": {"reasoning_tokens": 4},
        }
    )
    assert u == Usage(5, 2, 5, 2)
    assert usage_from_report({"prompt_tokens": -1}) is None
    assert usage_from_report({"prompt_tokens": "many"}) is None


def test_meter_json_uses_report_or_estimates(enc) -> None:
    body = orjson.dumps(
        {"choices": [{"message": {"content": "four words right here"}}], "usage": USAGE}
    )
    m = meter_json(body, REQUEST, enc)
    assert m.source is UsageSource.UPSTREAM and m.usage == Usage(11, 7, 3, 2)
    no_usage = orjson.dumps({"choices": [{"message": {"content": "four words right here"}}]})
    m = meter_json(no_usage, REQUEST, enc)
    assert m.source is UsageSource.ESTIMATED
    assert m.usage.prompt_tokens == count_chat_prompt(enc, REQUEST)
    assert m.usage.completion_tokens == count_text(enc, "four words right here")
    m = meter_json(b"not json", REQUEST, enc)
    assert m.usage == Usage(count_chat_prompt(enc, REQUEST), 0)
