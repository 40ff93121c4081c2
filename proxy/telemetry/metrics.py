"""Prometheus metrics of one proxy app: names, buckets, and the per-request update.

Every app owns its own `CollectorRegistry` (tests run several apps in one process).
Labels are bounded by configuration only — alias, provider, stream, status class,
outcome, token kind, usage source, guard result — never user or request ids.

Hot path: `observe_request` runs once per request and does every update in one go.
Labelled children are looked up once and cached in plain dicts keyed by label tuples,
because `Metric.labels(...)` costs about a microsecond per call. The request path does
not touch prometheus_client's values at all (each `inc`/`observe` takes a lock, ~1 µs;
a request made ~12 of them): it adds to plain numbers (`_Count`, `_Buckets`) that
`flush()` hands to the children in one go per series, before every scrape (the
registry's first collector, and `set_live`) and every second with several worker
processes (the observer's refresh loop), so a scrape always sees every finished request.

Multiprocess: when `PROMETHEUS_MULTIPROC_DIR` is set (before prometheus_client is
imported, as its value class is chosen at import), every value is written to per-process
mmap files and `/metrics` merges all processes with `MultiProcessCollector`. The live
gauges (in-flight, outbox) are per-process values merged with `livesum`/`livemax`.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy.billing.guard import GuardDecision
from proxy.billing.limits import DECISIONS as RATE_LIMIT_DECISIONS
from proxy.billing.metering import MeterFlag
from proxy.billing.record import ErrorKind
from proxy.contract.usage import UsageSource
from proxy.upstream.router import ATTEMPT_RESULTS

if TYPE_CHECKING:
    from proxy.billing.record import Exchange
    from proxy.billing.settlement import Settlement
    from proxy.config.model import Target


# LLM calls span milliseconds (cached or tiny replies) to many minutes (long reasoning
# streams): roughly 1-2.5-5 steps from 5 ms to 10 min.
DURATION_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    *(5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
TTFB_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    *(2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
)
# The proxy's own time: 100 µs (the CPU budget) up to a second (a stuck fsync).
OVERHEAD_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005),
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

GUARD_RESULTS = tuple(GuardDecision)
RESERVATION_RESULTS = ("admitted", "refused", "clamped", "expired")
CHARGE_RESULTS = ("enqueued", "enqueue_failed", "published", "publish_failed")
UPSTREAM_ERROR_KINDS = tuple(ErrorKind)
TOKEN_KINDS = ("prompt", "completion", "cached", "reasoning")
USAGE_SOURCES = tuple(UsageSource)
OVERHEAD_PHASES = ("before_upstream", "after_upstream", "total")
NO_ALIAS = "none"  # the request failed before its model named a known alias


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "unknown"


class _Count:
    """A counter (or gauge) child's increments, summed until the next flush (no lock: the
    event loop's thread is the only writer, and flushes run on it too)."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n: float = 0

    def inc(self, amount: float = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        n = self.n
        if n:
            self.n = 0
            self.child.inc(n)


class _Buckets:
    """A histogram child's observations, binned until the next flush, the way
    `Histogram.observe` bins them (the first bucket whose bound is >= the value)."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        total, self.total = self.total, 0.0
        child = self.child
        child._sum.inc(total)
        for bucket, n in zip(child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


class _Flusher:
    """Registered first in the app's registry: pending updates reach the children
    before any collector reads them (render, `get_sample_value`)."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # no series of its own

    def collect(self) -> Iterator[Any]:
        self._metrics.flush()
        return iter(())


class _AliasSeries:
    """The children of one (alias, stream) pair, resolved once."""

    __slots__ = ("credits", "duration", "errors", "provider", "tokens", "ttfb")

    def __init__(self, m: ProxyMetrics, alias: str, provider: str, stream: bool) -> None:
        s = "true" if stream else "false"
        self.provider = provider  # the alias's primary; another target's errors are looked up
        self.duration = m._buckets(m.request_duration.labels(alias, s))
        self.ttfb = m._buckets(m.upstream_ttfb.labels(alias, s))
        self.credits = m._count(m.credits.labels(alias))
        # source -> (prompt, completion, cached, reasoning) counters
        self.tokens = {
            src: tuple(m._count(m.tokens.labels(alias, kind, src)) for kind in TOKEN_KINDS)
            for src in USAGE_SOURCES
        }
        # Requests without an alias never reach a provider: no error series for them.
        self.errors = (
            {k: m._count(m.upstream_errors.labels(provider, k)) for k in UPSTREAM_ERROR_KINDS}
            if alias != NO_ALIAS
            else {}
        )


class ProxyMetrics:
    """The metric objects of one app and the code that updates them."""

    def __init__(
        self, *, multiprocess_dir: str | None = None, providers: Iterable[str] = ()
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = r = CollectorRegistry()
        self._pending: list[_Count | _Buckets] = []
        r.register(_Flusher(self))  # first: runs before the others
        self.requests = Counter(
            "llm_proxy_requests_total",
            "Chat completion requests by alias, stream, HTTP status class and outcome.",
            ("alias", "stream", "status_class", "outcome"),
            registry=r,
        )
        self.in_flight = Gauge(
            "llm_proxy_requests_in_flight",
            "Chat completion requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.request_duration = Histogram(
            "llm_proxy_request_duration_seconds",
            "Time from request arrival until the response was relayed (stream ended).",
            ("alias", "stream"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "llm_proxy_upstream_ttfb_seconds",
            "Time from sending the upstream request to its first body byte "
            "(non-streamed: to the whole body).",
            ("alias", "stream"),
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llm_proxy_overhead_seconds",
            "Time spent in the proxy itself: before_upstream (arrival to upstream request), "
            "after_upstream (relay end to charge enqueued and request recorded), total (sum).",
            ("phase",),
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llm_proxy_tokens_total",
            "Tokens metered by alias, kind (cached is part of prompt, reasoning part of "
            "completion) and usage source.",
            ("alias", "kind", "source"),
            registry=r,
        )
        self.credits = Counter(
            "llm_proxy_credits_charged_total",
            "Credits of the charge events enqueued, by alias.",
            ("alias",),
            registry=r,
        )
        self.guard = Counter(
            "llm_proxy_guard_decisions_total",
            "Credit guard decisions by result.",
            ("result",),
            registry=r,
        )
        self.guard_cache = Counter(
            "llm_proxy_guard_cache_lookups_total",
            "Guard lookups in the local Redis mirror by result (hit: decided without "
            "a Redis round trip). Only counted while the mirror is live.",
            ("result",),
            registry=r,
        )
        self.guard_cache_live = Gauge(
            "llm_proxy_guard_cache_live",
            "1 while the guard's local mirror receives Redis invalidations (else every "
            "check reads Redis).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reservations = Counter(
            "llm_proxy_reservations_total",
            "Credit reservations at admission (guard.mode: reserve) by result: admitted, "
            "refused, clamped (served with a lower output limit), expired (holds purged "
            "at their expiry: a proxy that died mid-request, or a ledger lagging more "
            "than guard.hold_ttl_s).",
            ("result",),
            registry=r,
        )
        self.credit_held = Gauge(
            "llm_proxy_credit_held",
            "Credits held by this process's requests in flight (reserved at admission, "
            "not yet settled; settled holds are the ledger's until it applies them).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._held = self._count(self.credit_held)
        self.charge_events = Counter(
            "llm_proxy_charge_events_total",
            "Charge events by result: enqueued/enqueue_failed into the outbox, "
            "published/publish_failed (attempts) by the relay.",
            ("result",),
            registry=r,
        )
        self.outbox_pending = Gauge(
            "llm_proxy_outbox_pending_events",
            "Charge events committed to the outbox and not yet published.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.outbox_uncommitted = Gauge(
            "llm_proxy_outbox_uncommitted_events",
            "Charge events accepted but not yet committed to the outbox file "
            "(a group commit in progress; grows while commits fail, e.g. disk full).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.outbox_oldest_age = Gauge(
            "llm_proxy_outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished charge event (0 when none).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.metering_fallbacks = Counter(
            "llm_proxy_metering_fallbacks_total",
            "Charges not resting on a plain usage report or exact count, by reason: "
            "report_rejected (implausible upstream usage, estimated), count_failed "
            "(the tokenizer failed: UTF-8 byte bound), bounded (too large to count on "
            "the event loop and not refined: byte bound).",
            ("reason",),
            registry=r,
        )
        self.upstream_errors = Counter(
            "llm_proxy_upstream_errors_total",
            "Failed upstream exchanges by provider and kind (connect, timeout, status, "
            "mid_stream).",
            ("provider", "kind"),
            registry=r,
        )
        self.upstream_attempts = Counter(
            "llm_proxy_upstream_attempts_total",
            "Upstream attempts by provider and result: ok (a head that was relayed), "
            "connect, timeout, 429, 5xx (failed; retried when allowed), busy (the target "
            "was at max_concurrency: skipped).",
            ("provider", "result"),
            registry=r,
        )
        self.target_cooling = Gauge(
            "llm_proxy_upstream_target_cooldown",
            "1 while a target (provider/model) is in cooldown or waits for its probe.",
            ("provider", "model"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self._attempts: dict[tuple[str, str], _Count] = {}
        self.rate_limits = Counter(
            "llm_proxy_rate_limit_decisions_total",
            "Rate-limit checks by result: allow, limited (429), fail_open (Redis "
            "unreachable or slow: admitted), fail_closed (the same, refused: 503).",
            ("result",),
            registry=r,
        )
        self._rate_limits = {
            res: self._count(self.rate_limits.labels(res)) for res in RATE_LIMIT_DECISIONS
        }
        # Children created up front so that rate() sees a 0 before the first event.
        self._guard = {res: self._count(self.guard.labels(res)) for res in GUARD_RESULTS}
        self._cache_hit, self._cache_miss = (
            self._count(self.guard_cache.labels(r)) for r in ("hit", "miss")
        )
        self._reservations = {
            res: self._count(self.reservations.labels(res)) for res in RESERVATION_RESULTS
        }
        charge = {res: self.charge_events.labels(res) for res in CHARGE_RESULTS}
        self._enqueued = self._count(charge["enqueued"])
        self._enqueue_failed = self._count(charge["enqueue_failed"])
        self._published = charge["published"]  # once per outbox batch: direct
        self._publish_failed = charge["publish_failed"]
        self._before, self._after, self._total = (
            self._buckets(self.overhead.labels(p)) for p in OVERHEAD_PHASES
        )
        self._fallbacks = {
            flag: self._count(self.metering_fallbacks.labels(flag)) for flag in MeterFlag
        }
        for provider in providers:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(provider, kind)
            for result in ATTEMPT_RESULTS:
                self.upstream_attempt_child(provider, result)
        self._requests: dict[tuple[str, bool, int, str], _Count] = {}
        self._series: dict[tuple[str, bool], _AliasSeries] = {}

    # -- pending updates ---------------------------------------------------------------

    def _count(self, child: Any) -> _Count:
        c = _Count(child)
        self._pending.append(c)
        return c

    def _buckets(self, child: Any) -> _Buckets:
        b = _Buckets(child)
        self._pending.append(b)
        return b

    def flush(self) -> None:
        """Hand every pending update to prometheus_client (call on the event loop's
        thread: the request path's numbers are not locked)."""
        for p in self._pending:
            p.flush()

    # -- updates ---------------------------------------------------------------------

    def observe_request(
        self, ex: Exchange, settlement: Settlement | None, now: float, done: float
    ) -> None:
        """Everything one finished request contributes. `now`: the relay ended;
        `done`: the request is recorded (its charge handed to the outbox, or given up)."""
        chat = ex.chat
        if chat is None:
            alias, stream = NO_ALIAS, False
        else:
            alias, stream = chat.alias.name, chat.stream
        series = self._series.get((alias, stream))
        if series is None:
            series = self._new_series(ex, alias, stream)
        # The updates of `_Count.inc` / `_Buckets.observe`, inlined (a method call
        # each cost more than the update itself).
        key = (alias, stream, ex.status, ex.outcome or "")
        counter = self._requests.get(key)
        if counter is None:
            counter = self._new_request_counter(key)
        counter.n += 1
        started = ex.started
        hist = series.duration
        value = now - started
        hist.counts[bisect_left(hist.bounds, value)] += 1
        hist.total += value
        upstream_started = ex.upstream_started
        if upstream_started is not None:
            before = upstream_started - started
            after = done - now
            total = before + after
            hist = self._before
            hist.counts[bisect_left(hist.bounds, before)] += 1
            hist.total += before
            hist = self._after
            hist.counts[bisect_left(hist.bounds, after)] += 1
            hist.total += after
            hist = self._total
            hist.counts[bisect_left(hist.bounds, total)] += 1
            hist.total += total
            first = ex.first_byte_at
            if first is not None:
                hist = series.ttfb
                value = first - upstream_started
                hist.counts[bisect_left(hist.bounds, value)] += 1
                hist.total += value
        kind = ex.error_kind
        if kind is not None and chat is not None:
            provider = chat.alias.provider.name
            if provider != series.provider:  # served (or failed) by another target
                self.upstream_errors.labels(provider, kind).inc()
            else:
                error = series.errors.get(kind)
                if error is None:  # not pre-created: still counted
                    error = series.errors[kind] = self._count(
                        self.upstream_errors.labels(provider, kind)
                    )
                error.n += 1
        decision = ex.guard_decision
        if decision is not None:
            guard = self._guard.get(decision)
            if guard is None:
                guard = self._guard[decision] = self._count(self.guard.labels(decision))
            guard.n += 1
        metered = ex.metered
        if metered is not None:
            usage = metered.usage
            prompt, completion, cached, reasoning = series.tokens[metered.source]
            prompt.n += usage.prompt_tokens
            completion.n += usage.completion_tokens
            if usage.cached_tokens:
                cached.n += usage.cached_tokens
            if usage.reasoning_tokens:
                reasoning.n += usage.reasoning_tokens
            for flag in metered.flags:
                self._fallbacks[flag].n += 1
        if settlement is None:
            self._enqueue_failed.n += 1
        elif settlement.event is not None:
            self._enqueued.n += 1
            if settlement.charge is not None:
                series.credits.n += settlement.charge.credits

    def _new_series(self, ex: Exchange, alias: str, stream: bool) -> _AliasSeries:
        provider = ex.chat.alias.provider.name if ex.chat is not None else NO_ALIAS
        series = self._series[(alias, stream)] = _AliasSeries(self, alias, provider, stream)
        return series

    def _new_request_counter(self, key: tuple[str, bool, int, str]) -> _Count:
        alias, stream, status, outcome = key
        child = self._count(
            self.requests.labels(
                alias, "true" if stream else "false", status_class(status), str(outcome)
            )
        )
        self._requests[key] = child
        return child

    def charge_commit_failed(self) -> None:
        self._enqueue_failed.inc()

    def rate_limit_decision(self, result: str) -> None:
        self._rate_limits[result].inc()

    def upstream_attempt(self, provider: str, result: str) -> None:
        child = self._attempts.get((provider, result))
        if child is None:
            child = self.upstream_attempt_child(provider, result)
        child.inc()

    def upstream_attempt_child(self, provider: str, result: str) -> Any:
        child = self._count(self.upstream_attempts.labels(provider, result))
        self._attempts[(provider, result)] = child
        return child

    def target_cooldown(self, target: Target, cooling: bool) -> None:
        self.target_cooling.labels(target.provider.name, target.model).set(1 if cooling else 0)

    def guard_cache_lookup(self, hit: bool) -> None:
        (self._cache_hit if hit else self._cache_miss).inc()

    def reservation(self, result: str, count: int = 1) -> None:
        child = self._reservations.get(result)
        if child is not None:
            child.inc(count)

    def held_credit(self, delta: int) -> None:
        self._held.n += delta  # twice a request: summed until the flush (a gauge: +/-)

    def guard_cache_state(self, live: bool) -> None:
        self.guard_cache_live.set(1 if live else 0)

    def charge_published(self, events: int) -> None:
        self._published.inc(events)

    def charge_publish_failed(self, events: int) -> None:
        self._publish_failed.inc(events)

    def set_live(
        self,
        in_flight: int,
        outbox_pending: int,
        oldest_age_s: float | None,
        outbox_uncommitted: int = 0,
    ) -> None:
        """The gauges that describe "now"; set right before a scrape (and, with several
        processes, periodically, since another process may be the one scraped), with
        the pending updates."""
        self.flush()
        self.in_flight.set(in_flight)
        self.outbox_pending.set(outbox_pending)
        self.outbox_oldest_age.set(oldest_age_s or 0.0)
        self.outbox_uncommitted.set(outbox_uncommitted)

    # -- exposition ------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type): Prometheus text, or OpenMetrics when `accept` asks."""
        encoder, content_type = choose_encoder(accept or "")
        if self.multiprocess_dir is None:
            return encoder(self.registry), content_type  # flushes first (_Flusher)
        # Several processes: this may run in a worker thread, so it reads the files
        # as `set_live` (run on the loop right before) left them.
        # A fresh registry per scrape, as prometheus_client's multiprocess docs require.
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)
        return encoder(merged), content_type

    def forget_process(self, pid: int | None = None) -> None:
        """Drop this (or a dead) process's live gauges from the merged view."""
        if pid is None:
            self.flush()  # this process's last requests stay counted in its files
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid() if pid is None else pid, self.multiprocess_dir)
