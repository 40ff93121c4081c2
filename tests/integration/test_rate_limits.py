"""Rate limits against a real redis-server, shared by two proxies: two real
`llm-proxy serve` processes for the request limit, two in-process proxies (to
wait for each settle correction deterministically) for the token limit."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from proxy.billing.payer import BillingContext
from proxy.contract.redis_keys import key_sha256
from proxy.devtools.fake_upstream import Behaviour, build_fake_app
from tests.fixtures_proxy import SERVICE_KEY, ProxyHarness, StartProxy
from tests.fixtures_redis import RedisServer, fund
from tests.servers import free_port

pytestmark = pytest.mark.asyncio

REPO_ROOT = str(Path(__file__).resolve().parents[2])  # the processes run this checkout

MESSAGES = [{"role": "user", "content": "hello limits"}]
HEADER_NAMES = [
    f"x-ratelimit-{what}-{unit}"
    for unit in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
]


class Proxies:
    def __init__(self, tmp: Path, config: Path, env: dict[str, str]) -> None:
        self.tmp, self.config, self.env = tmp, config, env
        self.procs: list[asyncio.subprocess.Process] = []
        self.urls: list[str] = []

    async def start(self, n: int) -> None:
        for i in range(n):
            port = free_port()
            env = {
                **self.env,
                "LLM_PROXY_OUTBOX_PATH": str(self.tmp / f"outbox-{i}.sqlite3"),
                "LLM_PROXY_SINK_PATH": str(self.tmp / f"events-{i}.jsonl"),
            }
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(self.config),
                "--port",
                str(port),
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=open(self.tmp / f"proxy-{i}.log", "ab"),  # noqa: SIM115
            )
            self.procs.append(proc)
            self.urls.append(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as s:
            for i, url in enumerate(self.urls):
                for _ in range(300):
                    try:
                        async with s.get(f"{url}/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    log = (self.tmp / f"proxy-{i}.log").read_text()
                    raise AssertionError(f"proxy {i} did not start: {log}")

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs:
            await asyncio.wait_for(proc.wait(), 30)


@pytest.fixture
async def two_proxies(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[tuple[Proxies, str]]:
    redis_server.ensure_up()
    fake = TestServer(build_fake_app(Behaviour()), host="127.0.0.1")
    await fake.start_server()
    config = tmp_path / "aliases.yaml"
    config.write_text(
        f"""
providers:
  fake: {{base_url: "http://127.0.0.1:{fake.port}/v1"}}
price_rules:
  std: {{input: 1000, output: 2000}}
aliases:
  smart: {{provider: fake, model: fake-model-v1, price_rule: std}}
auth:
  service_keys:
    - {{name: svc, sha256: "{key_sha256(SERVICE_KEY)}", scenes: ["*"]}}
guard: {{prefix: "{redis_prefix}", local_cache: false}}
limits:
  user: {{rpm: 7, tpm: 1000000}}
  budget_ms: 2000
