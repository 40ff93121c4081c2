"""Unbilled calls passed through to a provider as they are: GET/DELETE of a stored
response (proxy.server.stored_responses). The reply is relayed with its status;
error bodies are redacted like any upstream error (proxy.errors), a refused
provider key is a neutral 502, and connection trouble is 502/504."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from proxy.config.model import Provider
from proxy.errors import upstream_status_body, upstream_timeout, upstream_unavailable
from proxy.upstream.failures import status_failure
from proxy.upstream.pools import UpstreamPools, relay_headers


async def pass_through(
    pools: UpstreamPools,
    provider: Provider,
    method: str,
    path: str,
    query: Mapping[str, str],
    request_id: str,
) -> web.Response:
    try:
        async with asyncio.timeout(provider.timeouts.first_byte + provider.timeouts.idle):
            up = await pools.call(provider, method, path, query, request_id)
            try:
                body = await up.read()
            finally:
                up.close()
    except TimeoutError:
        raise upstream_timeout(provider.name, "no complete reply in time") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise upstream_unavailable(provider.name, type(exc).__name__) from None
    out = relay_headers(up.headers)
    out["X-Request-Id"] = request_id
    if up.status >= 400:
        failure = status_failure(up.status, provider.name)
        if failure.error is not None:
            failure.error.headers = {"X-Request-Id": request_id}
            raise failure.error
        body = upstream_status_body(up.status, body, provider.api_key)
        out["Content-Type"] = "application/json"
    return web.Response(status=up.status, body=body, headers=out)
