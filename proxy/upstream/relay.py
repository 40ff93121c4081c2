"""Relaying one upstream response to the client, streaming or not.

Both paths fill in the request's `Exchange` (outcome, status, TTFT, metered
usage) and never raise for upstream trouble once the client response has
started: a mid-stream failure ends the SSE stream with an error event. Failures
are classified by proxy.upstream.failures.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from proxy.billing.metering import Metered, meter_json
from proxy.billing.record import Exchange
from proxy.contract.outcome import Outcome
from proxy.contract.usage import Usage, UsageSource
from proxy.errors import ApiError, upstream_status_body
from proxy.upstream import sse
from proxy.upstream.cost_stamp import Quote, StreamCostStamp, stamp_json
from proxy.upstream.failures import (
    CLIENT_WRITE_ERRORS,
    UPSTREAM_READ_ERRORS,
    Phase,
    classify,
    status_failure,
)
from proxy.upstream.pools import relay_headers
from proxy.upstream.stream_meter import StreamMeter, meter_stream
from proxy.upstream.watchdog import Watchdog

log = logging.getLogger(__name__)

_UNMETERED = Metered(Usage(completion_tokens=1), UsageSource.ESTIMATED)


async def relay_error_status(
    up: aiohttp.ClientResponse, ex: Exchange, wd: Watchdog
) -> web.Response:
    """Upstream answered 4xx/5xx: relay its status and (OpenAI-shaped, redacted)
    error body; a 401/403 (our provider key refused) becomes a neutral 502."""
    assert ex.chat is not None
    provider = ex.chat.alias.provider
    try:
        body = await up.read()
    except UPSTREAM_READ_ERRORS:
        body = b""  # the status says enough; the body is wrapped into OpenAI's shape
    except BaseException as exc:
        assert ex.chat is not None
        failure = classify(exc, wd, ex.chat.alias.provider.name, Phase.BODY)
        if failure is None:
            raise
        ex.finish(failure.outcome, failure.status, failure.kind)
        if failure.error is None:
            raise  # the client left
        raise failure.error from None  # the error body stalled: our timeout
    finally:
        wd.cancel()
    failure = status_failure(up.status, provider.name)
    ex.finish(failure.outcome, failure.status, failure.kind)
    if failure.error is not None:
        # The body is not logged: it may quote the key it refused.
        log.warning(
            "provider %r refused the proxy's credentials (HTTP %d, key from %s)",
            provider.name,
            up.status,
            provider.api_key_env or "no variable",
        )
        error = failure.error
        error.headers = {"X-Request-Id": ex.request_id}
        return error.response()
    headers = relay_headers(up.headers)
    headers["Content-Type"] = "application/json"
    headers["X-Request-Id"] = ex.request_id
    return web.Response(
        status=up.status,
        body=upstream_status_body(up.status, body, provider.api_key),
        headers=headers,
    )


async def relay_json(
    up: aiohttp.ClientResponse, ex: Exchange, wd: Watchdog, quote: Quote | None = None
) -> web.Response:
    """`quote` (cost in band, opt-in per alias): the body's usage gains `cost` and the
    response the `X-Credits-Charged` header."""
    assert ex.chat is not None and ex.encoding is not None
    try:
        body = await up.read()
    except BaseException as exc:
        failure = classify(exc, wd, ex.chat.alias.provider.name, Phase.BODY)
        if failure is None:
            raise
        ex.finish(failure.outcome, failure.status, failure.kind)
        if failure.error is None:  # the client left while we read: the prompt was used
            ex.metered = ex.estimate_prompt_only()
            raise
        raise failure.error from None
    finally:
        wd.cancel()
    ex.mark_first_byte()
    ex.metered = meter_json(body, ex.chat.body, ex.encoding)
    ex.finish(Outcome.COMPLETED, up.status)
    headers = relay_headers(up.headers)
    headers["X-Request-Id"] = ex.request_id
    if quote is not None:
        body, _ = stamp_json(body, quote)
        # What settle() charges: the same usage, rule, version and tier.
        headers["X-Credits-Charged"] = str(quote(ex.metered.usage))
    return web.Response(status=up.status, body=body, headers=headers)


async def relay_stream(
    request: web.Request,
    up: aiohttp.ClientResponse,
    ex: Exchange,
    wd: Watchdog,
    *,
    strip: bool,
    metering: bool = True,
    quote: Quote | None = None,
) -> web.StreamResponse:
    """`metering=False` only with the benchmark switch LLM_PROXY_METERING=off: the
    stream is charged a nominal token so only the metering work differs. `quote`
    (cost in band, when the caller asked for usage): its usage event gains `cost`."""
    assert ex.chat is not None and ex.encoding is not None
    headers = relay_headers(up.headers)
    headers["X-Request-Id"] = ex.request_id
    headers.setdefault("Cache-Control", "no-cache")
    out = web.StreamResponse(status=up.status, headers=headers)
    meter = StreamMeter(strip_usage=strip) if metering else None
    stamp = StreamCostStamp(quote) if quote is not None and not strip else None
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
            if stamp is not None:
                chunk = stamp.feed(chunk)
            if chunk:
                await out.write(chunk)
        tail = meter.unterminated() if meter is not None else b""
        if stamp is not None:
            tail = stamp.tail() + tail
        if tail:
            await out.write(tail)  # relay faithfully even an unterminated last event
        released = True
        ex.finish(Outcome.COMPLETED, up.status)
    except BaseException as exc:
        failure = classify(exc, wd, ex.chat.alias.provider.name, Phase.STREAM, up.status)
        if failure is None:
            raise
        ex.finish(failure.outcome, failure.status, failure.kind)
        if failure.error is not None:
            await _end_with_error(out, failure.error)
        elif not isinstance(exc, CLIENT_WRITE_ERRORS):
            raise  # cancelled because the client left: let the cancellation through
    finally:
        wd.cancel()
        if released:
            up.release()
        else:
            up.close()  # stop reading at once; the half-read connection is not reusable
        ex.metered = (
            meter_stream(meter, ex.chat.body, ex.encoding) if meter is not None else _UNMETERED
        )
    return out


async def _end_with_error(out: web.StreamResponse, error: ApiError) -> None:
    try:
        await out.write(sse.error_event(error.message, error.type, error.code or "upstream_error"))
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError):
        pass
