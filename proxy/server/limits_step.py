"""The rate-limit step of a request (proxy.billing.limits): admit, answer 429 when
over a limit, put the x-ratelimit-* headers on whatever response goes out, and
give back what the request held when it ends."""

from __future__ import annotations

from aiohttp import web

from proxy.billing.limits import FAIL_CLOSED, LIMITED, admission_tokens
from proxy.billing.record import Exchange
from proxy.errors import rate_limit_unavailable, rate_limited
from proxy.server.state import ProxyState

RATE_LIMIT_HEADERS = "proxy.rate_limit_headers"


async def check_limits(request: web.Request, state: ProxyState, ex: Exchange) -> None:
    limiter = state.limiter
    if limiter is None:
        return
    assert ex.ctx is not None and ex.chat is not None
    admission = ex.rate_admission  # made with the reservation (proxy.billing.admission)
    if admission is None:
        tokens = admission_tokens(ex.chat, ex.prompt_bound)
        admission = await limiter.admit(ex.ctx, tokens, ex.request_id)
    if admission.headers:
        request[RATE_LIMIT_HEADERS] = admission.headers
    if admission.result == LIMITED:
        raise rate_limited(admission.refused or "this user", admission.retry_after_s)
    if admission.result == FAIL_CLOSED:
        raise rate_limit_unavailable()

    def finish() -> None:
        metered = ex.metered
        actual = metered.usage.total_tokens if metered is not None else 0
        limiter.finish(admission, actual, ex.request_id)

    ex.cleanups.append(finish)


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: OpenAI's x-ratelimit-* headers on every response."""
    headers = request.get(RATE_LIMIT_HEADERS)
    if headers:
        response.headers.update(headers)
