"""HTTP endpoints. Thin: parse, run the steps in order, answer.

request → billing context → alias → guard → upstream → relay/meter → settle

One pipeline for every billed endpoint (chat.completions, responses, embeddings,
completions): what differs per endpoint is its `Endpoint` (proxy.server.endpoints:
the body's parser and the upstream path) and the wire format the parsed request
carries (proxy.billing.wire_formats: counting, usage and reply readers).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.billing.admission import admit, settle_hold
from proxy.billing.record import Exchange
from proxy.billing.settlement import Settlement, quote, settle
from proxy.config.model import ENDPOINT_NAMES
from proxy.contract.outcome import Outcome
from proxy.errors import ApiError
from proxy.server.chat_request import body_user, decode_body, read_body
from proxy.server.endpoints import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Endpoint,
)
from proxy.server.limits_step import check_limits
from proxy.server.readiness import readiness
from proxy.server.state import STATE, ProxyState
from proxy.upstream.relay import relay_error_status, relay_json, relay_stream

log = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def billed(endpoint: Endpoint) -> Handler:
    """The aiohttp handler of one billed endpoint: `serve` for it."""
    return functools.partial(serve, endpoint=endpoint)


async def serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE]
    state.observer.request_started()
    ex = Exchange(time.perf_counter())
    try:
        return await _pipeline(request, state, ex, endpoint)
    except ApiError as err:
        if ex.outcome is None:
            ex.finish(Outcome.REJECTED, err.status)
        if ex.ctx is not None:
            # The rate limiter's headers (a 429's included) and the request id.
            err.headers = {
                **(err.headers or {}),
                **(ex.reply_headers or {}),
                "X-Request-Id": ex.ctx.request_id,
            }
        raise
    except asyncio.CancelledError:
        # The client left before any step recorded an outcome (e.g. while sending
        # its body): an abort, not a proxy or upstream failure in metrics and logs.
        if ex.outcome is None:
            ex.finish(Outcome.CLIENT_ABORTED, 499)
        raise
    finally:
        # Runs on every exit, the client's disconnect (CancelledError) and shutdown
        # included. The charge is enqueued before any await, so no cancellation can
        # lose it; then the request waits for its batch to be on disk.
        now = time.perf_counter()
        committed, settlement = _settle(state, ex, now)
        settle_hold(state.guard, ex, settlement)  # the hold becomes the charge
        ex.release()  # the request's slots (upstream target, rate limits), before any await
        recorded = time.perf_counter()
        try:
            if committed is not None:
                await _wait_committed(committed, ex, state)
        finally:
            # Metrics and the access line are bookkeeping, not part of the answer:
            # they run in the loop's next round, after this task step has written
            # the response (bench/: ~50-70 us less added latency per request).
            state.loop.call_soon(state.observer.request_finished, ex, settlement, now, recorded)


async def _pipeline(
    request: web.Request, state: ProxyState, ex: Exchange, endpoint: Endpoint
) -> web.StreamResponse:
    raw = await read_body(request, state.config.server.max_body_bytes)
    ex.request_bytes = len(raw)
    body = decode_body(raw)
    # Who pays comes before what is asked: an unknown key learns nothing about aliases.
    user = body.get("user")
    ex.ctx = await state.auth.authenticate(request.headers, user if isinstance(user, str) else None)
    body_user(body)  # its type is checked once the caller is known
    ex.chat = chat = endpoint.parse_body(body, state.config.aliases, started_ms=ex.started_ms)
    ex.encoding = state.encodings.get(chat.alias.tokenizer)

    # Credit is reserved (or checked) before the call; clamp mode may lower the limit.
    chat = await admit(state.guard, state.config.guard.mode, ex, state.limiter)
    await check_limits(state, ex)  # per-user/key rate limits (server/limits_step.py)

    # Targets, retries, fallbacks, cooldowns (proxy.upstream.router): `ex.chat` is
    # then the serving target's view of the alias, `ex.attempts` the attempts made.
    up, wd, strip = await state.router.send(ex, endpoint.path)

    if up.status >= 400:
        return await relay_error_status(up, ex, wd)
    # Cost in band is opt-in per alias (else the reply is byte-faithful).
    cost = (
        functools.partial(quote, ex)
        if chat.alias.cost_in_band and chat.format.cost_in_band
        else None
    )
    if chat.stream and up.content_type == "text/event-stream":
        return await relay_stream(
            request, up, ex, wd, strip=strip, metering=state.settings.metering, quote=cost
        )
    return await relay_json(up, ex, wd, quote=cost)


chat_completions = billed(CHAT_COMPLETIONS)
responses = billed(RESPONSES)
embeddings = billed(EMBEDDINGS)
completions = billed(COMPLETIONS)


def _settle(
    state: ProxyState, ex: Exchange, now: float
) -> tuple[asyncio.Future[None] | None, Settlement | None]:
    """Price, build the charge event and enqueue it; `now` is when the relay ended.

    Synchronous on purpose (see the caller). Returns the outbox commit to wait for,
    and the settlement (None when settling failed: logged here).
    """
    if ex.outcome is None:  # an unexpected exception escaped: still account for it
        ex.finish(Outcome.UPSTREAM_ERROR, 500)
    try:
        settlement = settle(ex, now)
        event = settlement.event
        if event is None:
            return None, settlement
        return state.outbox.put_nowait(
            event.event_id, event.kafka_key(), event.to_json()
        ), settlement
    except Exception:
        # Never lose the reason a charge could not be recorded; the answer itself
        # goes out regardless (it is relayed, or about to be).
        log.exception("settling request %s failed", ex.request_id)
        return None, None


async def _wait_committed(committed: asyncio.Future[None], ex: Exchange, state: ProxyState) -> None:
    try:
        # Not shielded: the future is this request's alone, and a cancelled wait only
        # cancels it; the batch still commits (the outbox skips futures already done).
        await committed
    except Exception as exc:
        # The outbox keeps the event and retries the commit; this request only
        # reports that its charge is not on disk yet.
        log.error("committing the charge of request %s failed: %r", ex.request_id, exc)
        state.observer.charge_commit_failed()


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await state.auth.authenticate(request.headers)  # the alias list is for callers only
    created = int(state.started_at)
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": alias.provider.name,
            # Which APIs the alias answers (its `endpoints`), in config names.
            "endpoints": [e for e, api in ENDPOINT_NAMES.items() if alias.serves(api)],
        }
        for name, alias in state.config.aliases.items()
        if not alias.provider.key_missing  # it could only answer 503
    ]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def readyz(request: web.Request) -> web.Response:
    report = await readiness(request.app[STATE])
    return web.json_response(report, status=200 if report["ready"] else 503, dumps=_dumps)


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()
