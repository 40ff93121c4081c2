"""Provider clients: one keep-alive pool per provider, timeouts, upstream error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Provider, Timeouts
from proxy.errors import ApiError

# Response headers worth passing back to the caller. Everything else (hop-by-hop
# headers, cookies, the provider account's org and rate-limit headers) stays here.
RELAYED_HEADERS = (
    "content-type",
    "openai-processing-ms",
    "openai-version",
    "retry-after",
    "retry-after-ms",
)


class UpstreamFailure(Exception):
    """The upstream exchange failed; `kind` is connect, timeout, status or mid_stream."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def unavailable(provider: Provider, exc: BaseException) -> ApiError:
    return ApiError(
        502,
        f"upstream provider {provider.name!r} is unavailable ({type(exc).__name__})",
        type="upstream_error",
        code="upstream_unavailable",
    )


def timed_out(provider: Provider, what: str) -> ApiError:
    return ApiError(
        504,
        f"upstream provider {provider.name!r} timed out ({what})",
        type="upstream_error",
        code="upstream_timeout",
    )


class Watchdog:
    """Bounds the wait for the first byte, the gap between chunks and the whole exchange.

    One timer per request that re-arms itself lazily: a chunk only stores the
    time it arrived (no timer churn per chunk); when the timer fires it checks
    that stamp and either re-arms or cancels the reading task, which the caller
    turns into a timeout (`expired` tells a timeout from a client disconnect).
    The total bound lives here too rather than in aiohttp's ClientTimeout, which
    would arm a second timer per request (~8 us CPU, measured).
    """

    __slots__ = (
        "_end",
        "_handle",
        "_limit",
        "_loop",
        "_task",
        "expired",
        "idle",
        "last",
        "started",
    )

    def __init__(self, timeouts: Timeouts) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.idle = timeouts.idle
        self._limit = timeouts.first_byte
        self.started = self.last = self._loop.time()
        self._end = self.started + timeouts.total
        self.expired: str | None = None
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            min(self.last + self._limit, self._end), self._check
        )

    def first_byte(self) -> None:
        self.last = self._loop.time()
        if self._handle is not None and self.idle < self._limit:
            # The armed timer still points at the first-byte deadline; a stall right
            # after the first chunk must be caught after `idle`, not after that.
            self._handle.cancel()
            self._handle = self._loop.call_at(min(self.last + self.idle, self._end), self._check)
        self._limit = self.idle

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        deadline = min(self.last + self._limit, self._end)
        now = self._loop.time()
        if now >= deadline:
            self._handle = None
            if now >= self._end:
                self.expired = "total"
            else:
                self.expired = "first byte" if self._limit is not self.idle else "idle"
            if self._task is not None:
                self._task.cancel()
        else:
            self._handle = self._loop.call_at(deadline, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def absorb(self) -> bool:
        """After a CancelledError: True if it was our timeout (and swallow it)."""
        if self.expired is not None and self._task is not None:
            self._task.uncancel()
            return True
        return False


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
                skip_auto_headers=("User-Agent",),
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
        self, provider: Provider, body: bytes, request_id: str
    ) -> aiohttp.ClientResponse:
        """Send the request; returns once the response head arrived.

        Connect failures raise 502 and timeouts 504 as ApiError (nothing was
        relayed yet, so a plain error response is still possible).
        """
        session = self.sessions[provider.name]
        try:
            return await session.post(
                provider.chat_url, data=body, headers=self.headers_for(provider, request_id)
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamFailure("timeout", "connect") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailure("connect", type(exc).__name__) from exc


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
