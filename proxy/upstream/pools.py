"""Provider clients: one keep-alive pool per provider, the upstream request, the
response headers relayed back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.billing.record import ChatRequest
from proxy.config.model import Provider
from proxy.errors import invalid_request

# Response headers worth passing back to the caller. Everything else (hop-by-hop
# headers, cookies, the provider account's org and rate-limit headers) stays here.
RELAYED_HEADERS = (
    "content-type",
    "openai-processing-ms",
    "openai-version",
    "retry-after",
    "retry-after-ms",
)


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request without a User-Agent. The same headers as
    `skip_auto_headers=("User-Agent",)` gave, without the per-request copy of the
    headers and of the skip set that option costs (5% of the relay's samples at
    saturation in bench/bench_profile.py)."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        headers = self.headers
        for name, value in self.DEFAULT_HEADERS.items():  # Accept (Accept-Encoding: ours)
            if name not in headers:
                headers[name] = value


@dataclass(frozen=True, slots=True)
class UpstreamPools:
    """One ClientSession per provider so each has its own bounded keep-alive pool."""

    sessions: Mapping[str, aiohttp.ClientSession]

    @classmethod
    def create(cls, providers: Mapping[str, Provider]) -> UpstreamPools:
        sessions = {}
        for name, p in providers.items():
            connector = aiohttp.TCPConnector(
                limit=p.max_connections,
                limit_per_host=p.max_connections,
                keepalive_timeout=30,
                ttl_dns_cache=300,
            )
            sessions[name] = aiohttp.ClientSession(
                connector=connector,
                # total: enforced by the request's Watchdog (see there).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=p.timeouts.connect),
                # Upstream cookies must not travel from one caller's request to the
                # next one's: every caller shares this session.
                cookie_jar=aiohttp.DummyCookieJar(),
                # The body is relayed as received; decompressing and re-sending
                # would cost CPU for nothing on the usual internal links.
                auto_decompress=False,
                request_class=_UpstreamRequest,  # no User-Agent
                raise_for_status=False,
            )
        return cls(sessions)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions.values()))

    def headers_for(self, provider: Provider, request_id: str) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "X-Client-Request-Id": request_id,
        }
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        return headers

    async def post(
        self, provider: Provider, body: bytes, request_id: str, path: str = "/chat/completions"
    ) -> aiohttp.ClientResponse:
        """Send the request to `path` under the provider's base URL; returns once the
        response head arrived. Failures raise aiohttp's/the OS's exceptions;
        proxy.upstream.failures classifies them."""
        return await self.sessions[provider.name].post(
            provider.url(path), data=body, headers=self.headers_for(provider, request_id)
        )


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
