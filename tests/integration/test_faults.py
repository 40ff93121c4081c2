"""Fault injection: upstream, Redis and Kafka misbehave; the proxy keeps serving,
answers the right error, and charges exactly what was relayed.

Upstream faults come from the fake upstream's `Behaviour`; Redis faults from the
real redis-server child (stopped, or SIGSTOPped so calls hang); Kafka faults from
the real test broker being stopped under load.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import orjson
import pytest

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.guard import GuardDecision
from proxy.billing.tokens import count_chat_prompt, count_completion
from proxy.contract.outcome import Outcome
from proxy.contract.usage import UsageSource
from proxy.delivery.kafka import EVENT_ID_HEADER, create_topic
from proxy.devtools.fake_upstream import ENCODINGS, Behaviour, reply_words
from tests.fixtures_kafka import KafkaBroker, KafkaGate, consume_messages
from tests.fixtures_proxy import PROVIDER_KEY, ProxyHarness, RecordingObserver, StartProxy
from tests.fixtures_redis import RedisServer

MESSAGES = [{"role": "user", "content": "Tell me something about faults."}]
ENC = EncodingRegistry().get("o200k_base")  # the `smart` alias's tokenizer


def chat_body(*, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "smart", "messages": MESSAGES, "stream": stream, **extra}


def assert_openai_error(obj: Any, code: str | None = None) -> dict[str, Any]:
    assert isinstance(obj, dict) and set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def relayed_text(raw: bytes) -> str:
    """The completion text a client assembled from the SSE chunks it received."""
    text = []
    for event in sse_events(raw):
        if not event.startswith(b"data: {"):
            continue
        try:
            obj = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            continue
        for choice in obj.get("choices") or ():
            content = choice.get("delta", {}).get("content")
            if isinstance(content, str):
                text.append(content)
    return "".join(text)


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll state owned by the code under test, with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


async def settled(h: ProxyHarness, obs: RecordingObserver, n: int) -> list[dict[str, Any]]:
    """Wait until `n` requests finished (settle may run after the client saw the end
    of an SSE stream) and the outbox handed their events to the sink."""
    await wait_until(lambda: len(obs.finished) >= n, 5, f"{n} requests settled")
    await h.flush_events()
    return h.sink_events()


def set_behaviour(h: ProxyHarness, new: Behaviour) -> None:
    for f in fields(Behaviour):
        setattr(h.behaviour, f.name, getattr(new, f.name))


def expected_prompt_tokens() -> int:
    return count_chat_prompt(ENC, chat_body())


# -- upstream ---------------------------------------------------------------------------


async def test_upstream_refusing_connections_is_502_and_not_charged(
    start_proxy: StartProxy,
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(observer=obs)
    status, body, _ = await h.chat(chat_body())
    assert status == 200  # a pooled keep-alive connection exists now
    await h.stop_upstream()
    for stream in (False, True):
        status, body, headers = await h.chat(chat_body(stream=stream))
        assert status == 502
        assert_openai_error(body, "upstream_unavailable")
        assert headers["X-Request-Id"]
    # The proxy itself keeps serving.
    async with h.session.get(f"{h.url}/healthz") as resp:
        assert resp.status == 200
    events = await settled(h, obs, 3)
    assert len(events) == 1  # only the first, successful request
    failed = obs.finished[1:]
    assert [(f.outcome, f.status, f.event_id) for f in failed] == [
        (Outcome.UPSTREAM_ERROR, 502, None)
    ] * 2


@pytest.mark.parametrize("stream", [False, True])
async def test_no_response_head_within_first_byte_is_504(
    start_proxy: StartProxy, stream: bool
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(behaviour=Behaviour(first_byte_delay=30), first_byte=0.3, observer=obs)
    status, body, _ = await h.chat(chat_body(stream=stream))
    assert status == 504
    assert_openai_error(body, "upstream_timeout")
    assert await settled(h, obs, 1) == []
    assert obs.finished[0].outcome is Outcome.TIMEOUT
    # The stalled upstream exchange was abandoned, not left hanging.
    await wait_until(lambda: h.recorder.open_connections == 0, 5, "upstream released")


@pytest.mark.parametrize("status", [429, 500, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_status_is_relayed_with_its_json(
    start_proxy: StartProxy, status: int, stream: bool
) -> None:
    upstream_error = {
        "error": {"message": "slow down", "type": "rate_limit", "code": "x", "param": None}
    }
    obs = RecordingObserver()
    h = await start_proxy(
        behaviour=Behaviour(status=status, error_body=orjson.dumps(upstream_error)), observer=obs
    )
    got_status, body, headers = await h.chat(chat_body(stream=stream))
    assert got_status == status
    assert body == upstream_error
    assert headers["Content-Type"].startswith("application/json")
    assert await settled(h, obs, 1) == []
    assert obs.finished[0].outcome is Outcome.UPSTREAM_ERROR
    assert obs.finished[0].status == status


async def test_upstream_error_status_without_json_is_wrapped(start_proxy: StartProxy) -> None:
    obs = RecordingObserver()
    h = await start_proxy(
        behaviour=Behaviour(status=503, error_body=b"<html>Service Unavailable</html>"),
        observer=obs,
    )
    status, body, _ = await h.chat(chat_body())
    assert status == 503
    assert_openai_error(body, "upstream_http_503")
    assert b"<html>" not in orjson.dumps(body)
    assert await settled(h, obs, 1) == []


async def test_reset_mid_stream_ends_with_error_event_and_charges_what_was_relayed(
    start_proxy: StartProxy,
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(behaviour=Behaviour(reset_after=3), observer=obs)
    status, raw, _ = await h.chat(chat_body(stream=True))
    assert status == 200
    assert isinstance(raw, bytes)
    last = sse_events(raw)[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert_openai_error(orjson.loads(last.split(b"data: ", 1)[1]), "upstream_stream_error")
    assert b"[DONE]" not in raw
    sent_upstream = h.recorder.requests[0]["body"]
    relayed = " ".join(reply_words(sent_upstream, 8)[:3])
    assert relayed_text(raw) == relayed

    [event] = await settled(h, obs, 1)
    assert event["outcome"] == Outcome.UPSTREAM_ERROR
    assert event["usage_source"] == UsageSource.ESTIMATED
    assert event["usage"]["prompt"] == expected_prompt_tokens()
    assert event["usage"]["completion"] == count_completion(ENC, relayed)
    assert event["credits"] > 0


async def stream_cut_by_timeout(h: ProxyHarness) -> tuple[bytes, dict[str, Any]]:
    """Stream one request that a proxy timeout ends: 200, then an SSE error event.
    Returns the raw stream and the error event's JSON."""
    async with asyncio.timeout(20):
        status, raw, _ = await h.chat(chat_body(stream=True))
    assert status == 200
    assert isinstance(raw, bytes)
    last = sse_events(raw)[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = orjson.loads(last.split(b"data: ", 1)[1])
    assert_openai_error(error, "upstream_timeout")
    return raw, error


async def test_stall_between_chunks_ends_with_timeout_event_and_charges_what_was_relayed(
    start_proxy: StartProxy,
) -> None:
    obs = RecordingObserver()
    # A first-byte limit far above the idle one: the idle limit alone must end the
    # stall (a hang here means the first-byte deadline was still the one armed).
    h = await start_proxy(behaviour=Behaviour(stall_after=2), first_byte=60, idle=0.3, observer=obs)
    raw, _ = await stream_cut_by_timeout(h)
    relayed = " ".join(reply_words(h.recorder.requests[0]["body"], 8)[:2])
    assert relayed_text(raw) == relayed

    [event] = await settled(h, obs, 1)
    assert event["outcome"] == Outcome.TIMEOUT
    assert event["usage_source"] == UsageSource.ESTIMATED
    assert event["usage"]["completion"] == count_completion(ENC, relayed)
    await wait_until(lambda: h.recorder.open_connections == 0, 5, "stalled upstream released")


async def test_stream_past_total_limit_ends_with_timeout_event(start_proxy: StartProxy) -> None:
    """A stream that keeps trickling (never idle) is still cut at `timeouts.total`."""
    obs = RecordingObserver()
    h = await start_proxy(
        behaviour=Behaviour(chunks=100, chunk_delay=0.05),
        first_byte=60,
        idle=60,
        total=0.5,
        observer=obs,
    )
    raw, error = await stream_cut_by_timeout(h)
    assert "(total)" in error["error"]["message"]
    assert 0 < len(relayed_text(raw).split()) < 100
    [event] = await settled(h, obs, 1)
    assert event["outcome"] == Outcome.TIMEOUT
    assert event["usage"]["completion"] == count_completion(ENC, relayed_text(raw))


async def test_non_streamed_reply_past_total_limit_is_504(start_proxy: StartProxy) -> None:
    h = await start_proxy(
        behaviour=Behaviour(first_byte_delay=1.0), first_byte=60, idle=60, total=0.3
    )
    async with asyncio.timeout(20):
        status, body, _ = await h.chat(chat_body())
    assert status == 504
    assert_openai_error(body, "upstream_timeout")
    assert "(total, waiting for the response head)" in body["error"]["message"]


@pytest.mark.parametrize("usage_requested", [False, True])
async def test_malformed_sse_event_is_relayed_and_metering_survives(
    start_proxy: StartProxy, usage_requested: bool
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(behaviour=Behaviour(malformed_stream=True), observer=obs)
    extra = {"stream_options": {"include_usage": True}} if usage_requested else {}
    status, raw, _ = await h.chat(chat_body(stream=True, **extra))
    assert status == 200
    assert isinstance(raw, bytes)
    assert b"data: {this is not json\n\n" in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    if usage_requested:
        # Pass-through mode is byte-faithful: the same bytes as calling upstream directly.
        direct_body = {**chat_body(stream=True, **extra), "model": "fake-model-v1"}
        async with h.session.post(
            f"{h.upstream_url}/chat/completions",
            json=direct_body,
            headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
        ) as resp:
            assert raw == await resp.read()
    [event] = await settled(h, obs, 1)
    assert event["outcome"] == Outcome.COMPLETED
    assert event["usage_source"] == UsageSource.UPSTREAM


async def test_non_json_success_body_is_relayed_and_charged_for_the_prompt(
    start_proxy: StartProxy,
) -> None:
    """Documented choice: a 200 whose body is not JSON is relayed as received (the
    caller's SDK reports it) and the prompt is charged as an estimate, since the
    upstream did consume it; there is no completion to count."""
    obs = RecordingObserver()
    h = await start_proxy(behaviour=Behaviour(invalid_json=True), observer=obs)
    async with h.session.post(
        f"{h.url}/v1/chat/completions", json=chat_body(), headers=h.headers()
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == b"{not json"
    [event] = await settled(h, obs, 1)
    assert event["usage_source"] == UsageSource.ESTIMATED
    assert event["usage"]["prompt"] == expected_prompt_tokens()
    assert event["usage"]["completion"] == 0


async def test_faults_in_turn_never_stop_the_proxy_serving(start_proxy: StartProxy) -> None:
    """After every kind of upstream fault, a normal request still succeeds, and every
    request is accounted exactly once."""
    obs = RecordingObserver()
    h = await start_proxy(first_byte=1, idle=1, observer=obs)
    # The fake loads its tokenizer lazily; load it now, not inside a timed exchange.
    h.fake_app[ENCODINGS].preload(["o200k_base"])
    faults = [
        Behaviour(reset_after=1),
        Behaviour(stall_after=1),
        Behaviour(first_byte_delay=30),
        Behaviour(status=500),
        Behaviour(malformed_stream=True),
    ]
    for fault in faults:
        set_behaviour(h, fault)
        await h.chat(chat_body(stream=True), h.headers(**{"X-Request-Id": uuid.uuid4().hex}))
        set_behaviour(h, Behaviour())
        status, raw, _ = await h.chat(chat_body(stream=True))
        assert status == 200 and isinstance(raw, bytes) and raw.endswith(b"data: [DONE]\n\n")
    events = await settled(h, obs, 2 * len(faults))
    assert len(obs.finished) == 2 * len(faults)
    assert len({f.request_id for f in obs.finished}) == len(obs.finished)
    charged = {f.request_id: f.event_id for f in obs.finished if f.event_id is not None}
    assert {e["request_id"]: e["event_id"] for e in events} == charged
    await wait_until(lambda: h.recorder.open_connections == 0, 5, "upstream released")


async def test_concurrent_mixed_faults_stay_with_their_request(start_proxy: StartProxy) -> None:
    """Faults picked per request (the fake's `fault_field`) under concurrency: each
    request gets its own outcome, and exactly the requests that relayed tokens are
    charged, once."""
    obs = RecordingObserver()
    h = await start_proxy(
        behaviour=Behaviour(fault_field="x_fault", chunk_delay=0.005), observer=obs
    )
    kinds = ["ok", "reset", "status:500", "malformed", "status:429"] * 12

    async def one(i: int, kind: str) -> tuple[str, int, Any]:
        extra = {} if kind == "ok" else {"x_fault": kind}
        status, body, _ = await h.chat(
            chat_body(stream=True, **extra), h.headers(**{"X-Request-Id": f"mix-{i}"})
        )
        return kind, status, body

    results = await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds)))
    for kind, status, body in results:
        if kind.startswith("status:"):
            assert status == int(kind[7:])
            assert_openai_error(body)
            continue
        assert status == 200 and isinstance(body, bytes)
        if kind == "reset":
            assert sse_events(body)[-1].startswith(b"event: error\n")
        else:
            assert body.endswith(b"data: [DONE]\n\n")
    events = await settled(h, obs, len(kinds))
    charged = {f"mix-{i}" for i, k in enumerate(kinds) if not k.startswith("status:")}
    assert sorted(e["request_id"] for e in events) == sorted(charged)
    assert len({e["event_id"] for e in events}) == len(events)
    await wait_until(lambda: h.recorder.open_connections == 0, 5, "upstream released")


