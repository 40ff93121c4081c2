"""What the request path reports: one place that feeds metrics and the access log.

The access log is one JSON object per request on the `proxy.access` logger, at INFO.
It carries who (user, scene, principal), what (alias, tokens, credits) and how
(status, outcome, latency, TTFT, guard), and never prompt or completion text, API
keys or request headers: it is built from the `Exchange` fields named below only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson
from aiohttp import web

from proxy.metrics import ProxyMetrics

if TYPE_CHECKING:
    from proxy.accounting import Exchange, Settlement
    from proxy.outbox import Outbox

access_log = logging.getLogger("proxy.access")
log = logging.getLogger("proxy.observability")

# With several worker processes another process may be the one scraped: each keeps
# its live gauges (in-flight, outbox) in the shared files this often.
LIVE_REFRESH_S = 1.0


class Observer:
    """Called by the handler at fixed points of every request; serves `/metrics`."""

    def __init__(self, metrics: ProxyMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else ProxyMetrics.from_env()
        self.in_flight = 0
        # Outbox enqueue (or settlement) failures: charges that may be lost.
        self.record_failures = 0
        self.last_record_failed = False
        self._outbox: Outbox | None = None
        self._refresher: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    def attach(self, outbox: Outbox) -> None:
        """Where the outbox gauges come from; starts the multiprocess refresher."""
        self._outbox = outbox
        if self.metrics.multiprocess_dir is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="metrics-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        # A cleanly stopped worker takes its live gauges out of the merged view.
        self.metrics.forget_process()

    async def _refresh_loop(self) -> None:
        while True:
            self.refresh_live()
            await asyncio.sleep(LIVE_REFRESH_S)

    def refresh_live(self) -> None:
        outbox = self._outbox
        if outbox is None:
            self.metrics.set_live(self.in_flight, 0, None)
        else:
            self.metrics.set_live(
                self.in_flight,
                outbox.pending_count(),
                outbox.oldest_pending_age(),
                outbox.queued_count(),
            )

    # -- request hooks -----------------------------------------------------------------

    def request_started(self) -> None:
        self.in_flight += 1

    def charge_commit_failed(self) -> None:
        """The outbox could not commit a charge yet (it retries): counted and shown
        as `failing` by /readyz until a later charge commits."""
        self.record_failures += 1
        self.last_record_failed = True
        self.metrics.charge_commit_failed()

    def charge_published(self, events: int) -> None:
        self.metrics.charge_published(events)

    def charge_publish_failed(self, events: int) -> None:
        self.metrics.charge_publish_failed(events)

    def request_finished(
        self, ex: Exchange, settlement: Settlement | None, now: float, done: float
    ) -> None:
        """`settlement` is None when settling or handing the charge to the outbox
        failed (the handler logged why); `now` is when the relay ended, `done` when
        the charge was handed to the outbox. Called once the response is out, in
        the loop round after (the outbox reports failed commits itself)."""
        self.in_flight -= 1
        if settlement is None:
            self.record_failures += 1
            self.last_record_failed = True
        elif settlement.event is not None:
            self.last_record_failed = False
        self.metrics.observe_request(ex, settlement, now, done)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(access_line(ex, settlement, now))

    # -- /metrics ----------------------------------------------------------------------

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.refresh_live()
        accept = request.headers.get("Accept")
        if self.metrics.multiprocess_dir is None:
            body, content_type = self.metrics.render(accept)
        else:  # merging every process's files reads the disk: keep it off the loop
            body, content_type = await asyncio.to_thread(self.metrics.render, accept)
        return web.Response(body=body, headers={"Content-Type": content_type})


def access_line(ex: Exchange, settlement: Settlement | None, now: float) -> str:
    """The access-log JSON of one request (one orjson dump)."""
    ctx = ex.ctx
    chat = ex.chat
    metered = ex.metered
    charged = settlement is not None and settlement.event is not None
    line = {
        "time": datetime.now(UTC),
        "request_id": ctx.request_id if ctx else None,
        "user_id": ctx.user_id if ctx else None,
        "scene": ctx.scene if ctx else None,
        "principal": ctx.principal if ctx else None,
        "alias": chat.alias.name if chat else None,
        "provider": chat.alias.provider.name if chat else None,
        "stream": chat.stream if chat else None,
        "status": ex.status,
        "outcome": ex.outcome,
        "error_kind": ex.error_kind,
        "guard": ex.guard_decision,
        "tokens": None,
        "usage_source": None,
        "credits": settlement.charge.credits if charged and settlement.charge else 0,
        "charged": charged,
        "latency_ms": ex.latency_ms(now),
        "ttft_ms": ex.ttft_ms(),
    }
    if metered is not None:
        usage = metered.usage
        line["tokens"] = {
            "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens,
            "cached": usage.cached_tokens,
            "reasoning": usage.reasoning_tokens,
        }
        line["usage_source"] = metered.source
    return orjson.dumps(line, option=orjson.OPT_UTC_Z).decode()


def plain_access_log(stream: TextIO) -> logging.Handler:
    """Write the access log to `stream` as bare JSON lines (no time/level prefix, not
    repeated by the root handlers), so a log shipper can parse every line as one
    object. For the CLI's logging set-up; returns the handler (to remove it)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.propagate = False
    return handler


def redact_url(url: str) -> str:
    """The URL without user:password, for start-up logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def log_metrics_mode(metrics: ProxyMetrics, logger: logging.Logger) -> None:
    if metrics.multiprocess_dir is None:
        logger.info("metrics: GET /metrics (single process)")
    else:
        logger.info("metrics: GET /metrics (multiprocess, dir %s)", metrics.multiprocess_dir)
