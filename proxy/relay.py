"""Relaying one upstream response to the client, streaming or not.

Both paths fill in the request's `Exchange` (outcome, status, TTFT, metered
usage) and never raise for upstream trouble once the client response has
started: a mid-stream failure ends the SSE stream with an error event.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web

from proxy import sse
from proxy.accounting import Exchange
from proxy.errors import ApiError, error_body
from proxy.metering import Metered, StreamMeter, meter_json, meter_stream
from proxy.state import STATE
from proxy.upstream import Watchdog, relay_headers
from proxy.usage import Outcome, Usage, UsageSource

_UNMETERED = Metered(Usage(completion_tokens=1), UsageSource.ESTIMATED)

# Reads from the upstream socket that mean "the upstream went away".
UPSTREAM_READ_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError)


def upstream_status_error(status: int, body: bytes) -> bytes:
    """The upstream's error body when it is OpenAI-shaped JSON, else wrapped into that shape."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return body
    return error_body(
        f"upstream returned HTTP {status}", type="upstream_error", code=f"upstream_http_{status}"
    )


async def relay_error_status(
    up: aiohttp.ClientResponse, ex: Exchange, wd: Watchdog
) -> web.Response:
    """Upstream answered 4xx/5xx: relay its status and (OpenAI-shaped) error body."""
    try:
        body = await up.read()
    except UPSTREAM_READ_ERRORS:
        body = b""
    finally:
        wd.cancel()
    ex.finish(Outcome.UPSTREAM_ERROR, up.status, error_kind="status")
    headers = relay_headers(up.headers)
    headers["Content-Type"] = "application/json"
    headers["X-Request-Id"] = ex.request_id
    return web.Response(
        status=up.status, body=upstream_status_error(up.status, body), headers=headers
    )


async def relay_json(up: aiohttp.ClientResponse, ex: Exchange, wd: Watchdog) -> web.Response:
    try:
        body = await up.read()
    except asyncio.CancelledError:
        if not wd.absorb():
            ex.finish(Outcome.CLIENT_ABORTED, 499)
            ex.metered = ex.estimate_prompt_only()
            raise
        ex.finish(Outcome.TIMEOUT, 504, error_kind="timeout")
        raise ex.timeout_error(wd) from None
    except UPSTREAM_READ_ERRORS as exc:
        ex.finish(Outcome.UPSTREAM_ERROR, 502, error_kind="mid_stream")
        raise ApiError(
            502,
            f"upstream connection failed while reading the response ({type(exc).__name__})",
            type="upstream_error",
            code="upstream_unavailable",
        ) from None
    finally:
        wd.cancel()
    ex.mark_first_byte()
    ex.metered = meter_json(body, ex.chat.body, ex.encoding)
    ex.finish(Outcome.COMPLETED, up.status)
    headers = relay_headers(up.headers)
    headers["X-Request-Id"] = ex.request_id
    return web.Response(status=up.status, body=body, headers=headers)


async def relay_stream(
    request: web.Request, up: aiohttp.ClientResponse, ex: Exchange, wd: Watchdog, strip: bool
) -> web.StreamResponse:
    headers = relay_headers(up.headers)
    headers["X-Request-Id"] = ex.request_id
    headers.setdefault("Cache-Control", "no-cache")
    out = web.StreamResponse(status=up.status, headers=headers)
    # None only with the benchmark switch LLM_PROXY_METERING=off (nothing is charged).
    meter = StreamMeter(strip_usage=strip) if request.app[STATE].settings.metering else None
    released = False
    try:
        await out.prepare(request)
        first = True
        async for data in up.content.iter_any():
            if first:
                wd.first_byte()
                ex.mark_first_byte()
                first = False
            else:
                wd.touch()
            chunk = meter.relay(data) if meter is not None else data
            if chunk:
                await out.write(chunk)
        tail = meter.unterminated() if meter is not None else b""
        if tail:
            await out.write(tail)  # relay faithfully even an unterminated last event
        released = True
        ex.finish(Outcome.COMPLETED, up.status)
    except asyncio.CancelledError:
        if not wd.absorb():
            ex.finish(Outcome.CLIENT_ABORTED, 499)
            raise
        ex.finish(Outcome.TIMEOUT, up.status, error_kind="timeout")
        await _end_with_error(out, f"upstream timed out ({wd.expired})", "upstream_timeout")
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        # Writing to the client failed: it went away.
        ex.finish(Outcome.CLIENT_ABORTED, 499)
    except UPSTREAM_READ_ERRORS as exc:
        ex.finish(Outcome.UPSTREAM_ERROR, up.status, error_kind="mid_stream")
        await _end_with_error(
            out,
            f"upstream connection failed mid-stream ({type(exc).__name__})",
            "upstream_stream_error",
        )
    finally:
        wd.cancel()
        if released:
            up.release()
        else:
            up.close()  # stop reading at once; the half-read connection is not reusable
        # Unmetered (benchmark switch), the request is still charged a token so the
        # charge pipeline runs as usual and only the metering work differs.
        ex.metered = (
            meter_stream(meter, ex.chat.body, ex.encoding) if meter is not None else _UNMETERED
        )
    return out


async def _end_with_error(out: web.StreamResponse, message: str, code: str) -> None:
    try:
        await out.write(sse.error_event(message, "upstream_error", code))
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError):
        pass