# -- Redis ------------------------------------------------------------------------------


async def _fund(server: RedisServer, prefix: str) -> None:
    import redis.asyncio as aioredis

    from tests.fixtures_redis import fund

    client = aioredis.Redis.from_url(server.url)
    try:
        await fund(client, prefix, 7)
    finally:
        await client.aclose()


async def test_redis_stopped_guard_fails_open_and_requests_are_charged(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(redis_url=redis_server.url, guard_prefix=redis_prefix, observer=obs)
    await _fund(redis_server, redis_prefix)  # reserve mode: the payer needs a snapshot
    try:
        status, _, _ = await h.chat(chat_body())
        assert status == 200
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="proxy.billing.guard"):
            results = await asyncio.gather(*(h.chat(chat_body()) for _ in range(20)))
        assert [r[0] for r in results] == [200] * 20
        assert any("failing open" in r.getMessage() for r in caplog.records)
        async with h.session.get(f"{h.url}/readyz") as resp:
            report = await resp.json()
            # Degraded, still ready: Redis is not needed to serve.
            assert resp.status == 200 and report["checks"]["redis"]["status"] == "degraded"
        redis_server.start()
        await _fund(redis_server, redis_prefix)  # a restarted test Redis may be empty
        status, _, _ = await h.chat(chat_body())
        assert status == 200
    finally:
        redis_server.ensure_up()
    decisions = [f.guard for f in obs.finished]
    assert decisions == [GuardDecision.ALLOW] + [GuardDecision.FAIL_OPEN] * 20 + [
        GuardDecision.ALLOW
    ]
    events = await settled(h, obs, 22)
    assert len(events) == 22 and len({e["event_id"] for e in events}) == 22


