"""The operations kit in deploy/: compose file, Prometheus alerts and Grafana dashboard.

Every PromQL expression of the dashboard and the alert rules must parse and name only
metrics (and labels) that the proxy really exports: the names are taken from a live
proxy's `/metrics`, not from a list kept by hand. The alert rules pass their promtool
unit tests and the compose file validates, when promtool / docker-compose are installed
(`.ci/run` installs both).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_config
from proxy.contract.outcome import Outcome
from proxy.delivery.kafka import make_producer
from proxy.ledger.api import build_api
from proxy.ledger.book import Book
from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
from proxy.ledger.database import migrate, open_engine
from proxy.ledger.metrics import LedgerMetrics
from proxy.telemetry.metrics import (
    CHARGE_RESULTS,
    GUARD_RESULTS,
    OVERHEAD_PHASES,
    TOKEN_KINDS,
    UPSTREAM_ERROR_KINDS,
    USAGE_SOURCES,
)
from tests.fixtures_kafka import KafkaBroker
from tests.fixtures_proxy import StartProxy
from tests.ledger_events import charge_event
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "llm-proxy.json"
DEPLOY_CONFIG = DEPLOY / "model_aliases.yaml"

# Series that Prometheus itself adds to every target, not the proxy.
PROMETHEUS_SERIES = {"up"}
# Labels that Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Every value a label can take, beyond those the scrape below happens to show.
KNOWN_VALUES: dict[str, set[str]] = {
    "result": {*GUARD_RESULTS, *CHARGE_RESULTS, "hit", "miss"},
    "kind": {*UPSTREAM_ERROR_KINDS, *TOKEN_KINDS},
    "source": set(USAGE_SOURCES),
    "phase": set(OVERHEAD_PHASES),
    "outcome": {*Outcome, ""},
    "status_class": {f"{n}xx" for n in range(1, 6)} | {"unknown"},
    "stream": {"true", "false"},
    "job": {"llm-proxy"},
}
# Grafana's range variables, replaced by a duration before parsing.
GRAFANA_DURATIONS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{__\w+\}")


@dataclass(frozen=True)
class Expr:
    where: str  # e.g. "alerts.yml: LLMProxyDown" or "llm-proxy.json: In flight [A]"
    text: str


@dataclass
class Selector:
    metric: str | None
    equal: dict[str, str] = field(default_factory=dict)  # label = "value" matchers
    labels: set[str] = field(default_factory=set)  # every label a matcher names


def alert_expressions() -> list[Expr]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [
        Expr(f"alerts.yml: {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def dashboard_panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for p in panels:
            out.append(p)
            out.extend(walk(p.get("panels", [])))
        return out

    return walk(json.loads(DASHBOARD.read_text())["panels"])


def dashboard_expressions() -> list[Expr]:
    return [
        Expr(f"llm-proxy.json: {p['title']} [{t['refId']}]", t["expr"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
    ]


def all_expressions() -> list[Expr]:
    return alert_expressions() + dashboard_expressions()


def parse(text: str) -> promql_parser.Expr:
    return promql_parser.parse(GRAFANA_DURATIONS.sub("5m", text))


def selectors(text: str) -> list[Selector]:
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            sel = Selector(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    if m.op == promql_parser.MatchOp.Equal:
                        sel.metric = m.value
                    continue
                sel.labels.add(m.name)
                if m.op == promql_parser.MatchOp.Equal:
                    sel.equal[m.name] = m.value
            found.append(sel)

    promql_parser.walk(parse(text), visit)
    return found


@dataclass
class Exported:
    """What one scrape of the proxy shows: sample name -> label -> values seen."""

    samples: dict[str, dict[str, set[str]]]

    def problems(self, expr: Expr) -> list[str]:
        out = []
        for sel in selectors(expr.text):
            if sel.metric is None:
                out.append(f"{expr.where}: a selector without a metric name")
                continue
            if sel.metric in PROMETHEUS_SERIES:
                continue
            labels = self.samples.get(sel.metric)
            if labels is None:
                out.append(
                    f"{expr.where}: {sel.metric} is exported by neither the proxy nor the ledger"
                )
                continue
            for name in sorted(sel.labels - labels.keys() - TARGET_LABELS):
                out.append(f"{expr.where}: {sel.metric} has no label {name!r}")
            for name, value in sel.equal.items():
                if "$" in value or name not in labels:
                    continue
                if value not in labels[name] | KNOWN_VALUES.get(name, set()):
                    out.append(f"{expr.where}: {sel.metric}{{{name}={value!r}}} never exists")
        return out


def parse_scrape(text: str, into: dict[str, dict[str, set[str]]]) -> None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = into.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)


async def scrape_ledger(broker: KafkaBroker, topic: str, tmp_path: Path) -> str:
    """A ledger consumer that applied one charge, scraped over HTTP (`ledger --listen`)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    engine = open_engine(url)
    await migrate(engine)
    metrics = LedgerMetrics()
    settings = LedgerSettings(
        topic=topic,
        bootstrap=broker.bootstrap,
        group_id=f"kit-{topic}",
        idempotent_producer=broker.supports_idempotence,
        poll_timeout_ms=100,
        session_timeout_ms=3000,
        rebalance_timeout_ms=500,
    )
    consumer = LedgerConsumer(settings, Book(engine), metrics=metrics)
    producer = make_producer(broker.bootstrap, idempotent=broker.supports_idempotence)
    await producer.start()
    try:
        event = charge_event(7, 3)
        await producer.send_and_wait(topic, event.to_json(), key=event.kafka_key())
    finally:
        await producer.stop()
    runner = web.AppRunner(build_api(engine, metrics), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    task = asyncio.create_task(consumer.run())
    try:
        deadline = time.monotonic() + 60
        while consumer.stats.applied < 1 or not metrics.lag.collect()[0].samples:
            assert not task.done(), "the consumer ended early"
            assert time.monotonic() < deadline, "the consumer did not apply the charge"
            await asyncio.sleep(0.05)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            assert resp.status == 200
            return await resp.text()
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)
        await runner.cleanup()
        await engine.dispose()