"""
    )
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "LLM_PROXY_EMBEDDED_LEDGER": "false",
        "PYTHONPATH": REPO_ROOT,
    }
    proxies = Proxies(tmp_path, config, env)
    await funded(redis_server.url, redis_prefix)
    try:
        await proxies.start(2)
        yield proxies, redis_prefix
    finally:
        await proxies.stop()
        await fake.close()


async def funded(redis_url: str, prefix: str) -> None:
    """Credit for every user these tests use: with guard.mode reserve (the default) a
    user the books do not know is refused before the limits are asked."""
    client = Redis.from_url(redis_url)
    try:
        await fund(client, prefix, *range(1, 101))
    finally:
        await client.aclose()


async def post(
    s: aiohttp.ClientSession, url: str, user: int, **body: Any
) -> tuple[int, Any, bytes]:
    async with s.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {SERVICE_KEY}", "X-User-Id": str(user)},
        json={"model": "smart", "messages": MESSAGES, **body},
    ) as r:
        return r.status, r.headers, await r.read()


async def test_requests_per_minute_hold_exactly_across_two_processes(
    two_proxies: tuple[Proxies, str],
) -> None:
    proxies, prefix = two_proxies
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(
            *(post(s, proxies.urls[i % 2], 5, stream=i % 3 == 0) for i in range(24))
        )
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 7 and statuses.count(429) == 17
        ok = next(r for r in results if r[0] == 200)
        refused = next(r for r in results if r[0] == 429)
        for name in HEADER_NAMES:  # OpenAI's names, on success and refusal
            assert name in ok[1] and name in refused[1], name
        assert ok[1]["x-ratelimit-limit-requests"] == "7"
        assert refused[1]["x-ratelimit-remaining-requests"] == "0"
        assert int(refused[1]["Retry-After"]) >= 1
        error = orjson.loads(refused[2])["error"]
        assert error["code"] == "rate_limit_exceeded"

        # An operator's override for one user, read by both processes at once.
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "limits",
            "set",
            "6",
            "--rpm",
            "3",
            "--prefix",
            prefix,
            env=proxies.env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await cli.communicate()
        assert cli.returncode == 0 and orjson.loads(out) == {"user_id": 6, "rpm": 3}
        results = await asyncio.gather(*(post(s, proxies.urls[i % 2], 6) for i in range(10)))
        assert [r[0] for r in results].count(200) == 3


async def limited_proxies(start_proxy: StartProxy, redis_url: str, prefix: str, tpm: int):
    yaml = f"\nlimits:\n  user: {{tpm: {tpm}}}\n  budget_ms: 2000\n"
    await funded(redis_url, prefix)
    return [
        await start_proxy(redis_url=redis_url, guard_prefix=prefix, extra_yaml=yaml)
        for _ in range(2)
    ]


async def settled(h: ProxyHarness) -> None:
    limiter = h.state.limiter
    assert limiter is not None
    while limiter.pending:
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("direction", ["over_estimated", "under_estimated"])
async def test_tokens_per_minute_hold_with_streams_whose_usage_differs(
    start_proxy: StartProxy, redis_server: RedisServer, redis_prefix: str, direction: str
) -> None:
    tpm = 600
    hs = await limited_proxies(start_proxy, redis_server.url, redis_prefix, tpm)
    if direction == "over_estimated":
        max_tokens = 400  # the estimate is ~430 tokens, the stream uses ~25
    else:
        max_tokens = 1  # the estimate is ~25 tokens, the stream uses ~200
        for h in hs:
            h.behaviour.chunks = 190
    body = {"model": "smart", "messages": MESSAGES, "stream": True, "max_tokens": max_tokens}
    admitted = 0
    for i in range(60):
        h = hs[i % 2]
        status, _, headers = await h.chat(body, h.headers(user_id=31))
        assert "x-ratelimit-remaining-tokens" in headers
        await settled(h)
        if status == 429:
            break
        assert status == 200
        admitted += 1
    else:
        raise AssertionError("never limited")
    for h in hs:
        await h.flush_events()
    events = [e for h in hs for e in h.sink_events()]
    assert len(events) == admitted
    used = sum(e["usage"]["total"] for e in events)
    if direction == "over_estimated":
        # Without the settle correction only one request would have fit.
        assert admitted >= 5
        assert used <= tpm
    else:
        # Admitted on the estimate: the overdraft is bounded by one request's error.
        worst = max(e["usage"]["total"] for e in events)
        assert used > tpm - worst and used <= tpm + worst
        assert admitted <= tpm // 150 + 1


async def test_concurrency_slot_released_when_the_client_leaves(
    start_proxy: StartProxy, redis_server: RedisServer, redis_prefix: str
) -> None:
    yaml = "\nlimits:\n  user: {concurrency: 1}\n  budget_ms: 2000\n"
    h = await start_proxy(
        redis_url=redis_server.url,
        guard_prefix=redis_prefix,
        extra_yaml=yaml,
        behaviour=Behaviour(chunks=50, chunk_delay=0.05),
    )
    await funded(redis_server.url, redis_prefix)
    body = {"model": "smart", "messages": MESSAGES, "stream": True}
    async with h.session.post(
        f"{h.url}/v1/chat/completions", json=body, headers=h.headers(user_id=44)
    ) as resp:
        assert resp.status == 200
        await resp.content.readany()
        status, _, _ = await h.chat(body, h.headers(user_id=44))
        assert status == 429  # the first one holds the only slot
    # The client left mid-stream: the slot comes back.
    for _ in range(500):
        await asyncio.sleep(0.01)
        if h.state.limiter is not None and not h.state.limiter.pending:
            status, _, _ = await h.chat({**body, "stream": False}, h.headers(user_id=44))
            if status == 200:
                break
    assert status == 200


async def test_official_sdk_retries_a_429_after_retry_after(
    start_proxy: StartProxy, redis_server: RedisServer, redis_prefix: str
) -> None:
    yaml = "\nlimits:\n  user: {concurrency: 1}\n  budget_ms: 2000\n"
    h = await start_proxy(redis_url=redis_server.url, guard_prefix=redis_prefix, extra_yaml=yaml)
    await funded(redis_server.url, redis_prefix)
    limiter = h.state.limiter
    assert limiter is not None
    # Another request of user 45 holds the only slot until the SDK was refused once.
    ctx = BillingContext.normalize(user_id=45, scene="chat", principal="test-service")
    held = await limiter.admit(ctx, 1, "holder")
    assert held.result == "allow"
    metrics = h.state.observer.metrics
    limited = metrics.rate_limits.labels("limited")

    async def release_after_first_refusal() -> None:
        while True:
            metrics.flush()  # the request path's counts reach prometheus_client per scrape
            if limited._value.get() >= 1:
                break
            await asyncio.sleep(0.01)
        limiter.finish(held, 0, "holder")

    releaser = asyncio.create_task(release_after_first_refusal())
    client = openai.AsyncOpenAI(
        base_url=f"{h.url}/v1",
        api_key=SERVICE_KEY,
        default_headers={"X-User-Id": "45"},
        max_retries=2,
    )
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="smart",
            messages=MESSAGES,  # type: ignore[arg-type]
        )
        assert raw.http_response.status_code == 200
        assert raw.retries_taken >= 1  # the SDK saw the 429 and retried on its own
        await releaser
    finally:
        releaser.cancel()
        await client.close()


@pytest.mark.parametrize(
    "answer", ["json", "stream", "upstream 503", "upstream 401 (our key refused: 502)", "429"]
)
async def test_every_answer_of_an_admitted_request_carries_the_headers(
    start_proxy: StartProxy, redis_server: RedisServer, redis_prefix: str, answer: str
) -> None:
    """Relayed (JSON, SSE, an upstream error status), our own error for the upstream,
    or the limiter's refusal: OpenAI's x-ratelimit-* headers are on the answer."""
    rpm = 1 if answer == "429" else 50
    yaml = f"\nlimits:\n  user: {{rpm: {rpm}, tpm: 100000}}\n  budget_ms: 2000\n"
    await funded(redis_server.url, redis_prefix)
    h = await start_proxy(redis_url=redis_server.url, guard_prefix=redis_prefix, extra_yaml=yaml)
    body: dict[str, Any] = {"model": "smart", "messages": MESSAGES, "stream": answer == "stream"}
    expected = 200
    if answer.startswith("upstream"):
        h.behaviour.status = int(answer.split()[1])
        expected = 502 if h.behaviour.status == 401 else h.behaviour.status
    elif answer == "429":
        first, _, _ = await h.chat(body, h.headers(user_id=41))
        assert first == 200
        expected = 429
    status, _, headers = await h.chat(body, h.headers(user_id=41))
    assert status == expected
    for name in HEADER_NAMES:
        assert name in headers, (answer, name)
    assert headers["x-ratelimit-limit-requests"] == str(rpm)
    assert headers["X-Request-Id"]
