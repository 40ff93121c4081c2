"""The record of one request: the validated chat request and the mutable `Exchange`
that every step of the request path fills in (who pays, what was asked, how it
ended, what was used). `proxy.billing.settlement` turns it into a charge."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import tiktoken

from proxy.billing.guard import GuardDecision
from proxy.billing.hold import Hold
from proxy.billing.metering import Metered, estimate_prompt_only
from proxy.billing.payer import BillingContext
from proxy.billing.wire_formats import CHAT, WireFormat
from proxy.config.model import Alias
from proxy.contract.outcome import Outcome
from proxy.contract.records import record

if TYPE_CHECKING:
    from proxy.billing.limits import Admission

log = logging.getLogger(__name__)


class ErrorKind(StrEnum):
    """How an upstream exchange failed (the `kind` label of upstream error metrics)."""

    CONNECT = "connect"  # no response head: refused, reset, DNS, TLS
    TIMEOUT = "timeout"  # a Watchdog bound expired
    STATUS = "status"  # the upstream answered 4xx/5xx
    MID_STREAM = "mid_stream"  # the connection broke while the body was read


@record
class ChatRequest:
    """A request body validated against the configured aliases: chat.completions
    (whence the name) or any other endpoint, which `format` names (its metering
    pieces, proxy.billing.wire_formats)."""

    alias: Alias
    body: dict[str, Any]  # the caller's body, as parsed (used for prompt counting)
    stream: bool
    # The caller asked for `stream_options.include_usage` itself; if not, the
    # usage-only chunk we request on its behalf is removed from its stream.
    usage_requested: bool
    # The request's service_tier, checked against the alias's price rule
    # (proxy.billing.price_params); None when absent.
    service_tier: str | None = None
    format: WireFormat = CHAT

    @property
    def endpoint(self) -> str:
        """The charge event's `endpoint` (proxy.contract.charge_event.ENDPOINTS)."""
        return self.format.endpoint


class Exchange:
    """Mutable, per-request facts (one object per request, never shared)."""

    __slots__ = (
        "attempts",
        "chat",
        "cleanups",
        "client_disconnected",
        "ctx",
        "encoding",
        "error_kind",
        "first_byte_at",
        "guard_decision",
        "hold",
        "metered",
        "outcome",
        "prompt_bound",
        "rate_admission",
        "reply_headers",
        "request_bytes",
        "started",
        "started_ms",
        "status",
        "upstream_started",
    )

    def __init__(self, started: float, started_ms: int | None = None) -> None:
        self.started = started
        # Wall clock at arrival (unix ms): picks the price version in force.
        self.started_ms = time.time_ns() // 1_000_000 if started_ms is None else started_ms
        self.upstream_started: float | None = None
        self.first_byte_at: float | None = None
        self.chat: ChatRequest | None = None
        self.ctx: BillingContext | None = None
        self.encoding: tiktoken.Encoding | None = None
        self.guard_decision: GuardDecision | None = None
        self.hold: Hold | None = None  # admission's reservation (guard.mode: reserve)
        # The admission estimate's prompt bound, once computed (rate limits reuse it).
        self.prompt_bound: int | None = None
        # The rate limiter's decision when it was made with the reservation (one
        # script call: proxy.billing.admission); else the limits step makes it.
        self.rate_admission: Admission | None = None
        # Headers a step wants on whatever answer goes out (the rate limiter's
        # x-ratelimit-*): the relays and the error answer add them.
        self.reply_headers: Mapping[str, str] | None = None
        self.outcome: Outcome | None = None
        self.status: int = 0
        self.error_kind: ErrorKind | None = None
        self.metered: Metered | None = None
        self.request_bytes: int | None = None  # size of the request body (bounds its text)
        self.client_disconnected = False  # the caller left before the response ended
        self.attempts = 1  # upstream attempts made (proxy.upstream.router), the served one included
        # Run once when the request ends, however it ends (`release`): slots to give
        # back (a target's concurrency, the rate limiter's), usage to report.
        self.cleanups: list[Callable[[], None]] = []

    @property
    def request_id(self) -> str:
        return self.ctx.request_id if self.ctx is not None else ""

    def mark_first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()

    def finish(self, outcome: Outcome, status: int, error_kind: ErrorKind | None = None) -> None:
        self.outcome = outcome
        self.status = status
        if error_kind is not None:
            self.error_kind = error_kind

    def release(self) -> None:
        """Run the cleanups (each once; one failing does not stop the others)."""
        cleanups, self.cleanups = self.cleanups, []
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception:
                log.exception("request %s: releasing failed", self.request_id)

    def estimate_prompt_only(self) -> Metered:
        assert self.chat is not None and self.encoding is not None
        return estimate_prompt_only(
            self.chat.body, self.encoding, self.request_bytes, self.chat.format
        )

    def latency_ms(self, now: float) -> float:
        return round((now - self.started) * 1000, 3)

    def ttft_ms(self) -> float | None:
        if self.first_byte_at is None:
            return None
        return round((self.first_byte_at - self.started) * 1000, 3)
