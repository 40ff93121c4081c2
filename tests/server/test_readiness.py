"""The readiness report and its policy: unready only when nothing can be served or
no charge could be recorded; Redis and publisher trouble is `degraded`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.billing.encodings import EncodingRegistry
from proxy.config import EnvSettings, parse_config
from proxy.devtools.fake_upstream import build_fake_app
from proxy.server.app import build_app
from proxy.server.readiness import readiness
from proxy.server.state import STATE, ProxyState
from tests.fixtures_proxy import SERVICE_KEY, service_key_yaml
from tests.servers import free_port

TWO_PROVIDERS = """
providers:
  alpha: {{base_url: "{url}", api_key_env: ALPHA_KEY}}
  beta: {{base_url: "{url}", api_key_env: BETA_KEY}}
  open: {{base_url: "{url}"}}
aliases:
  a1: {{provider: alpha, model: m, free: true}}
  a2: {{provider: alpha, model: m2, free: true}}
  b1: {{provider: beta, model: m, free: true}}
server: {{outbox_drain_s: 0.2}}
"""
ONLY_MISSING = """
providers:
  alpha: {{base_url: "{url}", api_key_env: ALPHA_KEY}}
  open: {{base_url: "{url}"}}
aliases:
  a1: {{provider: alpha, model: m, free: true}}
"""


class Proxy:
    def __init__(self, url: str, state: ProxyState, session: aiohttp.ClientSession) -> None:
        self.url, self.state, self.session = url, state, session

    async def chat(self, model: str) -> int:
        headers = {"Authorization": f"Bearer {SERVICE_KEY}", "X-User-Id": "7"}
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        async with self.session.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers
        ) as resp:
            await resp.read()
            return resp.status


Start = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start(tmp_path: Path, shared_encodings: EncodingRegistry) -> AsyncIterator[Start]:
    async with AsyncExitStack() as stack:
        fake = TestServer(build_fake_app(), host="127.0.0.1")
        await fake.start_server()
        stack.push_async_callback(fake.close)
        session = aiohttp.ClientSession()
        stack.push_async_callback(session.close)

        async def run(
            template: str, env: Mapping[str, str], *, service_keys: bool = True, **overrides: Any
        ) -> Proxy:
            text = template.format(url=f"http://127.0.0.1:{fake.port}/v1")
            if service_keys:
                text += service_key_yaml()
            config = parse_config(yaml.safe_load(text), "r.yaml", env)
            settings = EnvSettings(
                **{
                    "outbox_path": str(tmp_path / "outbox.sqlite3"),
                    "sink_path": str(tmp_path / "events.jsonl"),
                    **overrides,
                }
            )
            app = build_app(config, settings, encodings=shared_encodings)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            stack.push_async_callback(server.close)
            return Proxy(f"http://127.0.0.1:{server.port}", app[STATE], session)

        yield run


async def test_all_well_is_ready_and_ok(start: Start) -> None:
    p = await start(TWO_PROVIDERS, {"ALPHA_KEY": "a", "BETA_KEY": "b"})
    report = await readiness(p.state)
    assert (report["ready"], report["status"]) == (True, "ok")
    checks = report["checks"]
    assert checks["config"] == {
        "status": "ok",
        "aliases": 3,
        "servable_aliases": 3,
        "providers": 3,
        "providers_without_key": [],
    }
    assert checks["redis"] == {"status": "disabled"}
    assert checks["outbox"]["status"] == "ok"
    assert checks["relay"]["status"] == "ok"
    assert checks["relay"]["consecutive_publish_failures"] == 0
    assert "jsonl" in checks["relay"]["sink"]


async def test_some_providers_without_key_stay_ready(start: Start) -> None:
    p = await start(TWO_PROVIDERS, {"ALPHA_KEY": "a"})
    report = await readiness(p.state)
    assert report["ready"] is True
    config = report["checks"]["config"]
    assert (config["status"], config["servable_aliases"]) == ("ok", 2)
    assert config["providers_without_key"] == ["beta"]


async def test_no_alias_with_a_usable_key_is_unready(start: Start) -> None:
    # "open" needs no key and is fine, but no alias uses it.
    p = await start(ONLY_MISSING, {})
    report = await readiness(p.state)
    assert (report["ready"], report["status"]) == (False, "unready")
    config = report["checks"]["config"]
    assert (config["status"], config["servable_aliases"]) == ("error", 0)
    assert config["providers_without_key"] == ["alpha"]
    async with p.session.get(f"{p.url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["ready"] is False


async def test_unreachable_redis_is_degraded_but_ready(start: Start) -> None:
    p = await start(
        TWO_PROVIDERS, {"ALPHA_KEY": "a"}, redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    report = await readiness(p.state)
    assert (report["ready"], report["status"]) == (True, "degraded")
    assert report["checks"]["redis"]["status"] == "degraded"
    assert report["checks"]["redis"]["error"]
    async with p.session.get(f"{p.url}/readyz") as resp:
        assert resp.status == 200


async def test_publisher_failures_are_degraded_but_ready(start: Start, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the sink's directory should be")
    p = await start(TWO_PROVIDERS, {"ALPHA_KEY": "a"}, sink_path=str(blocker / "events.jsonl"))
    assert await p.chat("a1") == 200
    report: dict[str, Any] = {}
    for _ in range(500):
        report = await readiness(p.state)
        if report["checks"]["relay"]["consecutive_publish_failures"]:
            break
        await asyncio.sleep(0.02)
    assert (report["ready"], report["status"]) == (True, "degraded")
    assert report["checks"]["relay"]["status"] == "degraded"
    assert report["checks"]["outbox"]["pending"] >= 1


async def test_a_closed_outbox_is_unready(start: Start) -> None:
    p = await start(TWO_PROVIDERS, {"ALPHA_KEY": "a"})
    await p.state.outbox.close()
    report = await readiness(p.state)
    assert (report["ready"], report["status"]) == (False, "unready")
    assert report["checks"]["outbox"]["status"] == "closed"


async def test_no_caller_can_authenticate_is_unready_and_says_why(start: Start) -> None:
    # No service keys and no Redis for user keys: every call would be a 401.
    p = await start(TWO_PROVIDERS, {"ALPHA_KEY": "a"}, service_keys=False)
    async with p.session.get(f"{p.url}/readyz") as resp:
        assert resp.status == 503
        report = await resp.json()
    assert report["ready"] is False
    auth = report["checks"]["auth"]
    assert auth["status"] == "error"
    assert "auth.service_keys" in auth["reason"] and "REDIS_URL" in auth["reason"]
    p = await start(TWO_PROVIDERS, {"ALPHA_KEY": "a"})
    assert (await readiness(p.state))["checks"]["auth"] == {
        "status": "ok",
        "callers": "1 service key(s)",
    }
