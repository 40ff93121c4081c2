"""The HTTP endpoints through the whole app: the order of the steps (auth before
validation, guard before upstream, credentials before the call), X-Request-Id on
errors, /v1/models, /healthz, /readyz."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.billing.encodings import EncodingRegistry
from proxy.config import EnvSettings, parse_config
from proxy.contract.outcome import Outcome
from proxy.devtools.fake_upstream import RECORDER, Behaviour, build_fake_app
from proxy.server.app import build_app
from tests.fixtures_proxy import (
    BASE_YAML,
    PROVIDER_KEY,
    SERVICE_KEY,
    RecordingObserver,
    StartProxy,
    service_key_yaml,
)

MESSAGES = [{"role": "user", "content": "hello"}]
REQ = {"model": "smart", "messages": MESSAGES}
RID = "req-handler-test-1"


def error_of(body: object) -> dict[str, Any]:
    assert isinstance(body, dict), body
    err = body["error"]
    assert isinstance(err, dict)
    assert set(err) == {"message", "type", "code", "param"}
    return err


async def test_unknown_key_is_401_even_for_an_unknown_model(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    headers = {"Authorization": "Bearer sk-not-a-known-key", "X-User-Id": "7"}
    for body in ({"model": "no-such-alias", "messages": MESSAGES}, {"model": "no-such-alias"}):
        status, out, resp_headers = await h.chat(body, headers)
        assert status == 401
        assert error_of(out)["code"] == "invalid_api_key"
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
        assert "no-such-alias" not in orjson.dumps(out).decode()
    assert h.recorder.requests == []


async def test_missing_authorization_is_401(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    status, out, _ = await h.chat(REQ, {"X-User-Id": "7"})
    assert status == 401
    assert error_of(out)["code"] == "invalid_api_key"


async def test_validation_errors_echo_the_request_id(start_proxy: StartProxy) -> None:
    observer = RecordingObserver()
    h = await start_proxy(observer=observer)
    status, out, headers = await h.chat(
        {"model": "no-such-alias", "messages": MESSAGES}, h.headers(**{"X-Request-Id": RID})
    )
    assert status == 404
    assert error_of(out)["code"] == "model_not_found"
    assert headers["X-Request-Id"] == RID
    status, out, headers = await h.chat({"model": "smart"}, h.headers(**{"X-Request-Id": RID}))
    assert (status, error_of(out)["param"]) == (400, "messages")
    assert headers["X-Request-Id"] == RID
    assert h.recorder.requests == []
    await h.flush_events()
    finished = [f for f in observer.finished if f.request_id == RID]
    assert [(f.outcome, f.status, f.event_id) for f in finished] == [
        (Outcome.REJECTED, 404, None),
        (Outcome.REJECTED, 400, None),
    ]


async def test_success_relays_with_our_request_id(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    status, out, headers = await h.chat(REQ, h.headers(**{"X-Request-Id": RID}))
    assert status == 200
    assert isinstance(out, dict) and out["object"] == "chat.completion"
    assert headers["X-Request-Id"] == RID
    assert headers["X-Upstream-Request-Id"].startswith("req_fake_")
    (call,) = h.recorder.requests
    assert call["body"]["model"] == "fake-model-v1"
    assert call["headers"]["X-Client-Request-Id"] == RID
    # Nothing of the caller's credentials travels upstream.
    sent = {k.lower(): v for k, v in call["headers"].items()}
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert all(SERVICE_KEY not in v for v in sent.values())
    assert "x-user-id" not in sent


async def test_upstream_unreachable_is_502_with_request_id(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    await h.stop_upstream()
    status, out, headers = await h.chat(REQ, h.headers(**{"X-Request-Id": RID}))
    assert status == 502
    assert error_of(out)["code"] == "upstream_unavailable"
    assert headers["X-Request-Id"] == RID


async def test_no_response_head_in_time_is_504(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(first_byte_delay=5), first_byte=0.2)
    status, out, headers = await h.chat(REQ, h.headers(**{"X-Request-Id": RID}))
    assert status == 504
    err = error_of(out)
    assert err["code"] == "upstream_timeout"
    assert "waiting for the response head" in err["message"]
    assert headers["X-Request-Id"] == RID


async def test_models_needs_a_key(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    async with h.session.get(f"{h.url}/v1/models") as resp:
        assert resp.status == 401
        assert error_of(await resp.json())["code"] == "invalid_api_key"
    async with h.session.get(f"{h.url}/v1/models", headers=h.headers()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == set(h.config.aliases)
    assert {m["owned_by"] for m in body["data"]} == {"fake"}
    assert all(m["object"] == "model" for m in body["data"])


async def test_healthz_needs_no_key(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    async with h.session.get(f"{h.url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_readyz_reports_ready(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    async with h.session.get(f"{h.url}/readyz") as resp:
        assert resp.status == 200
        report = await resp.json()
    assert report["ready"] is True
    assert report["checks"]["config"]["status"] == "ok"


# -- a provider whose key variable is not set ----------------------------------------


@pytest.fixture
async def proxy_without_provider_key(
    tmp_path: Path, shared_encodings: EncodingRegistry
) -> AsyncIterator[tuple[str, Any, aiohttp.ClientSession]]:
    fake_app = build_fake_app()
    fake = TestServer(fake_app, host="127.0.0.1")
    await fake.start_server()
    text = BASE_YAML.format(
        base_url=f"http://127.0.0.1:{fake.port}/v1",
        stream_usage="true",
        first_byte=5,
        idle=5,
        total=30,
    )
    config = parse_config(yaml.safe_load(text + service_key_yaml()), "test.yaml", {})
    settings = EnvSettings(
        outbox_path=str(tmp_path / "outbox.sqlite3"), sink_path=str(tmp_path / "events.jsonl")
    )
    server = TestServer(build_app(config, settings, encodings=shared_encodings), host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield f"http://127.0.0.1:{server.port}", fake_app, session
    finally:
        await session.close()
        await server.close()
        await fake.close()


async def test_provider_key_unset_is_503_without_an_upstream_call(
    proxy_without_provider_key: tuple[str, Any, aiohttp.ClientSession],
) -> None:
    url, fake_app, session = proxy_without_provider_key
    headers = {"Authorization": f"Bearer {SERVICE_KEY}", "X-User-Id": "7", "X-Request-Id": RID}
    async with session.post(f"{url}/v1/chat/completions", json=REQ, headers=headers) as resp:
        assert resp.status == 503
        assert resp.headers["X-Request-Id"] == RID
        err = error_of(await resp.json())
    assert (err["code"], err["type"]) == ("upstream_credentials_missing", "server_error")
    assert "fake" in err["message"]
    assert "FAKE_PROVIDER_KEY" in err["message"]  # says what to set
    assert fake_app[RECORDER].requests == []
    async with session.get(f"{url}/readyz") as resp:
        assert resp.status == 503
        report = await resp.json()
    assert report["ready"] is False
    assert report["checks"]["config"]["providers_without_key"] == ["fake"]
    # An alias that could only answer 503 is not offered.
    async with session.get(f"{url}/v1/models", headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"] == []
