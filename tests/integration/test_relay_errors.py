"""Relay behaviour of issue 1: byte-faithful streams, OpenAI-shaped errors, upstream
trouble and client disconnects (real TCP servers, fake upstream)."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest

from proxy.devtools.fake_upstream import Behaviour
from tests.fixtures_proxy import StartProxy

MESSAGES = [{"role": "user", "content": "hello there"}]


def assert_openai_error(body: object, code: str | None = None) -> dict:
    assert isinstance(body, dict), body
    err = body["error"]
    assert set(err) >= {"message", "type", "code", "param"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


async def read_stream(h, body: dict) -> bytes:
    async with h.session.post(
        f"{h.url}/v1/chat/completions", data=orjson.dumps(body), headers=h.headers()
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        return await resp.read()


async def read_direct(h, body: dict) -> bytes:
    async with h.session.post(f"{h.upstream_url}/chat/completions", json=body) as resp:
        return await resp.read()


async def test_stream_is_byte_identical_when_usage_requested(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    body = {
        "model": "smart",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    via = await read_stream(h, body)
    direct = await read_direct(h, {**body, "model": "fake-model-v1"})
    assert via == direct
    assert b'"usage":{' in via


async def test_stream_is_byte_identical_without_stream_usage_support(
    start_proxy: StartProxy,
) -> None:
    h = await start_proxy(stream_usage=False)
    body = {"model": "smart", "messages": MESSAGES, "stream": True}
    via = await read_stream(h, body)
    assert via == await read_direct(h, {**body, "model": "fake-model-v1"})
    assert "stream_options" not in h.recorder.requests[0]["body"]


async def test_stream_strips_only_the_usage_we_asked_for(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    body = {"model": "smart", "messages": MESSAGES, "stream": True}
    via = await read_stream(h, body)
    # What the caller would have got from upstream without include_usage.
    direct = await read_direct(h, {**body, "model": "fake-model-v1"})
    assert via == direct
    assert b'"usage"' not in via


async def test_non_stream_relays_body_and_headers(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    body = {"model": "smart", "messages": MESSAGES}
    async with h.session.post(
        f"{h.url}/v1/chat/completions",
        json=body,
        headers={**h.headers(), "X-Request-Id": "caller-req-1"},
    ) as resp:
        via = await resp.read()
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "caller-req-1"
        assert resp.headers["X-Upstream-Request-Id"].startswith("req_fake_")
        assert resp.headers["openai-processing-ms"] == "1"
    assert via == await read_direct(h, {**body, "model": "fake-model-v1"})
    assert h.recorder.requests[0]["headers"]["X-Client-Request-Id"] == "caller-req-1"


async def test_models_and_health(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    async with h.session.get(f"{h.url}/v1/models") as resp:
        assert resp.status == 401  # the alias list is for authenticated callers
        assert_openai_error(await resp.json(), "invalid_api_key")
    async with h.session.get(f"{h.url}/v1/models", headers=h.headers()) as resp:
        models = await resp.json()
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {"smart", "legacy", "freebie", "premium"}
    async with h.session.get(f"{h.url}/healthz") as resp:
        assert resp.status == 200
    async with h.session.get(f"{h.url}/readyz") as resp:
        report = await resp.json()
        assert resp.status == 200 and report["ready"] is True
        assert report["checks"]["config"]["status"] == "ok"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (orjson.dumps({"messages": MESSAGES}), 400, "missing_required_parameter"),
        (orjson.dumps({"model": 5, "messages": MESSAGES}), 400, "invalid_type"),
        (orjson.dumps({"model": "nope", "messages": MESSAGES}), 404, "model_not_found"),
        (orjson.dumps({"model": "smart", "messages": []}), 400, "invalid_type"),
        (orjson.dumps({"model": "smart", "messages": "hi"}), 400, "invalid_type"),
        (orjson.dumps({"model": "smart", "messages": [1]}), 400, "invalid_type"),
        (
            orjson.dumps({"model": "smart", "messages": MESSAGES, "stream": "yes"}),
            400,
            "invalid_type",
        ),
    ],
)
async def test_bad_requests_get_openai_errors(
    start_proxy: StartProxy, payload: bytes, status: int, code: str
) -> None:
    h = await start_proxy()
    async with h.session.post(
        f"{h.url}/v1/chat/completions",
        data=payload,
        headers={**h.headers(), "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == status
        assert_openai_error(await resp.json(), code)
    assert h.recorder.requests == []


async def test_body_over_limit_is_413(start_proxy: StartProxy) -> None:
    h = await start_proxy(extra_yaml="\nserver:\n  max_body_bytes: 1000\n")
    big = {"model": "smart", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with h.session.post(
        f"{h.url}/v1/chat/completions", json=big, headers=h.headers()
    ) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), "request_too_large")

    # Without a Content-Length (chunked upload) the limit holds too.
    async def gen():
        for _ in range(10):
            yield b"x" * 500

    async with h.session.post(
        f"{h.url}/v1/chat/completions", data=gen(), headers=h.headers()
    ) as resp:
        assert resp.status == 413
    assert h.recorder.requests == []


async def test_unknown_route_and_wrong_method(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    async with h.session.get(f"{h.url}/v1/nothing-here") as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json(), "not_found")
    async with h.session.get(f"{h.url}/v1/chat/completions") as resp:
        assert resp.status == 405
        assert_openai_error(await resp.json(), "method_not_allowed")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_upstream_down_is_502(start_proxy: StartProxy) -> None:
    # A provider at a port nobody listens on.
    h = await start_proxy(
        extra_providers=f"  down: {{base_url: 'http://127.0.0.1:{closed_port()}/v1'}}\n",
        extra_aliases="  dead: {provider: down, model: m, price_rule: std}\n",
    )
    status, body, _ = await h.chat({"model": "dead", "messages": MESSAGES})
    assert status == 502
    assert_openai_error(body, "upstream_unavailable")


async def test_upstream_slow_first_byte_is_504(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(first_byte_delay=5), first_byte=0.3)
    for stream in (False, True):
        status, body, _ = await h.chat({"model": "smart", "messages": MESSAGES, "stream": stream})
        assert status == 504
        assert_openai_error(body, "upstream_timeout")


async def test_upstream_error_status_is_relayed(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(status=429))
    status, body, _ = await h.chat({"model": "smart", "messages": MESSAGES})
    assert status == 429
    assert assert_openai_error(body)["message"] == "fake failure"
    h.behaviour.status = 503
    h.behaviour.error_body = b"<html>overloaded</html>"
    status, body, _ = await h.chat({"model": "smart", "messages": MESSAGES, "stream": True})
    assert status == 503
    assert_openai_error(body, "upstream_http_503")


async def test_upstream_dying_mid_stream_ends_with_error_event(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(chunks=10, reset_after=4))
    raw = await read_stream(h, {"model": "smart", "messages": MESSAGES, "stream": True})
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1].startswith(b"event: error\ndata: ")
    err = orjson.loads(events[-1].split(b"data: ", 1)[1])
    assert err["error"]["code"] == "upstream_stream_error"
    # The chunks that did arrive were relayed before the error.
    assert sum(1 for e in events if b'"content"' in e) == 5


async def test_idle_stall_mid_stream_ends_with_timeout_event(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(chunks=10, stall_after=3), idle=0.3)
    raw = await read_stream(h, {"model": "smart", "messages": MESSAGES, "stream": True})
    last = [e for e in raw.split(b"\n\n") if e][-1]
    assert last.startswith(b"event: error")
    assert orjson.loads(last.split(b"data: ", 1)[1])["error"]["code"] == "upstream_timeout"


async def test_openai_sdk_raises_on_mid_stream_error(start_proxy: StartProxy) -> None:
    import openai

    from tests.fixtures_proxy import SERVICE_KEY

    h = await start_proxy(behaviour=Behaviour(chunks=10, reset_after=4))
    client = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=SERVICE_KEY, max_retries=0)
    got = []
    with pytest.raises(openai.APIError):
        async for chunk in await client.chat.completions.create(
            model="smart", messages=MESSAGES, stream=True
        ):
            got.append(chunk)
    assert len(got) >= 4
    await client.close()


async def test_client_disconnect_closes_upstream_and_leaves_no_task(
    start_proxy: StartProxy,
) -> None:
    h = await start_proxy(behaviour=Behaviour(chunks=200, chunk_delay=0.02))
    await asyncio.sleep(0)
    baseline = {t for t in asyncio.all_tasks()}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{h.url}/v1/chat/completions",
            headers=h.headers(),
            json={"model": "smart", "messages": MESSAGES, "stream": True},
        )
        for _ in range(3):
            await resp.content.readline()
        assert h.recorder.open_connections == 1
        resp.close()  # the client goes away mid-stream
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while h.recorder.open_connections and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert h.recorder.open_connections == 0, "upstream stream still open 1 s after disconnect"
    assert h.recorder.closed_early == 1
    deadline = loop.time() + 1.0
    while loop.time() < deadline:
        extra = {t for t in asyncio.all_tasks() - baseline if not t.done()}
        extra.discard(asyncio.current_task())
        if not extra:
            break
        await asyncio.sleep(0.01)
    assert not extra, f"tasks left behind: {extra}"


async def test_authentication_comes_before_validation(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    for body in ({"model": "no-such-alias", "messages": MESSAGES}, {"model": "smart"}):
        status, err, _ = await h.chat(body, {"Authorization": "Bearer sk-wrong"})
        assert status == 401
        assert_openai_error(err, "invalid_api_key")
    assert h.recorder.requests == []


# -- upstream errors never leak provider details or blame the caller (issue 16) ------------


@pytest.mark.parametrize("upstream_status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_refusing_our_key_is_502_upstream_auth_failed(
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    upstream_status: int,
    stream: bool,
) -> None:
    from tests.fixtures_proxy import PROVIDER_KEY

    leaky = orjson.dumps(
        {
            "error": {
                "message": f"Incorrect API key provided: {PROVIDER_KEY}. Org org-42 is disabled.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
                "param": None,
            }
        }
    )
    h = await start_proxy(behaviour=Behaviour(status=upstream_status, error_body=leaky))
    with caplog.at_level("WARNING", logger="proxy.upstream.relay"):
        status, body, headers = await h.chat(
            {"model": "smart", "messages": MESSAGES, "stream": stream}
        )
    assert status == 502
    err = assert_openai_error(body, "upstream_auth_failed")
    assert err["type"] == "upstream_error"
    raw = orjson.dumps(body)
    assert PROVIDER_KEY.encode() not in raw and b"org-42" not in raw
    assert b"invalid_api_key" not in raw  # the caller's key is not the problem
    assert headers["X-Request-Id"]
    (record,) = [r for r in caplog.records if "refused the proxy's credentials" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert PROVIDER_KEY not in record.getMessage()
    await h.flush_events()
    assert h.sink_events() == []  # an upstream refusal is not charged


@pytest.mark.parametrize(
    ("secret", "kept"),
    [
        (b"sk-proj-AbC123_xyz-789", b"sk-[redacted]"),
        (b"Bearer eyJhbGciOi.JIUzI1NiJ9.e30", b"Bearer [redacted]"),
        (b"bearer abc/def+ghi=", b"Bearer [redacted]"),
    ],
)
async def test_other_upstream_error_bodies_are_relayed_without_keys(
    start_proxy: StartProxy, secret: bytes, kept: bytes
) -> None:
    leaky = (
        b'{"error":{"message":"quota exceeded for '
        + secret
        + b' (ask support)","type":"rate_limit","code":"rate_limit_exceeded","param":null}}'
    )
    h = await start_proxy(behaviour=Behaviour(status=429, error_body=leaky))
    status, body, _ = await h.chat({"model": "smart", "messages": MESSAGES})
    assert status == 429
    err = assert_openai_error(body, "rate_limit_exceeded")
    assert err["message"] == "quota exceeded for " + kept.decode() + " (ask support)"
    assert secret not in orjson.dumps(body)
