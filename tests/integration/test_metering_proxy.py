"""Usage, outcome and charge of whole requests through the proxy (issue 3 acceptance)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.metering import completion_parts
from proxy.billing.tokens import count_chat_prompt, count_text
from proxy.devtools.fake_upstream import Behaviour
from proxy.upstream import sse
from tests.fixtures_proxy import StartProxy

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Count the figs.", "name": "ann"},
]
REQ = {"model": "smart", "messages": MESSAGES}


def enc():
    return EncodingRegistry().get("o200k_base")


async def settled(h, n: int = 1) -> list[dict]:
    events = await h.wait_events(n)
    await asyncio.sleep(0.05)  # nothing more may arrive
    events = h.sink_events()
    assert len(events) == n, events
    return events


async def test_upstream_usage_is_passed_through_exactly(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(cached_tokens=3, reasoning_tokens=5))
    status, body, _ = await h.chat(
        {**REQ, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200
    last_usage = [
        orjson.loads(e[6:])
        for e in body.split(b"\n\n")
        if e.startswith(b"data: {") and b'"usage":{' in e
    ][-1]["usage"]
    (event,) = await settled(h)
    assert event["usage_source"] == "upstream"
    assert event["usage"] == {
        "prompt": last_usage["prompt_tokens"],
        "completion": last_usage["completion_tokens"],
        "cached": 3,
        "cache_write": 0,
        "audio_prompt": 0,
        "reasoning": 5,
        "audio_completion": 0,
        "total": last_usage["prompt_tokens"] + last_usage["completion_tokens"],
    }
    assert event["outcome"] == "completed"
    # std rule: 1000 input / 500 cached / 2000 output per 1M → rounded up.
    u = last_usage
    raw = ((u["prompt_tokens"] - 3) * 1000 + 3 * 500 + u["completion_tokens"] * 2000) / 1e6
    assert event["credits"] == -(-raw // 1)


async def test_non_stream_usage_from_body(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    _, body, _ = await h.chat(REQ)
    (event,) = await settled(h)
    assert event["usage_source"] == "upstream"
    assert event["usage"]["prompt"] == body["usage"]["prompt_tokens"]
    assert event["usage"]["completion"] == body["usage"]["completion_tokens"]


async def test_non_stream_without_usage_is_estimated(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(usage_in_body=False))
    status, body, _ = await h.chat(REQ)
    assert status == 200 and "usage" not in body
    (event,) = await settled(h)
    e = enc()
    assert event["usage_source"] == "estimated"
    assert event["usage"]["prompt"] == count_chat_prompt(e, REQ)
    assert event["usage"]["completion"] == count_text(e, body["choices"][0]["message"]["content"])


async def test_provider_without_stream_usage_is_estimated(start_proxy: StartProxy) -> None:
    h = await start_proxy(stream_usage=False)
    _, body, _ = await h.chat({**REQ, "stream": True})
    text, _ = completion_parts(sse.iter_event_objects(body))
    (event,) = await settled(h)
    assert event["usage_source"] == "estimated"
    assert event["usage"]["completion"] == count_text(enc(), text)
    assert event["usage"]["prompt"] == count_chat_prompt(enc(), REQ)


async def test_client_abort_after_k_chunks_is_charged_for_relayed_text(
    start_proxy: StartProxy,
) -> None:
    h = await start_proxy(behaviour=Behaviour(chunks=100, chunk_delay=0.01))
    received = b""
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{h.url}/v1/chat/completions", headers=h.headers(), json={**REQ, "stream": True}
        )
        while received.count(b'"content":"') < 6:  # role chunk + 5 content chunks
            received += await resp.content.readany()
        resp.close()
    (event,) = await settled(h)
    assert event["outcome"] == "client_aborted"
    assert event["usage_source"] == "estimated"
    # Everything the proxy relayed (the client may have received a bit more than it read).
    assert event["usage"]["completion"] >= count_text(
        enc(), completion_parts(sse.iter_event_objects(received))[0]
    )
    assert event["usage"]["prompt"] == count_chat_prompt(enc(), REQ)
    assert event["credits"] >= 1


async def test_client_abort_estimate_equals_count_of_relayed_text(
    start_proxy: StartProxy,
) -> None:
    """Abort exactly after k chunks: the proxy's estimate equals tiktoken's count of them."""
    h = await start_proxy(behaviour=Behaviour(chunks=50, chunk_delay=0.05))
    k = 4
    reader, writer = await asyncio.open_connection("127.0.0.1", int(h.url.rsplit(":", 1)[1]))
    body = orjson.dumps({**REQ, "stream": True})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    head += "".join(f"{k_}: {v}\r\n" for k_, v in h.headers().items())
    writer.write(head.encode() + b"\r\n" + body)
    data = b""
    while data.count(b'"content":"') < k + 1:
        data += await reader.read(65536)
    writer.close()  # abort while the next chunk is 50 ms away
    (event,) = await settled(h)
    assert event["outcome"] == "client_aborted"
    words = data.split(b"\r\n\r\n", 1)[1]
    # Chunked transfer framing aside, the relayed events are in `data` verbatim.
    text, _ = completion_parts(
        sse.iter_event_objects(
            b"".join(line + b"\n\n" for line in words.split(b"\n") if line.startswith(b"data: "))
        )
    )
    assert event["usage"]["completion"] == count_text(enc(), text)


async def test_upstream_death_mid_stream_is_upstream_error_with_estimate(
    start_proxy: StartProxy,
) -> None:
    h = await start_proxy(behaviour=Behaviour(chunks=20, reset_after=6))
    _, body, _ = await h.chat({**REQ, "stream": True})
    text, _ = completion_parts(sse.iter_event_objects(body))
    (event,) = await settled(h)
    assert event["outcome"] == "upstream_error"
    assert event["usage_source"] == "estimated"
    assert event["usage"]["completion"] == count_text(enc(), text) > 0


async def test_skip_charge_and_free_alias_emit_no_event(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    await h.chat(REQ, headers=h.headers(**{"X-Skip-Charge": "true"}))
    await h.chat({**REQ, "model": "freebie"})
    await h.chat(REQ, headers=h.headers(user_id=None))  # nobody to charge
    await h.flush_events()
    events = h.sink_events()
    # Free alias: zero credits but still an event (tokens were used: the ledger sees them).
    assert [e["price_rule"] for e in events] == ["free"]
    assert events[0]["credits"] == 0


async def test_upstream_error_status_is_not_charged(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(status=500))
    status, _, _ = await h.chat(REQ)
    assert status == 500
    await h.flush_events()
    assert h.sink_events() == []
