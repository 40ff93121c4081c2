"""Relaying one upstream response to the client, streaming or not.

Both paths fill in the request's `Exchange` (outcome, status, TTFT, metered
usage) and never raise for upstream trouble once the client response has
started: a mid-stream failure ends the SSE stream with an error event. Failures
are classified by proxy.upstream.failures.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.billing.metering import (
    Metered,
    MeterFlag,
    Reply,
    estimate_off_loop,
    meter_json,
)
from proxy.billing.record import Exchange
from proxy.config.model import DisconnectPolicy, OnDisconnect
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
from proxy.upstream.http_client import UpstreamResponse
from proxy.upstream.pools import relay_headers
from proxy.upstream.stream_meter import StreamMeter, estimate_reply, meter_stream
from proxy.upstream.watchdog import Watchdog

log = logging.getLogger(__name__)

_UNMETERED = Metered(Usage(completion_tokens=1), UsageSource.ESTIMATED)


def answer_headers(up: UpstreamResponse, ex: Exchange) -> CIMultiDict[str]:
    """The answer's headers: the upstream's we relay, our request id, and what the
    request's steps added (`ex.reply_headers`: set here, not by an
    `on_response_prepare` signal, which cost every response a dispatch)."""
    headers = relay_headers(up.headers)
    headers["X-Request-Id"] = ex.request_id
    extra = ex.reply_headers
    if extra:
        headers.update(extra)
    return headers


async def relay_error_status(up: UpstreamResponse, ex: Exchange, wd: Watchdog) -> web.Response:
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
        up.close()  # read to its end it is back in the pool; else not reusable
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
        error.headers = {**(ex.reply_headers or {}), "X-Request-Id": ex.request_id}
        return error.response()
    headers = answer_headers(up, ex)
    headers["Content-Type"] = "application/json"
    return web.Response(
        status=up.status,
        body=upstream_status_body(up.status, body, provider.api_key),
        headers=headers,
    )


async def relay_json(
    up: UpstreamResponse, ex: Exchange, wd: Watchdog, quote: Quote | None = None
) -> web.Response:
    """`quote` (cost in band, opt-in per alias): the body's usage gains `cost` and the
    response the `X-Credits-Charged` header."""
    assert ex.chat is not None and ex.encoding is not None
    parts: list[bytes] = []  # read here, not by up.read(): a drain goes on from them
    try:
        async for data in up.iter_any():
            parts.append(data)
        body = b"".join(parts)
    except BaseException as exc:
        try:
            await _json_failed(exc, up, ex, wd, parts)
        finally:
            # A half-read connection is closed, never reused (a fully drained one is
            # back in the pool already; closing it is a no-op).
            up.close()
        raise  # _json_failed raises the caller's error, or nothing for a client that left
    finally:
        wd.cancel()
    ex.mark_first_byte()
    ex.metered = meter_json(body, ex.chat.body, ex.encoding, ex.request_bytes, ex.chat.format)
    ex.finish(Outcome.COMPLETED, up.status)
    await _refine(ex, None, body)
    headers = answer_headers(up, ex)
    if quote is not None:
        body, _ = stamp_json(body, quote)
        # What settle() charges: the same usage, rule, version and tier.
        headers["X-Credits-Charged"] = str(quote(ex.metered.usage))
    return web.Response(status=up.status, body=body, headers=headers)


async def _json_failed(
    exc: BaseException, up: UpstreamResponse, ex: Exchange, wd: Watchdog, parts: list[bytes]
) -> None:
    """Reading a non-streamed body failed: classify; a client that left is charged
    (its prompt, or under `drain` the body read to its end). Raises the caller's
    error; returns (for the caller to re-raise `exc`) when the client left."""
    assert ex.chat is not None and ex.encoding is not None
    failure = classify(exc, wd, ex.chat.alias.provider.name, Phase.BODY)
    if failure is None:
        return
    ex.finish(failure.outcome, failure.status, failure.kind)
    # The head said 2xx: the provider took the request and bills its prompt, whether
    # the body then broke, stalled or the client left. Set before any await.
    ex.metered = ex.estimate_prompt_only()
    if failure.error is not None:
        raise failure.error from None
    ex.client_disconnected = True
    policy = ex.chat.alias.disconnect
    if policy.action is OnDisconnect.DRAIN:
        drained = await _drain_body(up, parts, wd, policy)
        if drained is not None:
            ex.metered = meter_json(
                drained, ex.chat.body, ex.encoding, ex.request_bytes, ex.chat.format
            )
            await _refine(ex, None, drained)
            return
    await _refine(ex, Reply())


async def relay_stream(
    request: web.Request,
    up: UpstreamResponse,
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
    headers = answer_headers(up, ex)
    headers.setdefault("Cache-Control", "no-cache")
    out = web.StreamResponse(status=up.status, headers=headers)
    meter = StreamMeter(strip_usage=strip, fmt=ex.chat.format) if metering else None
    stamp = StreamCostStamp(quote) if quote is not None and not strip else None
    released = False
    try:
        await out.prepare(request)
        first = True
        clock = wd.clock
        async for data in up.iter_any():
            if first:
                wd.first_byte()
                ex.mark_first_byte()
                first = False
            else:
                wd.last = clock()  # = wd.touch(), without the call
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
        else:
            ex.client_disconnected = True
            policy = ex.chat.alias.disconnect
            if meter is not None and policy.action is OnDisconnect.DRAIN:
                await _drain_stream(up, meter, wd, policy)
            if not isinstance(exc, CLIENT_WRITE_ERRORS):
                raise  # cancelled because the client left: let the cancellation through
    finally:
        wd.cancel()
        if released:
            up.release()
        else:
            up.close()  # stop reading at once; the half-read connection is not reusable
        # Set before anything is awaited: whatever happens next, there is a charge.
        ex.metered = (
            meter_stream(meter, ex.chat.body, ex.encoding, ex.request_bytes)
            if meter is not None
            else _UNMETERED
        )
        if meter is not None and MeterFlag.BOUNDED in ex.metered.flags:
            await _refine(ex, estimate_reply(meter))
    return out


async def _refine(ex: Exchange, reply: Reply | None, body: bytes | None = None) -> None:
    """Replace a BOUNDED estimate by the count made off the event loop. Cancelled
    (the caller left, shutdown), the bound stays: a charge, never none."""
    metered = ex.metered
    if metered is None or MeterFlag.BOUNDED not in metered.flags:
        return
    assert ex.chat is not None and ex.encoding is not None
    if reply is None:
        try:
            obj = orjson.loads(body or b"")
        except orjson.JSONDecodeError:
            obj = None
        reply = ex.chat.format.json_reply(obj) if isinstance(obj, dict) else Reply()
    try:
        ex.metered = await estimate_off_loop(
            metered, ex.chat.body, reply, ex.encoding, ex.chat.format
        )
    except RuntimeError:  # the executor is shut down (process stopping): keep the bound
        return


async def _drain_stream(
    up: UpstreamResponse, meter: StreamMeter, wd: Watchdog, policy: DisconnectPolicy
) -> None:
    """The caller left: keep reading, writing nothing, until the usage report arrived,
    the stream ended or a drain limit passed (disconnect policy `drain`)."""
    read = 0
    try:
        async with asyncio.timeout(policy.drain_timeout_s):
            async for data in up.iter_any():
                wd.touch()
                meter.drain(data)
                read += len(data)
                if meter.has_report() or read >= policy.drain_max_bytes:
                    return
    except (TimeoutError, *UPSTREAM_READ_ERRORS):
        return
    except asyncio.CancelledError:
        if not wd.absorb():  # not our idle/total bound: a shutdown, let it through
            raise


async def _drain_body(
    up: UpstreamResponse, parts: list[bytes], wd: Watchdog, policy: DisconnectPolicy
) -> bytes | None:
    """The non-streamed body (`parts` read so far) read to its end after the caller
    left, within the drain limits; None when it could not be."""
    read = 0
    try:
        async with asyncio.timeout(policy.drain_timeout_s):
            async for data in up.iter_any():
                parts.append(data)
                read += len(data)
                if read >= policy.drain_max_bytes:
                    return None
    except (TimeoutError, *UPSTREAM_READ_ERRORS):
        return None
    except asyncio.CancelledError:
        if not wd.absorb():
            raise
        return None
    return b"".join(parts)


async def _end_with_error(out: web.StreamResponse, error: ApiError) -> None:
    try:
        await out.write(sse.error_event(error.message, error.type, error.code or "upstream_error"))
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError):
        pass
