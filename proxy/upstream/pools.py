"""Provider clients: one keep-alive pool per provider, the upstream request, the
response headers relayed back."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.billing.record import ChatRequest
from proxy.config.model import Provider
from proxy.errors import invalid_request
from proxy.upstream.http_client import ConnectionPool, UpstreamResponse

# Response headers worth passing back to the caller. Everything else (hop-by-hop
# headers, cookies, the provider account's org and rate-limit headers) stays here.
RELAYED_HEADERS = (
    "content-type",
    "openai-processing-ms",
    "openai-version",
    "retry-after",
    "retry-after-ms",
)


@dataclass(frozen=True, slots=True)
class UpstreamPools:
    """One keep-alive pool per provider (proxy.upstream.http_client), each bounded by
    the provider's `max_connections`."""

    pools: Mapping[str, ConnectionPool]

    @classmethod
    def create(cls, providers: Mapping[str, Provider]) -> UpstreamPools:
        return cls(
            {
                name: ConnectionPool(
                    p.base_url,
                    limit=p.max_connections,
                    connect_timeout_s=p.timeouts.connect,
                    keepalive_s=30.0,
                    static_headers=static_headers(p),
                )
                for name, p in providers.items()
            }
        )

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()))

    def headers_for(self, provider: Provider, request_id: str) -> dict[str, str]:
        """Every header a request with a body carries upstream (the pool adds Host
        and Accept, the request its Content-Length)."""
        return {
            "Content-Type": "application/json",
            **static_headers(provider),
            "X-Client-Request-Id": request_id,
        }

    async def post(
        self, provider: Provider, body: bytes, request_id: str, path: str = "/chat/completions"
    ) -> UpstreamResponse:
        """Send the request to `path` under the provider's base URL; returns once the
        response head arrived. Failures raise aiohttp's/the OS's exceptions;
        proxy.upstream.failures classifies them."""
        return await self.pools[provider.name].request(
            "POST",
            path,
            body,
            {"Content-Type": "application/json", "X-Client-Request-Id": request_id},
        )

    async def call(
        self, provider: Provider, method: str, path: str, query: Mapping[str, str], request_id: str
    ) -> UpstreamResponse:
        """A request without a body (the stored-response pass-through)."""
        return await self.pools[provider.name].request(
            method, path, None, {"X-Client-Request-Id": request_id}, query
        )


def static_headers(provider: Provider) -> dict[str, str]:
    """The headers every request to `provider` carries: never anything of the caller's."""
    headers = {"Accept-Encoding": "identity"}  # relayed as received: no re-compressing
    if provider.api_key:
        headers["Authorization"] = f"Bearer {provider.api_key}"
    return headers


def relay_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name in RELAYED_HEADERS:
        value = upstream.get(name)
        if value is not None:
            out[name] = value
    rid = upstream.get("x-request-id")
    if rid is not None:
        # Our own X-Request-Id (the billing request id) is the one the caller
        # gets; the provider's stays available under its own name.
        out["X-Upstream-Request-Id"] = rid
    return out


def upstream_body(chat: ChatRequest) -> tuple[bytes, bool]:
    """The body to send upstream (the alias's model, usage asked for), and whether
    the usage chunk must be stripped from the caller's stream."""
    out = dict(chat.body)
    out["model"] = chat.alias.model
    strip = False
    if (
        chat.stream
        and chat.format.stream_usage_option
        and chat.alias.provider.stream_usage
        and not chat.usage_requested
    ):
        options = out.get("stream_options")
        out["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        strip = True
    try:
        return orjson.dumps(out), strip
    except orjson.JSONEncodeError:
        # orjson reads up to 1024 levels of nesting but writes at most 255: a body
        # in between parses fine and cannot be forwarded. It is the caller's input.
        raise invalid_request(
            "request body nests too deeply (at most 255 levels)", code="invalid_json"
        ) from None
