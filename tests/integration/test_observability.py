"""/metrics, the access log and /readyz of a real proxy in front of the fake upstream."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.contract.redis_keys import RedisKeys
from proxy.devtools.fake_upstream import Behaviour
from tests.fixtures_proxy import (
    BASE_YAML,
    PROVIDER_KEY,
    SERVICE_KEY,
    ProxyHarness,
    StartProxy,
    service_key_yaml,
)
from tests.fixtures_redis import RedisServer, free_port, fund

PROMPT_MARKER = "zebra-PROMPT-MARKER-7f3a"
MESSAGES = [{"role": "user", "content": f"Say something about {PROMPT_MARKER}."}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(h: ProxyHarness, accept: str | None = None) -> Samples:
    headers = {"Accept": accept} if accept else {}
    async with h.session.get(f"{h.url}/metrics", headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
        openmetrics = resp.headers["Content-Type"].startswith("application/openmetrics-text")
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    return {(s.name, frozenset(s.labels.items())): s.value for f in parse(text) for s in f.samples}


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def requests(got: Samples) -> dict[tuple[str, str, str, str], float]:
    """(alias, stream, status_class, outcome) -> count, for every non-zero series."""
    out = {}
    for (name, labels), v in got.items():
        if name == "llm_proxy_requests_total" and v:
            d = dict(labels)
            out[(d["alias"], d["stream"], d["status_class"], d["outcome"])] = v
    return out


def by_label(got: Samples, name: str, label: str) -> dict[str, float]:
    """Every series of `name`, keyed by the value of `label` (must be unique)."""
    out: dict[str, float] = {}
    for (n, labels), v in got.items():
        if n == name:
            key = dict(labels)[label]
            assert key not in out, f"several {name} series with {label}={key}"
            out[key] = v
    return out


async def wait_for(h: ProxyHarness, check: Any, what: str) -> Samples:
    """Scrape until `check(samples)` holds (the proxy records a request after answering)."""
    for _ in range(500):
        got = await scrape(h)
        if check(got):
            return got
        await asyncio.sleep(0.01)
    raise AssertionError(f"metrics never showed {what}")


async def abort_stream(h: ProxyHarness) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{h.url}/v1/chat/completions",
            headers=h.headers(),
            json={"model": "smart", "messages": MESSAGES, "stream": True},
        )
        for _ in range(3):
            await resp.content.readline()
        resp.close()  # the client goes away mid-stream


async def test_metrics_after_a_known_set_of_requests(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    h = await start_proxy(
        behaviour=Behaviour(cached_tokens=3), redis_url=redis_server.url, guard_prefix=redis_prefix
    )
    await redis_client.set(RedisKeys(redis_prefix).blocked(8), b"1")
    await fund(redis_client, redis_prefix, 7)
    body = {"model": "smart", "messages": MESSAGES}

    status, reply, _ = await h.chat(body)  # 1: completed, non-streamed
    assert status == 200
    assert (await h.chat({**body, "stream": True}))[0] == 200  # 2: completed, streamed
    assert (await h.chat(body, h.headers(user_id=8)))[0] == 402  # 3: guard block
    assert (await h.chat({**body, "model": "nope"}))[0] == 404  # 4: unknown alias
    h.behaviour.chunks, h.behaviour.chunk_delay = 50, 0.05
    await abort_stream(h)  # 5: client aborted mid-stream
    await wait_for(
        h,
        lambda g: requests(g).get(("smart", "true", "4xx", "client_aborted")) == 1,
        "the aborted stream",
    )
    h.behaviour.chunks, h.behaviour.chunk_delay = 8, 0.0
    h.behaviour.status = 500
    assert (await h.chat(body))[0] == 500  # 6: upstream 500
    h.behaviour.status = 200
    redis_server.pause()
    try:
        # 7: guard fails open (Redis hangs). A user the guard has not seen: one it
        # has seen is decided from its local cache, which a hung Redis leaves valid.
        assert (await h.chat(body, h.headers(user_id=9)))[0] == 200
    finally:
        redis_server.resume()
    await h.flush_events()
    got = await scrape(h)

    assert requests(got) == {
        ("smart", "false", "2xx", "completed"): 2,
        ("smart", "true", "2xx", "completed"): 1,
        ("smart", "false", "4xx", "rejected"): 1,
        ("none", "false", "4xx", "rejected"): 1,
        ("smart", "true", "4xx", "client_aborted"): 1,
        ("smart", "false", "5xx", "upstream_error"): 1,
    }
    assert by_label(got, "llm_proxy_guard_decisions_total", "result") == {
        "allow": 4,
        "block": 1,
        "fail_open": 1,
        "skipped": 0,
    }
    # charged: 1, 2, the aborted stream (prompt estimated) and the fail-open one
    assert by_label(got, "llm_proxy_charge_events_total", "result") == {
        "enqueued": 4,
        "enqueue_failed": 0,
        "published": 4,
        "publish_failed": 0,
    }
    assert by_label(got, "llm_proxy_upstream_errors_total", "kind") == {
        "connect": 0,
        "timeout": 0,
        "status": 1,
        "mid_stream": 0,
    }

    # Tokens and credits agree exactly with the charge events that reached the sink.
    events = h.sink_events()
    assert len(events) == 4
    want_tokens: Counter[tuple[str, str]] = Counter()
    for e in events:
        for kind in ("prompt", "completion", "cached", "reasoning"):
            want_tokens[(kind, e["usage_source"])] += e["usage"][kind]
    got_tokens = {
        (dict(labels)["kind"], dict(labels)["source"]): v
        for (name, labels), v in got.items()
        if name == "llm_proxy_tokens_total" and dict(labels)["alias"] == "smart"
    }
    assert {k: v for k, v in got_tokens.items() if v} == {k: v for k, v in want_tokens.items() if v}
    assert want_tokens[("cached", "upstream")] == 9  # three upstream reports of 3 cached
    assert want_tokens[("prompt", "estimated")] > 0  # the aborted stream was estimated
    assert reply["usage"]["prompt_tokens"] * 3 == want_tokens[("prompt", "upstream")]
    credits = value(got, "llm_proxy_credits_charged_total", alias="smart")
    assert credits == sum(e["credits"] for e in events) > 0

    # Histogram counts: duration for every request, TTFB for those with a first
    # byte, overhead for those that reached upstream.
    def count(name: str, **labels: str) -> float | None:
        return value(got, f"{name}_count", **labels)

    assert count("llm_proxy_request_duration_seconds", alias="smart", stream="false") == 4
    assert count("llm_proxy_request_duration_seconds", alias="smart", stream="true") == 2
    assert count("llm_proxy_request_duration_seconds", alias="none", stream="false") == 1
    assert count("llm_proxy_upstream_ttfb_seconds", alias="smart", stream="false") == 2
    assert count("llm_proxy_upstream_ttfb_seconds", alias="smart", stream="true") == 2
    for phase in ("before_upstream", "after_upstream", "total"):
        assert count("llm_proxy_overhead_seconds", phase=phase) == 5
    assert (
        value(got, "llm_proxy_overhead_seconds_bucket", phase="total", le="+Inf")
        == value(got, "llm_proxy_overhead_seconds_count", phase="total")
        == 5
    )
    assert value(got, "llm_proxy_requests_in_flight") == 0
    assert value(got, "llm_proxy_outbox_pending_events") == 0
    assert value(got, "llm_proxy_outbox_oldest_pending_age_seconds") == 0
    assert value(got, "llm_proxy_outbox_uncommitted_events") == 0


async def test_connect_failure_fail_open_and_in_flight(start_proxy: StartProxy) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: the guard fails open
    h = await start_proxy(behaviour=Behaviour(chunks=100, chunk_delay=0.02), redis_url=closed)
    async with h.session.post(
        f"{h.url}/v1/chat/completions",
        headers=h.headers(),
        json={"model": "smart", "messages": MESSAGES, "stream": True},
    ) as resp:
        await resp.content.readline()
        got = await scrape(h)  # while the stream is open
        assert value(got, "llm_proxy_requests_in_flight") == 1
        await resp.read()
    await h.fake_server.close()  # now the upstream refuses connections
    assert (await h.chat({"model": "smart", "messages": MESSAGES}))[0] == 502
    got = await wait_for(h, lambda g: value(g, "llm_proxy_requests_in_flight") == 0, "0 in flight")
    assert requests(got) == {
        ("smart", "true", "2xx", "completed"): 1,
        ("smart", "false", "5xx", "upstream_error"): 1,
    }
    assert value(got, "llm_proxy_upstream_errors_total", provider="fake", kind="connect") == 1
    assert value(got, "llm_proxy_guard_decisions_total", result="fail_open") == 2
    assert value(got, "llm_proxy_guard_decisions_total", result="allow") == 0
    # Fail-open parts are degraded, not unready.
    async with h.session.get(f"{h.url}/readyz") as resp:
        report = await resp.json()
        assert resp.status == 200
    assert report["ready"] is True and report["status"] == "degraded"
    assert report["checks"]["redis"]["status"] == "degraded"
    assert report["checks"]["outbox"]["status"] == "ok"
    assert report["checks"]["outbox"]["uncommitted"] == 0
    assert report["checks"]["relay"]["status"] == "ok"


async def test_openmetrics_when_asked(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    assert (await h.chat({"model": "smart", "messages": MESSAGES}))[0] == 200
    accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    async with h.session.get(f"{h.url}/metrics", headers={"Accept": accept}) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.read()).endswith(b"# EOF\n")
    got = await wait_for(h, lambda g: bool(requests(g)), "the request")
    got = await scrape(h, accept)
    assert requests(got) == {("smart", "false", "2xx", "completed"): 1}
    async with h.session.get(f"{h.url}/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")


async def test_each_app_has_its_own_registry(start_proxy: StartProxy) -> None:
    a, b = await start_proxy(), await start_proxy()
    assert (await a.chat({"model": "smart", "messages": MESSAGES}))[0] == 200
    await wait_for(a, lambda g: bool(requests(g)), "the request")
    assert requests(await scrape(b)) == {}


async def test_readiness_unready_without_provider_key_or_outbox(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    async with h.session.get(f"{h.url}/readyz") as resp:
        report = await resp.json()
        assert resp.status == 200
    assert report["status"] == "ok"
    assert set(report["checks"]) == {"config", "auth", "redis", "outbox", "relay", "routing"}
    assert report["checks"]["redis"] == {"status": "disabled"}
    assert report["checks"]["config"]["servable_aliases"] == len(h.config.aliases) > 0
    await h.state.outbox.close()  # no charge can be recorded any more
    async with h.session.get(f"{h.url}/readyz") as resp:
        report = await resp.json()
        assert resp.status == 503
    assert report["ready"] is False and report["checks"]["outbox"]["status"] == "closed"

    # A config whose only provider has no key (its env var is unset) serves nothing.
    text = BASE_YAML.format(
        base_url="http://x/v1", stream_usage="true", first_byte=1, idle=1, total=30
    )
    h.state.config = parse_config(yaml.safe_load(text + service_key_yaml()), "t.yaml", {})
    async with h.session.get(f"{h.url}/readyz") as resp:
        report = await resp.json()
        assert resp.status == 503
    assert report["checks"]["config"] == {
        "status": "error",
        "aliases": len(h.state.config.aliases),
        "servable_aliases": 0,
        "providers": 1,
        "providers_without_key": ["fake"],
        "reason": "no alias has a provider with its API key set",
    }


async def test_access_log_lines_and_no_secrets(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, every logger
    h = await start_proxy(redis_url=redis_server.url, guard_prefix=redis_prefix)
    await redis_client.set(RedisKeys(redis_prefix).blocked(8), b"1")
    await fund(redis_client, redis_prefix, 7)
    body = {"model": "smart", "messages": MESSAGES, "user": PROMPT_MARKER}
    assert (await h.chat(body, h.headers(**{"X-Request-Id": "req-nonstream"})))[0] == 200
    stream = {**body, "stream": True}
    assert (await h.chat(stream, h.headers(**{"X-Request-Id": "req-stream"})))[0] == 200
    blocked = h.headers(user_id=8, **{"X-Request-Id": "req-blocked", "X-Billing-Scene": "batch"})
    assert (await h.chat(body, blocked))[0] == 402
    bad_key = {"Authorization": "Bearer sk-wrong-key-never-logged", "X-User-Id": "7"}
    assert (await h.chat(body, bad_key))[0] == 401
    await wait_for(h, lambda g: sum(requests(g).values()) == 4, "4 requests")

    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "proxy.access"]
    assert len(lines) == 4
    by_id = {line["request_id"]: line for line in lines}
    ok = by_id["req-nonstream"]
    assert set(ok) == {
        *("time", "request_id", "user_id", "scene", "principal", "alias", "endpoint"),
        *("provider", "target", "attempts"),
        *("stream", "status", "outcome", "error_kind", "guard", "tokens", "usage_source"),
        *("credits", "charged", "latency_ms", "ttft_ms", "metering_flags", "client_disconnected"),
    }
    assert ok["time"].endswith("Z")
    assert ok["user_id"] == 7 and ok["alias"] == "smart" and ok["provider"] == "fake"
    assert ok["endpoint"] == "chat.completions"
    assert ok["status"] == 200 and ok["outcome"] == "completed" and ok["stream"] is False
    assert ok["guard"] == "allow" and ok["usage_source"] == "upstream" and ok["charged"] is True
    assert ok["tokens"]["prompt"] > 0 and ok["tokens"]["completion"] > 0
    assert ok["latency_ms"] >= ok["ttft_ms"] > 0
    await h.flush_events()
    events = {e["request_id"]: e for e in h.sink_events()}
    for rid in ("req-nonstream", "req-stream"):
        assert by_id[rid]["credits"] == events[rid]["credits"] > 0
        assert by_id[rid]["tokens"] == {
            k: events[rid]["usage"][k] for k in ("prompt", "completion", "cached", "reasoning")
        }
    assert by_id["req-stream"]["stream"] is True and by_id["req-stream"]["ttft_ms"] is not None
    no = by_id["req-blocked"]
    assert (no["status"], no["outcome"], no["guard"], no["scene"]) == (
        402,
        "rejected",
        "block",
        "batch",
    )
    assert no["tokens"] is None and no["credits"] == 0 and no["charged"] is False
    unauth = next(line for line in lines if line["status"] == 401)
    assert unauth["user_id"] is None and unauth["outcome"] == "rejected"

    # Nothing secret or private in any record of any logger, tracebacks included.
    formatter = logging.Formatter("%(name)s %(message)s")
    text = "\n".join(formatter.format(r) for r in caplog.records)
    for secret in (SERVICE_KEY, PROVIDER_KEY, PROMPT_MARKER, "sk-wrong-key", "Bearer"):
        assert secret not in text, secret
    # Start-up names what is loaded and which optional parts are on.
    startup = "\n".join(
        r.getMessage() for r in caplog.records if r.name == "proxy.server.lifecycle"
    )
    for expected in ("provider fake", "alias smart", "alias legacy", "guard: redis", "metrics:"):
        assert expected in startup
    assert "charge events: outbox" in startup and "jsonl file" in startup
