"""ProxyMetrics and the access line, fed with real Exchange/settle values (no server)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.billing.metering import Metered
from proxy.billing.payer import BillingContext
from proxy.billing.record import ChatRequest, Exchange
from proxy.billing.settlement import Settlement, settle
from proxy.config import YamlConfig, parse_config
from proxy.contract.outcome import Outcome
from proxy.contract.usage import Usage, UsageSource
from proxy.logs import plain_access_log, redact_url
from proxy.telemetry.access_log import access_line
from proxy.telemetry.metrics import NO_ALIAS, ProxyMetrics, status_class
from proxy.telemetry.observer import Observer

CONFIG_YAML = """
providers:
  fake: {base_url: "http://127.0.0.1:9/v1", api_key_env: K}
price_rules:
  std: {input: 1000, cached_input: 500, output: 2000}
aliases:
  smart: {provider: fake, model: m1, price_rule: std}
  freebie: {provider: fake, model: m2, free: true}
"""
PROMPT = "a secret prompt text that must never be logged"
USAGE = Usage(10, 5, 4, 2)


@pytest.fixture(scope="module")
def config() -> YamlConfig:
    return parse_config(yaml.safe_load(CONFIG_YAML), "t.yaml", {"K": "sk-test-provider"})


def exchange(
    config: YamlConfig,
    *,
    alias: str = "smart",
    stream: bool = False,
    user_id: int = 7,
    usage: Usage | None = USAGE,
    source: UsageSource = UsageSource.UPSTREAM,
    outcome: Outcome = Outcome.COMPLETED,
    status: int = 200,
    error_kind: str | None = None,
    guard: str | None = "allow",
    upstream: bool = True,
) -> Exchange:
    """A request that started at t=100 s, reached upstream at +2 ms, first byte at +52 ms."""
    ex = Exchange(100.0)
    body = {"model": alias, "messages": [{"role": "user", "content": PROMPT}]}
    ex.chat = ChatRequest(config.aliases[alias], body, stream, False)
    ex.ctx = BillingContext.normalize(user_id=user_id, scene="chat", request_id="req-1")
    ex.guard_decision = guard
    if upstream:
        ex.upstream_started = 100.002
        ex.first_byte_at = 100.052
    if usage is not None:
        ex.metered = Metered(usage, source)
    ex.finish(outcome, status, error_kind=error_kind)
    return ex


def samples(text: str, openmetrics: bool = False) -> dict[tuple[str, frozenset], float]:
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    return {
        (s.name, frozenset(s.labels.items())): s.value for fam in parse(text) for s in fam.samples
    }


def value(got: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def scrape(m: ProxyMetrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = m.render(None)
    assert content_type.startswith("text/plain")
    return samples(body.decode())


def test_one_completed_request_updates_every_series(config: YamlConfig) -> None:
    m = ProxyMetrics(providers=["fake"])
    ex = exchange(config)
    settlement = settle(ex, 100.5)
    assert settlement.event is not None and settlement.charge is not None
    m.observe_request(ex, settlement, 100.5, 100.5035)
    got = scrape(m)
    labels = {"alias": "smart", "stream": "false"}
    assert (
        value(got, "llm_proxy_requests_total", **labels, status_class="2xx", outcome="completed")
        == 1
    )
    assert value(got, "llm_proxy_request_duration_seconds_count", **labels) == 1
    assert value(got, "llm_proxy_request_duration_seconds_sum", **labels) == pytest.approx(0.5)
    assert value(got, "llm_proxy_request_duration_seconds_bucket", **labels, le="0.25") == 0
    assert value(got, "llm_proxy_request_duration_seconds_bucket", **labels, le="0.5") == 1
    assert value(got, "llm_proxy_upstream_ttfb_seconds_sum", **labels) == pytest.approx(0.05)
    # before: 2 ms (arrival to upstream), after: 3.5 ms (relay end to recorded)
    assert value(got, "llm_proxy_overhead_seconds_sum", phase="before_upstream") == pytest.approx(
        0.002
    )
    assert value(got, "llm_proxy_overhead_seconds_sum", phase="after_upstream") == pytest.approx(
        0.0035
    )
    assert value(got, "llm_proxy_overhead_seconds_sum", phase="total") == pytest.approx(0.0055)
    assert value(got, "llm_proxy_overhead_seconds_bucket", phase="total", le="0.005") == 0
    assert value(got, "llm_proxy_overhead_seconds_bucket", phase="total", le="0.01") == 1
    for kind, n in (("prompt", 10), ("completion", 5), ("cached", 4), ("reasoning", 2)):
        assert (
            value(got, "llm_proxy_tokens_total", alias="smart", kind=kind, source="upstream") == n
        )
    assert value(got, "llm_proxy_credits_charged_total", alias="smart") == settlement.charge.credits
    assert settlement.charge.credits > 0
    assert value(got, "llm_proxy_guard_decisions_total", result="allow") == 1
    assert value(got, "llm_proxy_guard_decisions_total", result="block") == 0
    assert value(got, "llm_proxy_charge_events_total", result="enqueued") == 1
    assert value(got, "llm_proxy_charge_events_total", result="enqueue_failed") == 0
    for kind in ("connect", "timeout", "status", "mid_stream"):  # created up front
        assert value(got, "llm_proxy_upstream_errors_total", provider="fake", kind=kind) == 0


def test_failures_rejections_and_uncharged_requests(config: YamlConfig) -> None:
    m = ProxyMetrics()
    blocked = exchange(
        config, usage=None, guard="block", upstream=False, outcome=Outcome.REJECTED, status=402
    )
    m.observe_request(blocked, settle(blocked, 100.01), 100.01, 100.01)
    unparsed = Exchange(100.0)
    unparsed.finish(Outcome.REJECTED, 404)
    m.observe_request(unparsed, settle(unparsed, 100.001), 100.001, 100.001)
    failed = exchange(
        config,
        stream=True,
        usage=None,
        outcome=Outcome.UPSTREAM_ERROR,
        status=502,
        error_kind="connect",
    )
    failed.first_byte_at = None
    m.observe_request(failed, settle(failed, 100.1), 100.1, 100.1)
    aborted = exchange(
        config,
        stream=True,
        source=UsageSource.ESTIMATED,
        outcome=Outcome.CLIENT_ABORTED,
        status=499,
        usage=Usage(10, 3),
    )
    m.observe_request(aborted, None, 100.2, 100.2)  # the outbox enqueue failed
    anonymous = exchange(config, alias="freebie", user_id=0, guard="skipped")
    m.observe_request(anonymous, settle(anonymous, 100.3), 100.3, 100.3)
    got = scrape(m)

    def requests(alias: str, stream: str, cls: str, outcome: str) -> float | None:
        return value(
            got,
            "llm_proxy_requests_total",
            alias=alias,
            stream=stream,
            status_class=cls,
            outcome=outcome,
        )

    assert requests("smart", "false", "4xx", "rejected") == 1
    assert requests(NO_ALIAS, "false", "4xx", "rejected") == 1
    assert requests("smart", "true", "5xx", "upstream_error") == 1
    assert requests("smart", "true", "4xx", "client_aborted") == 1
    assert requests("freebie", "false", "2xx", "completed") == 1
    assert value(got, "llm_proxy_upstream_errors_total", provider="fake", kind="connect") == 1
    assert not [k for k in got if ("provider", NO_ALIAS) in k[1]]  # no provider: no series
    assert value(got, "llm_proxy_guard_decisions_total", result="block") == 1
    assert value(got, "llm_proxy_guard_decisions_total", result="skipped") == 1
    assert value(got, "llm_proxy_guard_decisions_total", result="allow") == 2
    assert value(got, "llm_proxy_charge_events_total", result="enqueue_failed") == 1
    assert value(got, "llm_proxy_charge_events_total", result="enqueued") == 0  # nobody to charge
    assert (
        value(got, "llm_proxy_tokens_total", alias="smart", kind="completion", source="estimated")
        == 3
    )
    assert (
        value(got, "llm_proxy_tokens_total", alias="freebie", kind="prompt", source="upstream")
        == 10
    )
    # Nothing charged: the abort's enqueue failed and the free alias has no payer.
    assert value(got, "llm_proxy_credits_charged_total", alias="smart") == 0
    # Only requests that reached upstream have an overhead; the blocked one has none.
    assert value(got, "llm_proxy_overhead_seconds_count", phase="total") == 3
    # A request without a first byte has no TTFB.
    assert value(got, "llm_proxy_upstream_ttfb_seconds_count", alias="smart", stream="true") == 1


def test_labelled_children_are_cached(config: YamlConfig) -> None:
    m = ProxyMetrics()
    for _ in range(3):
        ex = exchange(config)
        m.observe_request(ex, settle(ex, 100.5), 100.5, 100.5)
    assert len(m._requests) == 1 and len(m._series) == 1
    got = scrape(m)
    assert (
        value(
            got,
            "llm_proxy_requests_total",
            alias="smart",
            stream="false",
            status_class="2xx",
            outcome="completed",
        )
        == 3
    )


def test_apps_do_not_share_a_registry(config: YamlConfig) -> None:
    a, b = ProxyMetrics(), ProxyMetrics()
    ex = exchange(config)
    a.observe_request(ex, settle(ex, 100.5), 100.5, 100.5)
    a.charge_published(4)
    b.charge_publish_failed(2)
    got_a, got_b = scrape(a), scrape(b)
    assert value(got_a, "llm_proxy_charge_events_total", result="published") == 4
    assert value(got_a, "llm_proxy_charge_events_total", result="publish_failed") == 0
    assert value(got_b, "llm_proxy_charge_events_total", result="publish_failed") == 2
    assert value(got_b, "llm_proxy_charge_events_total", result="enqueued") == 0


def test_live_gauges_and_openmetrics(config: YamlConfig) -> None:
    m = ProxyMetrics()
    m.set_live(3, 12, 4.5, 7)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    got = samples(body.decode(), openmetrics=True)
    assert value(got, "llm_proxy_requests_in_flight") == 3
    assert value(got, "llm_proxy_outbox_pending_events") == 12
    assert value(got, "llm_proxy_outbox_oldest_pending_age_seconds") == 4.5
    assert value(got, "llm_proxy_outbox_uncommitted_events") == 7
    m.set_live(0, 0, None)  # empty outbox: age 0
    assert value(scrape(m), "llm_proxy_outbox_oldest_pending_age_seconds") == 0


def test_observer_in_flight_and_record_failures(config: YamlConfig) -> None:
    obs = Observer()
    obs.request_started()
    obs.request_started()
    obs.refresh_live()
    assert value(scrape(obs.metrics), "llm_proxy_requests_in_flight") == 2
    ex = exchange(config)
    obs.request_finished(ex, None, 100.5, 100.6)
    assert obs.record_failures == 1 and obs.last_record_failed
    ex = exchange(config)
    obs.request_finished(ex, settle(ex, 100.5), 100.5, 100.6)
    assert obs.record_failures == 1 and not obs.last_record_failed
    obs.refresh_live()
    assert value(scrape(obs.metrics), "llm_proxy_requests_in_flight") == 0


def test_status_class() -> None:
    assert [status_class(s) for s in (200, 402, 499, 502, 0, 700)] == [
        "2xx",
        "4xx",
        "4xx",
        "5xx",
        "unknown",
        "unknown",
    ]


def test_access_line_fields(config: YamlConfig) -> None:
    ex = exchange(config, stream=True)
    settlement = settle(ex, 100.5)
    assert settlement.charge is not None
    line = orjson.loads(access_line(ex, settlement, 100.5))
    assert line["time"].endswith("Z") and "T" in line["time"]
    del line["time"]
    assert line == {
        "request_id": "req-1",
        "user_id": 7,
        "scene": "chat",
        "principal": "anonymous",
        "alias": "smart",
        "endpoint": "chat.completions",
        "provider": "fake",
        "target": "fake/m1",
        "attempts": 1,
        "stream": True,
        "status": 200,
        "outcome": "completed",
        "error_kind": None,
        "guard": "allow",
        "tokens": {"prompt": 10, "completion": 5, "cached": 4, "reasoning": 2},
        "usage_source": "upstream",
        "metering_flags": [],
        "client_disconnected": False,
        "credits": settlement.charge.credits,
        "charged": True,
        "latency_ms": 500.0,
        "ttft_ms": 52.0,
    }
    assert PROMPT not in access_line(ex, settlement, 100.5)


def test_access_line_of_a_request_rejected_early() -> None:
    ex = Exchange(100.0)
    ex.finish(Outcome.REJECTED, 401)
    line = orjson.loads(access_line(ex, Settlement(None, None), 100.001))
    assert line["status"] == 401 and line["outcome"] == "rejected"
    assert line["user_id"] is None and line["alias"] is None and line["tokens"] is None
    assert line["credits"] == 0 and line["charged"] is False and line["ttft_ms"] is None


def test_access_log_is_skipped_when_disabled(
    config: YamlConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.access")
    obs = Observer()
    ex = exchange(config)
    obs.request_started()
    obs.request_finished(ex, settle(ex, 100.5), 100.5, 100.6)
    assert not [r for r in caplog.records if r.name == "proxy.access"]
    caplog.set_level(logging.INFO, logger="proxy.access")
    obs.request_started()
    obs.request_finished(ex, settle(ex, 100.5), 100.5, 100.6)
    assert len([r for r in caplog.records if r.name == "proxy.access"]) == 1


def test_plain_access_log_writes_bare_json_lines(config: YamlConfig) -> None:
    buf = io.StringIO()
    handler = plain_access_log(buf)
    logger = logging.getLogger("proxy.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        obs = Observer()
        for _ in range(2):
            ex = exchange(config)
            obs.request_started()
            obs.request_finished(ex, settle(ex, 100.5), 100.5, 100.6)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(level)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert [orjson.loads(line)["alias"] for line in lines] == ["smart", "smart"]


def test_redact_url() -> None:
    assert redact_url("https://api.example.com/v1") == "https://api.example.com/v1"
    assert redact_url("https://bob:s3cret@api.example.com:8443/v1") == (
        "https://***@api.example.com:8443/v1"
    )
    assert "tok" not in redact_url("http://tok@h/v1")


# -- several worker processes -----------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, yaml
    from proxy.billing.settlement import settle
    from proxy.config import parse_config
    from proxy.telemetry.metrics import ProxyMetrics
    from tests.telemetry.test_metrics import CONFIG_YAML, exchange

    config = parse_config(yaml.safe_load(CONFIG_YAML), "t.yaml", {"K": "k"})
    from proxy.config import EnvSettings
    m = ProxyMetrics(multiprocess_dir=EnvSettings.from_env().metrics_dir, providers=["fake"])
    assert m.multiprocess_dir
    for _ in range(int(sys.argv[1])):
        ex = exchange(config)
        m.observe_request(ex, settle(ex, 100.5), 100.5, 100.5)
    m.charge_published(int(sys.argv[1]))
    m.set_live(int(sys.argv[2]), int(sys.argv[2]) * 10, float(sys.argv[2]))
    if len(sys.argv) > 3:
        sys.stdout.write(m.render(None)[0].decode())
    """
)


def _run(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, *args],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_multiprocess_scrape_merges_every_worker(tmp_path: Path) -> None:
    # prometheus_client picks its value class at import: only fresh processes can
    # run in multiprocess mode, so every "worker" here is a subprocess.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    _run(env, "2", "1")
    _run(env, "3", "4")
    got = samples(_run(env, "0", "0", "scrape"))
    assert (
        value(
            got,
            "llm_proxy_requests_total",
            alias="smart",
            stream="false",
            status_class="2xx",
            outcome="completed",
        )
        == 5
    )
    assert (
        value(got, "llm_proxy_request_duration_seconds_count", alias="smart", stream="false") == 5
    )
    assert (
        value(got, "llm_proxy_tokens_total", alias="smart", kind="prompt", source="upstream") == 50
    )
    assert value(got, "llm_proxy_charge_events_total", result="published") == 5
    # live gauges: summed (in-flight, pending) or the max (oldest age) over processes
    assert value(got, "llm_proxy_requests_in_flight") == 5
    assert value(got, "llm_proxy_outbox_pending_events") == 50
    assert value(got, "llm_proxy_outbox_oldest_pending_age_seconds") == 4.0
