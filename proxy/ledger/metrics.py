"""Prometheus metrics of the ledger consumer, served at `/metrics` next to the
snapshot API (`llm-proxy ledger --listen HOST:PORT`).

Its own registry (owned by the consumer's process, not a module global), so a
proxy and a ledger in one test process never mix their series. What an operator
alerts on: how far the consumer is behind (`llm_ledger_consumer_lag_records`, per
partition: the broker's high watermark minus the consumer's position), how old
the newest applied charge was when it was applied (`llm_ledger_event_age_seconds`),
dead letters, and projection writes deferred by a Redis outage.
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class LedgerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "llm_ledger_events_total",
            "Charge events handled, by result (applied, duplicate, dead_lettered).",
            ["result"],
            registry=r,
        )
        for result in ("applied", "duplicate", "dead_lettered"):
            self.events.labels(result)  # every series exists from the first scrape
        self.retries = Counter(
            "llm_ledger_retries_total",
            "Failed attempts against the database, Redis or Kafka (retried until they work).",
            registry=r,
        )
        self.lag = Gauge(
            "llm_ledger_consumer_lag_records",
            "Records in the charge topic not yet applied, per partition.",
            ["partition"],
            registry=r,
        )
        self.event_age = Gauge(
            "llm_ledger_event_age_seconds",
            "Age of the newest charge event of the last applied batch when it was applied.",
            registry=r,
        )
        self.last_batch = Gauge(
            "llm_ledger_last_batch_timestamp_seconds",
            "Unix time the consumer last applied a batch (0: none yet).",
            registry=r,
        )
        self.projection_backlog = Gauge(
            "llm_ledger_projection_backlog_users",
            "Users whose Redis projection waits for Redis to come back.",
            registry=r,
        )

    def batch_applied(self, newest_occurred_ms: int | None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.last_batch.set(now)
        if newest_occurred_ms is not None:
            self.event_age.set(max(0.0, now - newest_occurred_ms / 1000))

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS: web.AppKey[LedgerMetrics] = web.AppKey("ledger_metrics", LedgerMetrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