async def test_redis_hanging_guard_gives_up_within_its_budget(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP: connections are accepted but nothing is answered. The guard's own
    budget (not the Redis client's 1 s socket timeout) ends the wait."""
    obs = RecordingObserver()
    h = await start_proxy(
        redis_url=redis_server.url,
        guard_prefix=redis_prefix,
        extra_yaml="  budget_ms: 50\n",  # appended under `guard:`
        observer=obs,
    )
    await _fund(redis_server, redis_prefix)
    try:
        assert (await h.chat(chat_body()))[0] == 200
        redis_server.pause()
        with caplog.at_level(logging.WARNING, logger="proxy.billing.guard"):
            results = await asyncio.gather(*(h.chat(chat_body()) for _ in range(20)))
        assert [r[0] for r in results] == [200] * 20
        reasons = [r.getMessage() for r in caplog.records if "failing open" in r.getMessage()]
        assert reasons and all("50 ms budget" in m for m in reasons), reasons
        redis_server.resume()
        assert (await h.chat(chat_body()))[0] == 200
    finally:
        redis_server.ensure_up()
    assert [f.guard for f in obs.finished] == [GuardDecision.ALLOW] + [
        GuardDecision.FAIL_OPEN
    ] * 20 + [GuardDecision.ALLOW]
    assert len(await settled(h, obs, 22)) == 22


# -- Kafka ------------------------------------------------------------------------------


async def _consume_event_ids(bootstrap: str, topic: str, want: set[str]) -> dict[str, set[bytes]]:
    """event_id -> distinct payloads seen (duplicates of one event must be identical);
    reads again while some of `want` is missing (duplicates can fill the count)."""
    by_id: dict[str, set[bytes]] = {}
    expected = len(want)
    for _ in range(3):
        messages = await consume_messages(bootstrap, topic, expected, 30)
        by_id = {}
        for m in messages:
            by_id.setdefault((m.header(EVENT_ID_HEADER) or b"").decode(), set()).add(m.value)
        if want <= by_id.keys() or len(messages) < expected:
            break
        expected = len(messages) + len(want - by_id.keys())
    return by_id


async def test_kafka_outage_under_load_loses_no_charge(
    start_proxy: StartProxy, gated_kafka: tuple[KafkaBroker, KafkaGate]
) -> None:
    """Kafka unreachable for a few seconds under load (the gate resets connections
    and refuses new ones; the test broker behind it keeps its topics, which a
    restart would lose): callers never notice, the outbox backlog rises, then drains,
    and every charge arrives."""
    _, gate = gated_kafka
    bootstrap = f"127.0.0.1:{gate.port}"
    topic = f"faults-{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, topic)
    obs = RecordingObserver()
    h = await start_proxy(kafka_bootstrap=bootstrap, topic=topic, observer=obs)
    stop = asyncio.Event()
    backlog: list[int] = []

    async def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            status, _, _ = await h.chat(chat_body(stream=n % 2 == 0), h.headers(user_id=i + 1))
            assert status == 200  # Kafka being away never reaches the caller
            n += 1
            backlog.append(h.state.outbox.pending_count())
            await asyncio.sleep(0.02)

    async def run_load(seconds: float) -> None:
        stop.clear()
        clients = [asyncio.create_task(client(i)) for i in range(5)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*clients)

    await run_load(1.0)
    await h.flush_events()
    before = len(obs.finished)
    await gate.close()
    try:
        await run_load(3.0)
        during = len(obs.finished) - before
        # Committed to the outbox and held there: the backlog rose with the load.
        assert h.state.outbox.pending_count() >= during > 0
        assert max(backlog) >= during
    finally:
        await gate.open()
    await wait_until(lambda: h.state.outbox.pending_count() == 0, 60, "outbox drained")

    want = {f.event_id for f in obs.finished if f.event_id}
    assert len(want) == len(obs.finished)  # every request here relayed tokens
    seen = await _consume_event_ids(bootstrap, topic, want)
    assert want <= seen.keys(), f"{len(want - seen.keys())} charges lost"
    assert all(len(payloads) == 1 for payloads in seen.values())
    assert len({f.request_id for f in obs.finished}) == len(obs.finished)
