"""Charge events end to end through the real Kafka-protocol broker (issue 4 acceptance)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.contract.charge_event import SCHEMA_VERSION, ChargeEvent
from proxy.contract.redis_keys import key_sha256 as hash_key
from proxy.delivery.kafka import create_topic
from proxy.devtools.fake_upstream import Behaviour, build_fake_app
from tests.fixtures_kafka import consume_messages, free_port
from tests.fixtures_proxy import SERVICE_KEY, StartProxy

MESSAGES = [{"role": "user", "content": "tell me about figs"}]


def events_of(messages) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for m in messages:
        ev = ChargeEvent.from_json(m.value)  # the contract validates every message
        assert m.key == str(ev.user_id).encode()
        assert m.header("event_id") == ev.event_id.encode()
        event = orjson.loads(m.value)
        # A re-sent event is the same event: same id, same content.
        assert out.setdefault(ev.event_id, event) == event
    return out


async def read_until(bootstrap: str, topic: str, want: set[str], before=()) -> dict[str, dict]:
    """Events by id, reading until every wanted request id arrived (at-least-once
    delivery may repeat events, so a message count is not enough)."""
    events: dict[str, dict] = {}
    for _ in range(12):
        msgs = await consume_messages(bootstrap, topic, 10**6, timeout=5)
        events = events_of([*before, *msgs])
        if {e["request_id"] for e in events.values()} >= want:
            break
    return events


async def test_mixed_requests_produce_exactly_the_expected_events(
    start_proxy: StartProxy, kafka_broker, kafka_topic: str
) -> None:
    h = await start_proxy(
        behaviour=Behaviour(chunks=30, chunk_delay=0.005),
        kafka_bootstrap=kafka_broker.bootstrap,
        topic=kafka_topic,
    )
    expected: dict[str, tuple[str, bool]] = {}  # request id → (outcome, stream)
    for i in range(4):
        rid = f"ok-json-{i}"
        status, _, _ = await h.chat(
            {"model": "smart", "messages": MESSAGES},
            h.headers(user_id=100 + i, **{"X-Request-Id": rid}),
        )
        assert status == 200
        expected[rid] = ("completed", False)
        rid = f"ok-stream-{i}"
        status, _, _ = await h.chat(
            {"model": "smart", "messages": MESSAGES, "stream": True},
            h.headers(user_id=100 + i, **{"X-Request-Id": rid}),
        )
        assert status == 200
        expected[rid] = ("completed", True)
    # An aborted stream is charged for what was relayed.
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{h.url}/v1/chat/completions",
            headers=h.headers(user_id=200, **{"X-Request-Id": "aborted"}),
            json={"model": "smart", "messages": MESSAGES, "stream": True},
        )
        await resp.content.readline()
        await resp.content.readline()
        await resp.content.readline()
        resp.close()
    expected["aborted"] = ("client_aborted", True)
    # Upstream failing mid-stream is charged; an upstream error status is not.
    h.behaviour.reset_after = 5
    await h.chat(
        {"model": "smart", "messages": MESSAGES, "stream": True},
        h.headers(user_id=201, **{"X-Request-Id": "died"}),
    )
    expected["died"] = ("upstream_error", True)
    h.behaviour.reset_after = None
    h.behaviour.status = 500
    await h.chat(
        {"model": "smart", "messages": MESSAGES},
        h.headers(user_id=202, **{"X-Request-Id": "status-500"}),
    )
    h.behaviour.status = 200
    # Not charged: skip-charge and no payer.
    await h.chat(
        {"model": "smart", "messages": MESSAGES}, h.headers(user_id=203, **{"X-Skip-Charge": "1"})
    )
    await h.chat({"model": "smart", "messages": MESSAGES}, h.headers(user_id=None))

    msgs = await consume_messages(kafka_broker.bootstrap, kafka_topic, len(expected), timeout=20)
    events = events_of(msgs)
    assert len(events) == len(msgs) == len(expected)
    by_request = {e["request_id"]: e for e in events.values()}
    assert set(by_request) == set(expected)
    for rid, (outcome, stream) in expected.items():
        e = by_request[rid]
        assert e["outcome"] == outcome, rid
        assert e["stream"] is stream
        assert e["alias"] == "smart" and e["provider"] == "fake"
        assert e["upstream_model"] == "fake-model-v1" and e["price_rule"] == "std"
        assert e["usage"]["total"] > 0 and e["credits"] > 0
        assert e["latency_ms"] > 0
    assert by_request["ok-json-0"]["usage_source"] == "upstream"
    assert by_request["aborted"]["usage_source"] == "estimated"
    assert by_request["aborted"]["user_id"] == 200


@pytest.mark.slow
async def test_kafka_unreachable_for_20s_loses_no_event(
    start_proxy: StartProxy, gated_kafka
) -> None:
    """Kafka is cut off for 20 s while requests keep flowing (the gate resets every
    connection and refuses new ones, as a dead broker would), then comes back: every
    event arrives. The broker stays up behind the gate because the test broker
    forgets its topics on restart (the outbox-level test covers a real restart)."""
    _, gate = gated_kafka
    bootstrap = f"127.0.0.1:{gate.port}"
    topic = "charges-outage"
    await create_topic(bootstrap, topic)
    h = await start_proxy(kafka_bootstrap=bootstrap, topic=topic)
    for i in range(5):
        await h.chat(
            {"model": "smart", "messages": MESSAGES}, h.headers(**{"X-Request-Id": f"before-{i}"})
        )
    await gate.close()
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        during = 0
        while loop.time() < end:
            status, _, _ = await h.chat(
                {"model": "smart", "messages": MESSAGES},
                h.headers(**{"X-Request-Id": f"during-{during}"}),
            )
            assert status == 200  # serving goes on while Kafka is away
            during += 1
            await asyncio.sleep(0.2)
        assert h.state.outbox.pending_count() >= during - 1  # piled up safely on disk
        assert h.state.publisher.publish_failed > 0
    finally:
        await gate.open()
    want = {f"before-{i}" for i in range(5)} | {f"during-{i}" for i in range(during)}
    events = await read_until(bootstrap, topic, want)
    assert {e["request_id"] for e in events.values()} == want


@pytest.mark.slow
async def test_sigterm_under_load_then_restart_loses_no_event(
    tmp_path: Path, kafka_broker, kafka_topic: str
) -> None:
    """A real `llm-proxy serve` process: SIGTERM while requests are in flight, restart,
    and every finished request's event reaches Kafka (duplicates only by event_id)."""
    fake = TestServer(build_fake_app(Behaviour(chunks=20, chunk_delay=0.01)), host="127.0.0.1")
    await fake.start_server()
    config = tmp_path / "aliases.yaml"
    config.write_text(
        f"""
providers:
  fake: {{base_url: "http://127.0.0.1:{fake.port}/v1", stream_usage: true}}
price_rules:
  std: {{input: 1000, output: 2000}}
aliases:
  smart: {{provider: fake, model: fake-model-v1, price_rule: std}}
auth:
  service_keys:
    - {{name: svc, sha256: "{hash_key(SERVICE_KEY)}", scenes: ["*"], may_skip_charge: true}}
events: {{topic: {kafka_topic}}}
server: {{shutdown_grace_s: 5, outbox_drain_s: 5}}
"""
    )
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "LLM_PROXY_KAFKA_IDEMPOTENCE": "false",
        "LLM_PROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
    }
    env.pop("REDIS_URL", None)

    async def start_server() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=open(tmp_path / "proxy.log", "ab"),  # noqa: SIM115
        )
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                        if r.status == 200:
                            return proc
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("proxy did not start: " + (tmp_path / "proxy.log").read_text())

    finished: set[str] = set()
    headers = {"Authorization": f"Bearer {SERVICE_KEY}", "X-User-Id": "9"}

    async def client(s: aiohttp.ClientSession, n: int, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            rid = f"c{n}-{i}"
            i += 1
            try:
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    headers={**headers, "X-Request-Id": rid},
                    json={"model": "smart", "messages": MESSAGES, "stream": i % 2 == 0},
                ) as r:
                    body = await r.read()
                    if r.status == 200 and (i % 2 == 1 or body.endswith(b"[DONE]\n\n")):
                        finished.add(rid)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.05)

    proc = await start_server()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as s:
        clients = [asyncio.create_task(client(s, n, stop)) for n in range(8)]
        await asyncio.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        stop.set()
        await asyncio.gather(*clients)
    proc = await start_server()  # drains whatever the first run left in the outbox
    try:
        events = await read_until(kafka_broker.bootstrap, kafka_topic, finished)
        rids = [e["request_id"] for e in events.values()]
        assert len(rids) == len(set(rids)), "one event per request (dupes only by event_id)"
        assert finished <= set(rids)
        assert len(finished) > 10
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        await fake.close()


