"""What the request path reports: one place that feeds metrics and the access log
(proxy.telemetry.access_log), and serves `/metrics`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.logs import ThrottledLog
from proxy.telemetry.access_log import AccessWriter, access_line
from proxy.telemetry.metrics import ProxyMetrics

if TYPE_CHECKING:
    from proxy.billing.record import Exchange
    from proxy.billing.settlement import Settlement
    from proxy.delivery.outbox import Outbox

log = logging.getLogger(__name__)

# Metering fallbacks are logged at most this often (each is counted in a metric).
FALLBACK_LOG_INTERVAL_S = 60.0

# With several worker processes another process may be the one scraped: each keeps
# its live gauges (in-flight, outbox) in the shared files this often.
LIVE_REFRESH_S = 1.0


class Observer:
    """Called by the handler at fixed points of every request; serves `/metrics`."""

    def __init__(self, metrics: ProxyMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self.in_flight = 0
        # Outbox enqueue (or settlement) failures: charges that may be lost.
        self.record_failures = 0
        self.last_record_failed = False
        self._outbox: Outbox | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._fallback_log = ThrottledLog(log, FALLBACK_LOG_INTERVAL_S)
        self.access = AccessWriter()

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
        self.access.flush()
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
        if ex.metered is not None and ex.metered.flags:
            # Never the prompt or the report itself: the request id and why.
            self._fallback_log.warning(
                f"request {ex.request_id}: charged on a fallback "
                f"({', '.join(sorted(ex.metered.flags))}); see llm_proxy_metering_fallbacks_total"
            )
        access = self.access
        if access.enabled():
            access.write(access_line(ex, settlement, now))

    # -- /metrics ----------------------------------------------------------------------

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.refresh_live()
        accept = request.headers.get("Accept")
        if self.metrics.multiprocess_dir is None:
            body, content_type = self.metrics.render(accept)
        else:  # merging every process's files reads the disk: keep it off the loop
            body, content_type = await asyncio.to_thread(self.metrics.render, accept)
        return web.Response(body=body, headers={"Content-Type": content_type})


def log_metrics_mode(metrics: ProxyMetrics, logger: logging.Logger) -> None:
    if metrics.multiprocess_dir is None:
        logger.info("metrics: GET /metrics (single process)")
    else:
        logger.info("metrics: GET /metrics (multiprocess, dir %s)", metrics.multiprocess_dir)
