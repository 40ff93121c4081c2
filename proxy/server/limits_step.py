"""The rate-limit step of a request (proxy.billing.limits): admit, answer 429 when
over a limit, have the x-ratelimit-* headers put on whatever response goes out
(`Exchange.reply_headers`: the relays and the error answer add them), and give back
what the request held when it ends."""

from __future__ import annotations

from proxy.billing.limits import FAIL_CLOSED, LIMITED, admission_tokens
from proxy.billing.record import Exchange
from proxy.errors import rate_limit_unavailable, rate_limited
from proxy.server.state import ProxyState


async def check_limits(state: ProxyState, ex: Exchange) -> None:
    limiter = state.limiter
    if limiter is None:
        return
    assert ex.ctx is not None and ex.chat is not None
    admission = ex.rate_admission  # made with the reservation (proxy.billing.admission)
    if admission is None:
        tokens = admission_tokens(ex.chat, ex.prompt_bound)
        admission = await limiter.admit(ex.ctx, tokens, ex.request_id)
    if admission.headers:
        ex.reply_headers = admission.headers
    if admission.result == LIMITED:
        raise rate_limited(admission.refused or "this user", admission.retry_after_s)
    if admission.result == FAIL_CLOSED:
        raise rate_limit_unavailable()

    def finish() -> None:
        metered = ex.metered
        actual = metered.usage.total_tokens if metered is not None else 0
        limiter.finish(admission, actual, ex.request_id)

    ex.cleanups.append(finish)