async def test_priced_tier_and_version_reach_the_topic_in_schema_2(
    start_proxy: StartProxy, kafka_broker, kafka_topic: str
) -> None:
    """Issue 16: the event a ledger consumes names the version and tier that priced it."""
    h = await start_proxy(
        behaviour=Behaviour(audio_prompt_tokens=50, cache_write_tokens=5),
        kafka_bootstrap=kafka_broker.bootstrap,
        topic=kafka_topic,
        extra_rules=(
            "  dated:\n    input: 1\n    output: 1\n    versions:\n"
            "      - {effective_from: '2020-01-01T00:00:00Z', input: 1000, output: 2000,\n"
            "         audio_input: 9000, audio_output: 9000,\n"
            "         service_tiers: {priority: {multiplier: 3}}}\n"
        ),
        extra_aliases=(
            "  dated: {provider: fake, model: fake-dated, price_rule: dated,\n"
            "          allow_params: [service_tier, audio]}\n"
        ),
    )
    body = {"model": "dated", "messages": MESSAGES, "service_tier": "priority"}
    headers = h.headers(user_id=204, **{"X-Request-Id": "tiered-1"})
    status, reply, _ = await h.chat(body, headers)
    assert status == 200
    events = await read_until(kafka_broker.bootstrap, kafka_topic, {"tiered-1"})
    (event,) = [e for e in events.values() if e["request_id"] == "tiered-1"]
    assert event["schema_version"] == SCHEMA_VERSION  # 2 introduced these; 3 kept them
    assert (event["price_rule"], event["price_version"]) == ("dated", "2020-01-01T00:00:00Z")
    assert event["service_tier"] == "priority"
    u = reply["usage"]
    assert (event["usage"]["audio_prompt"], event["usage"]["cache_write"]) == (50, 5)
    text_in = u["prompt_tokens"] - 50 - 5
    raw = (text_in * 1000 + 5 * 1000 + 50 * 9000 + u["completion_tokens"] * 2000) * 3
    assert event["credits"] == -(-raw // 1_000_000)