async def scrape_proxy(start_proxy: StartProxy) -> Exported:
    h = await start_proxy()
    chat = {"model": "smart", "messages": [{"role": "user", "content": "hi"}]}
    status, _, _ = await h.chat(chat)
    assert status == 200
    status, _, _ = await h.chat({**chat, "stream": True})
    assert status == 200
    await h.flush_events()  # the publisher's counters too
    async with h.session.get(f"{h.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, dict[str, set[str]]] = {}
    parse_scrape(text, samples)
    return Exported(samples)


# -- PromQL: parses, and names only what the proxy exports --------------------------


@pytest.mark.parametrize("expr", all_expressions(), ids=lambda e: e.where)
def test_expression_parses(expr: Expr) -> None:
    try:
        parse(expr.text)
    except ValueError as exc:
        pytest.fail(f"{expr.where}: {exc}\n{expr.text}")


def test_kit_has_expressions() -> None:
    assert len(alert_expressions()) >= 8
    assert len(dashboard_expressions()) >= 20


async def test_expressions_use_only_exported_metrics(
    start_proxy: StartProxy, kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    exported = await scrape_proxy(start_proxy)
    parse_scrape(await scrape_ledger(kafka_broker, kafka_topic, tmp_path), exported.samples)
    # The scrapes themselves are meaningful: labelled series exist after the requests.
    assert "alias" in exported.samples["llm_proxy_requests_total"]
    assert "llm_proxy_request_duration_seconds_bucket" in exported.samples
    assert "partition" in exported.samples["llm_ledger_consumer_lag_records"]
    problems = [p for expr in all_expressions() for p in exported.problems(expr)]
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for var in variables:
        if var.get("type") != "query":
            continue
        query = var["definition"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"dashboard variable {var['name']}: unexpected query {query!r}"
        expr = Expr(f"llm-proxy.json: variable {var['name']}", m.group(1))
        problems += exported.problems(expr)
        label = m.group(2)
        for sel in selectors(m.group(1)):
            labels = exported.samples.get(sel.metric or "", {})
            if label not in labels.keys() | TARGET_LABELS:
                problems.append(f"{expr.where}: {sel.metric} has no label {label!r}")
    assert not problems, "\n".join(problems)


def test_an_unknown_metric_is_caught() -> None:
    """The check above is not vacuous: a typo in a name or a label is reported."""
    exported = Exported({"llm_proxy_requests_total": {"alias": {"smart"}}})
    bad = Expr(
        "x", 'rate(llm_proxy_request_total[5m]) + rate(llm_proxy_requests_total{aliass="a"}[5m])'
    )
    assert exported.problems(bad) == [
        "x: llm_proxy_request_total is exported by neither the proxy nor the ledger",
        "x: llm_proxy_requests_total has no label 'aliass'",
    ]


# -- Grafana -----------------------------------------------------------------------


def test_dashboard_is_provisioned_with_its_datasource() -> None:
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    uids = {d["uid"] for d in datasources}
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] in uids, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/llm-proxy.yml").read_text()
    )["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounted = f"./grafana/llm-proxy.json:{provider['options']['path']}/llm-proxy.json:ro"
    assert mounted in grafana["volumes"]


# -- Prometheus: promtool ------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not on PATH (Debian package `prometheus`; .ci/run installs it)")
    return subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_and_rules_are_valid() -> None:
    for args in (("check", "config", PROMETHEUS_CONFIG), ("check", "rules", ALERTS)):
        result = promtool(*(str(a) for a in args))
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {e.where.removeprefix("alerts.yml: ") for e in alert_expressions()}
    assert alerts - tested == set()


# -- docker-compose -----------------------------------------------------------------


def test_compose_file_validates() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not on PATH (Debian package `docker-compose`; .ci/run)")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert m and duration, f"unexpected duration {duration!r}"
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def test_compose_proxy_outlives_its_drain_budget_and_keeps_its_outbox() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    proxy = services["proxy"]
    server = load_config(DEPLOY_CONFIG, {}).server
    budget = server.shutdown_grace_s + server.outbox_drain_s
    assert seconds(proxy["stop_grace_period"]) > budget
    assert "/readyz" in " ".join(proxy["healthcheck"]["test"])
    assert "--workers" in proxy["command"]
    outbox_dir = str(Path(proxy["environment"]["LLM_PROXY_OUTBOX_PATH"]).parent)
    named = set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    mounts = [v.split(":") for v in proxy["volumes"]]
    assert any(src in named and dst == outbox_dir for src, dst, *_ in mounts)
    for name in ("redis", "kafka", "postgres", "prometheus", "grafana"):
        assert services[name]["volumes"], f"{name} keeps its data on a volume"
        assert "healthcheck" in services[name], name
    assert services["kafka-init"]["command"][0].startswith("llm-proxy kafka-init")


def test_compose_sets_only_variables_the_programs_read() -> None:
    source = (ROOT / "proxy/config/env.py").read_text()
    read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source))
    config = load_config(DEPLOY_CONFIG, {})
    read |= {p.api_key_env for p in config.providers.values() if p.api_key_env}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("proxy", "ledger", "ledger-migrate", "kafka-init"):
        unknown = set(services[name].get("environment", {})) - read
        assert not unknown, f"{name}: variables nothing reads: {sorted(unknown)}"


def test_container_config_points_at_no_loopback_address() -> None:
    config = load_config(DEPLOY_CONFIG, {})
    for name, provider in config.providers.items():
        assert not re.search(r"//(127\.|localhost|\[::1\])", provider.base_url), name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/model_aliases.yaml ./model_aliases.yaml" in dockerfile
    assert "STOPSIGNAL SIGTERM" in dockerfile
