"""The app and its error middleware: every error leaves as `{"error": {...}}`, never
an HTML page or a stack trace."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.billing.encodings import EncodingRegistry
from proxy.config import EnvSettings, parse_config
from proxy.errors import ApiError
from proxy.server.app import build_app, error_middleware
from tests.fixtures_proxy import BASE_YAML, PROVIDER_KEY, service_key_yaml

SECRET = "db-password-hunter2"


def error_of(raw: bytes) -> dict[str, Any]:
    body = orjson.loads(raw)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]


@pytest.fixture
async def proxy_url(
    tmp_path: Path, shared_encodings: EncodingRegistry
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    text = BASE_YAML.format(
        base_url="http://127.0.0.1:9/v1", stream_usage="true", first_byte=5, idle=5, total=30
    )
    config = parse_config(
        yaml.safe_load(text + service_key_yaml()), "t.yaml", {"FAKE_PROVIDER_KEY": PROVIDER_KEY}
    )
    settings = EnvSettings(
        outbox_path=str(tmp_path / "outbox.sqlite3"), sink_path=str(tmp_path / "events.jsonl")
    )
    server = TestServer(build_app(config, settings, encodings=shared_encodings), host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield f"http://127.0.0.1:{server.port}", session
    finally:
        await session.close()
        await server.close()


async def test_unknown_route_is_404_json(proxy_url: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = proxy_url
    async with session.get(f"{url}/v2/nothing-here") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        err = error_of(await resp.read())
    assert (err["code"], err["type"]) == ("not_found", "invalid_request_error")
    assert "/v2/nothing-here" in err["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("POST", "/healthz", "GET"),
        ("PUT", "/readyz", "GET"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    proxy_url: tuple[str, aiohttp.ClientSession], method: str, path: str, allowed: str
) -> None:
    url, session = proxy_url
    async with session.request(method, f"{url}{path}") as resp:
        assert resp.status == 405
        assert resp.content_type == "application/json"
        assert allowed in resp.headers["Allow"]
        err = error_of(await resp.read())
    assert err["code"] == "method_not_allowed"
    assert method in err["message"] and path in err["message"]


async def test_metrics_endpoint_is_served(proxy_url: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = proxy_url
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert "llm_proxy" in await resp.text()


# -- the middleware on its own, with handlers that fail in every way -----------------


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError(f"unexpected failure with {SECRET}")


async def api_error(request: web.Request) -> web.Response:
    raise ApiError(409, "conflict here", code="my_code", param="p", headers={"X-Extra": "1"})


async def too_large(request: web.Request) -> web.Response:
    raise web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20)


class Teapot(web.HTTPClientError):
    status_code = 418


async def teapot(request: web.Request) -> web.Response:
    raise Teapot()


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


@pytest.fixture
async def middleware_url() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    app = web.Application(middlewares=[error_middleware])
    for path, handler in [
        ("/boom", boom),
        ("/api-error", api_error),
        ("/too-large", too_large),
        ("/teapot", teapot),
        ("/redirect", redirect),
    ]:
        app.router.add_get(path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield f"http://127.0.0.1:{server.port}", session
    finally:
        await session.close()
        await server.close()


async def test_unexpected_exception_is_500_without_traceback(
    middleware_url: tuple[str, aiohttp.ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    url, session = middleware_url
    with caplog.at_level(logging.ERROR, logger="proxy.errors"):
        async with session.get(f"{url}/boom") as resp:
            assert resp.status == 500
            assert resp.content_type == "application/json"
            raw = await resp.read()
    err = error_of(raw)
    assert (err["code"], err["type"]) == ("internal_error", "server_error")
    assert SECRET.encode() not in raw
    assert b"Traceback" not in raw and b"RuntimeError" not in raw
    # ... but the operator gets the whole story in the log.
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


async def test_api_error_keeps_status_code_param_and_headers(
    middleware_url: tuple[str, aiohttp.ClientSession],
) -> None:
    url, session = middleware_url
    async with session.get(f"{url}/api-error") as resp:
        assert resp.status == 409
        assert resp.headers["X-Extra"] == "1"
        err = error_of(await resp.read())
    assert err == {
        "message": "conflict here",
        "type": "invalid_request_error",
        "code": "my_code",
        "param": "p",
    }


async def test_http_413_gets_the_request_too_large_code(
    middleware_url: tuple[str, aiohttp.ClientSession],
) -> None:
    url, session = middleware_url
    async with session.get(f"{url}/too-large") as resp:
        assert resp.status == 413
        err = error_of(await resp.read())
    assert err["code"] == "request_too_large"


async def test_other_http_errors_get_a_generic_code(
    middleware_url: tuple[str, aiohttp.ClientSession],
) -> None:
    url, session = middleware_url
    async with session.get(f"{url}/teapot") as resp:
        assert resp.status == 418
        assert resp.content_type == "application/json"
        err = error_of(await resp.read())
    assert (err["code"], err["type"]) == ("http_error", "invalid_request_error")


async def test_redirects_pass_through(middleware_url: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = middleware_url
    async with session.get(f"{url}/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"
