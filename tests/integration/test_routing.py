"""Several targets per alias against real TCP fake upstreams: retries and fallbacks
before the first byte, never after; the charge names the target that served."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from proxy.devtools.fake_upstream import Behaviour
from tests.fixtures_proxy import FakeUpstream, ProxyHarness, StartFake, StartProxy

pytestmark = pytest.mark.asyncio

MESSAGES = [{"role": "user", "content": "hello routing"}]


def two_targets(routing: str = "", backup_rule: str = "") -> str:
    rule = f", price_rule: {backup_rule}" if backup_rule else ""
    extra = f"\n    routing: {{{routing}}}" if routing else ""
    return (
        "  routed:\n"
        "    price_rule: std\n"
        "    targets:\n"
        "      - {provider: fake, model: m-primary, priority: 0}\n"
        f"      - {{provider: backup, model: m-backup, priority: 1{rule}}}" + extra + "\n"
    )


async def setup(
    start_proxy: StartProxy,
    start_fake: StartFake,
    *,
    aliases: str | None = None,
    backup: Behaviour | None = None,
    **kw: Any,
) -> tuple[ProxyHarness, FakeUpstream]:
    b = await start_fake("backup", backup)
    h = await start_proxy(
        extra_providers=b.provider_yaml(), extra_aliases=aliases or two_targets(), **kw
    )
    return h, b


def body(stream: bool = False, model: str = "routed") -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": stream}


async def metric(h: ProxyHarness, name: str, **labels: str) -> float:
    async with h.session.get(f"{h.url}/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not found")


async def one_event(h: ProxyHarness) -> dict[str, Any]:
    await h.flush_events()
    events = h.sink_events()
    assert len(events) == 1, events
    return events[0]


@pytest.mark.parametrize("stream", [False, True])
async def test_refused_primary_is_served_by_the_next_target(
    start_proxy: StartProxy, start_fake: StartFake, stream: bool
) -> None:
    h, _b = await setup(start_proxy, start_fake)
    await h.stop_upstream()  # its port now refuses connections
    status, reply, _ = await h.chat(body(stream))
    assert status == 200
    if stream:
        assert isinstance(reply, bytes) and b"m-backup" in reply and b"[DONE]" in reply
    else:
        assert isinstance(reply, dict) and reply["model"] == "m-backup"
    event = await one_event(h)
    assert (event["provider"], event["upstream_model"], event["attempts"]) == (
        "backup",
        "m-backup",
        2,
    )
    assert event["credits"] > 0
    assert await metric(h, "llm_proxy_upstream_attempts_total", provider="fake", result="connect")
    assert await metric(h, "llm_proxy_upstream_attempts_total", provider="backup", result="ok")


@pytest.mark.parametrize(
    ("status", "headers"),
    [(500, None), (503, None), (429, {"Retry-After": "1"}), (429, {"retry-after-ms": "20"})],
)
async def test_failing_status_is_retried_on_the_next_target(
    start_proxy: StartProxy,
    start_fake: StartFake,
    status: int,
    headers: dict[str, str] | None,
) -> None:
    h, b = await setup(start_proxy, start_fake)
    h.behaviour.status = status
    h.behaviour.error_headers = headers
    got, reply, _ = await h.chat(body())
    assert got == 200 and isinstance(reply, dict) and reply["model"] == "m-backup"
    assert len(h.recorder.requests) == 1 and len(b.recorder.requests) == 1
    event = await one_event(h)
    assert (event["provider"], event["attempts"], event["outcome"]) == ("backup", 2, "completed")
    result = "429" if status == 429 else "5xx"
    assert await metric(h, "llm_proxy_upstream_attempts_total", provider="fake", result=result)


async def test_other_4xx_is_never_retried(start_proxy: StartProxy, start_fake: StartFake) -> None:
    h, b = await setup(start_proxy, start_fake)
    h.behaviour.status = 400
    got, _reply, _ = await h.chat(body())
    assert got == 400
    assert len(b.recorder.requests) == 0
    await h.flush_events()
    assert h.sink_events() == []  # a refused request consumed nothing


async def test_last_target_failing_relays_its_status(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    h, b = await setup(start_proxy, start_fake)
    h.behaviour.status = 503
    b.behaviour.status = 502
    got, reply, _ = await h.chat(body())
    assert got == 502 and isinstance(reply, dict) and "error" in reply
    assert len(h.recorder.requests) == 1 and len(b.recorder.requests) == 1


async def test_stall_before_the_first_byte_is_served_by_the_next_target(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    h, _b = await setup(start_proxy, start_fake, first_byte=0.3)
    h.behaviour.first_byte_delay = 5
    for stream in (False, True):
        got, reply, _ = await h.chat(body(stream))
        assert got == 200
        assert b"m-backup" in (reply if isinstance(reply, bytes) else orjson.dumps(reply))
    await h.flush_events()
    events = h.sink_events()
    assert [(e["provider"], e["attempts"]) for e in events] == [("backup", 2), ("backup", 2)]
    assert await metric(h, "llm_proxy_upstream_attempts_total", provider="fake", result="timeout")


async def test_stream_failing_after_its_first_chunk_is_not_retried(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    h, b = await setup(start_proxy, start_fake)
    h.behaviour.reset_after = 2
    got, reply, _ = await h.chat(body(stream=True))
    assert got == 200 and isinstance(reply, bytes)
    assert b"event: error" in reply
    assert len(b.recorder.requests) == 0  # nothing retried once a byte was relayed
    event = await one_event(h)
    assert (event["provider"], event["attempts"], event["outcome"]) == (
        "fake",
        1,
        "upstream_error",
    )
    assert event["credits"] > 0 and event["usage"]["completion"] > 0


async def test_non_streamed_body_breaking_is_not_retried(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    h, b = await setup(start_proxy, start_fake, first_byte=0.3)
    h.behaviour.invalid_json = True  # a 2xx head: the relay owns it whatever the body
    async with h.session.post(
        f"{h.url}/v1/chat/completions", data=orjson.dumps(body()), headers=h.headers()
    ) as resp:
        assert resp.status == 200 and await resp.read() == b"{not json"
    assert len(b.recorder.requests) == 0


async def test_cooldown_skips_a_failing_target_and_a_probe_recovers_it(
    start_proxy: StartProxy, start_fake: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("proxy.upstream.router.monotonic", lambda: clock[0])
    routing = "allowed_fails: 2, window_s: 60, cooldown_s: 30"
    h, b = await setup(start_proxy, start_fake, aliases=two_targets(routing))
    h.behaviour.status = 500
    for _ in range(2):
        assert (await h.chat(body()))[0] == 200
    assert len(h.recorder.requests) == 2
    gauge = "llm_proxy_upstream_target_cooldown"
    assert await metric(h, gauge, provider="fake", model="m-primary") == 1
    async with h.session.get(f"{h.url}/readyz") as resp:
        ready = await resp.json()
    assert ready["ready"] and ready["checks"]["routing"]["cooling"] == ["fake/m-primary"]
    # In cooldown: the primary is not even asked.
    for _ in range(3):
        assert (await h.chat(body()))[0] == 200
    assert len(h.recorder.requests) == 2 and len(b.recorder.requests) == 5
    # The cooldown over, one probe goes through; it succeeds: the target is back.
    h.behaviour.status = 200
    clock[0] += 31
    got, reply, _ = await h.chat(body())
    assert got == 200 and isinstance(reply, dict) and reply["model"] == "m-primary"
    assert await metric(h, gauge, provider="fake", model="m-primary") == 0
    assert (await h.chat(body()))[0] == 200
    assert len(h.recorder.requests) == 4 and len(b.recorder.requests) == 5


async def test_failed_probe_reopens_the_cooldown(
    start_proxy: StartProxy, start_fake: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("proxy.upstream.router.monotonic", lambda: clock[0])
    h, b = await setup(
        start_proxy, start_fake, aliases=two_targets("allowed_fails: 1, cooldown_s: 30")
    )
    h.behaviour.status = 500
    assert (await h.chat(body()))[0] == 200
    clock[0] += 31
    assert (await h.chat(body()))[0] == 200  # the probe fails, the backup serves
    assert (await h.chat(body()))[0] == 200  # cooling again: not asked
    assert len(h.recorder.requests) == 2 and len(b.recorder.requests) == 3


async def test_weights_spread_load_over_real_targets(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    aliases = (
        "  routed:\n    price_rule: std\n    targets:\n"
        "      - {provider: fake, model: m-a, weight: 1}\n"
        "      - {provider: backup, model: m-b, weight: 1}\n"
    )
    h, b = await setup(start_proxy, start_fake, aliases=aliases)
    n = 200
    for _ in range(n // 20):
        results = await asyncio.gather(*(h.chat(body()) for _ in range(20)))
        assert all(r[0] == 200 for r in results)
    a_count, b_count = len(h.recorder.requests), len(b.recorder.requests)
    assert a_count + b_count == n
    assert 60 <= a_count <= 140  # ~7 standard deviations from the expected 100


async def test_fallback_alias_serves_when_every_target_failed(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    aliases = (
        "  main: {provider: fake, model: m-main, price_rule: std, fallbacks: [spare]}\n"
        "  spare: {provider: backup, model: m-spare, price_rule: premium}\n"
    )
    h, _b = await setup(start_proxy, start_fake, aliases=aliases)
    await h.stop_upstream()
    got, reply, _ = await h.chat(body(model="main"))
    assert got == 200 and isinstance(reply, dict) and reply["model"] == "m-spare"
    event = await one_event(h)
    # The caller's alias, served and priced by the fallback's target.
    assert (event["alias"], event["provider"], event["upstream_model"]) == (
        "main",
        "backup",
        "m-spare",
    )
    assert event["price_rule"] == "premium" and event["attempts"] == 2


async def test_target_price_rule_prices_the_charge(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    h, _b = await setup(start_proxy, start_fake, aliases=two_targets(backup_rule="premium"))
    assert (await h.chat(body()))[0] == 200
    primary = (await one_event(h))["credits"]
    await h.stop_upstream()
    assert (await h.chat(body()))[0] == 200
    await h.flush_events()
    backup = h.sink_events()[1]
    assert backup["price_rule"] == "premium" and primary == h.sink_events()[0]["credits"]
    assert backup["credits"] > primary * 100


async def test_max_concurrency_then_next_target_or_503(
    start_proxy: StartProxy, start_fake: StartFake
) -> None:
    one = (
        "  solo:\n    price_rule: std\n"
        "    targets: [{provider: fake, model: m, max_concurrency: 1}]\n"
    )
    h, _b = await setup(
        start_proxy,
        start_fake,
        aliases=one
        + two_targets().replace(
            "m-primary, priority: 0}", "m-primary, priority: 0, max_concurrency: 1}"
        ),
    )
    slots = h.state.router._slots
    hold = await slots["fake/m"].acquire(0)  # another request holds the only slot
    assert hold is not None
    got, reply, headers = await h.chat(body(model="solo"))
    assert got == 503 and headers["Retry-After"] == "1"
    assert isinstance(reply, dict) and reply["error"]["code"] == "upstream_busy"
    assert len(h.recorder.requests) == 0
    hold()
    assert (await h.chat(body(model="solo")))[0] == 200
    # With a second target, the busy one is skipped.
    hold = await slots["fake/m-primary"].acquire(0)
    assert hold is not None
    got, reply, _ = await h.chat(body())
    assert got == 200 and isinstance(reply, dict) and reply["model"] == "m-backup"
    hold()
    assert slots["fake/m"].in_use == 0 and slots["fake/m-primary"].in_use == 0
    assert await metric(h, "llm_proxy_upstream_attempts_total", provider="fake", result="busy")
