"""settle(): the charge event of a finished request carries each of the request's
values in its own field (settle builds it positionally, so a swap of two same-typed
arguments would otherwise go unnoticed), priced by the rule and version in force."""

from __future__ import annotations

import pytest
import yaml

from proxy.billing.metering import Metered
from proxy.billing.payer import BillingContext
from proxy.billing.pricing import price
from proxy.billing.record import ChatRequest, Exchange
from proxy.billing.settlement import quote, settle
from proxy.config import YamlConfig, parse_config
from proxy.contract.charge_event import ChargeEvent
from proxy.contract.outcome import Outcome
from proxy.contract.usage import Usage, UsageSource

CONFIG_YAML = """
providers:
  prov-p: {base_url: "http://127.0.0.1:9/v1", api_key_env: K}
price_rules:
  rule-r:
    input: 1000
    output: 2000
    service_tiers: {flex: {input: 500, output: 1000}}
    versions:
      - {effective_from: "2020-01-01T00:00:00Z", input: 3000, output: 4000,
         service_tiers: {flex: {input: 1500, output: 2000}}}
aliases:
  alias-a: {provider: prov-p, model: model-m, price_rule: rule-r,
            allow_params: [service_tier]}
"""


@pytest.fixture(scope="module")
def config() -> YamlConfig:
    return parse_config(yaml.safe_load(CONFIG_YAML), "t.yaml", {"K": "sk-test"})


def finished(config: YamlConfig) -> Exchange:
    ex = Exchange(100.0)
    body = {"model": "alias-a", "messages": [{"role": "user", "content": "hi"}]}
    ex.chat = ChatRequest(config.aliases["alias-a"], body, True, False, service_tier="flex")
    ex.ctx = BillingContext.normalize(
        user_id=41, scene="scene-s", request_id="req-q", conversation_id="conv-c"
    )
    ex.attempts = 3
    ex.client_disconnected = True
    ex.upstream_started = 100.002
    ex.first_byte_at = 100.052
    ex.metered = Metered(Usage(11, 7, 3, 2), UsageSource.ESTIMATED)
    ex.finish(Outcome.CLIENT_ABORTED, 499)
    return ex


def test_every_value_lands_in_its_own_field(config: YamlConfig) -> None:
    ex = finished(config)
    settlement = settle(ex, 100.5)
    event, charge = settlement.event, settlement.charge
    assert event is not None and charge is not None
    assert ex.chat is not None and ex.metered is not None
    expected = price(
        ex.chat.alias.price_rule, ex.metered.usage, service_tier="flex", started_ms=ex.started_ms
    )
    assert charge == expected
    assert (charge.rule_id, charge.rule_version) == ("rule-r", "2020-01-01T00:00:00Z")
    fields = {
        "request_id": "req-q",
        "user_id": 41,
        "scene": "scene-s",
        "conversation_id": "conv-c",
        "alias": "alias-a",
        "provider": "prov-p",
        "upstream_model": "model-m",
        "stream": True,
        "usage": Usage(11, 7, 3, 2),
        "usage_source": UsageSource.ESTIMATED,
        "price_rule": "rule-r",
        "price_version": "2020-01-01T00:00:00Z",
        "service_tier": "flex",
        "credits": expected.credits,
        "outcome": Outcome.CLIENT_ABORTED,
        "latency_ms": pytest.approx(500.0),
        "ttft_ms": pytest.approx(52.0),
        "client_disconnected": True,
        "endpoint": "chat.completions",
        "attempts": 3,
    }
    assert {name: getattr(event, name) for name in fields} == fields
    assert event.credits > 0
    assert quote(ex, ex.metered.usage) == event.credits
    # What the outbox carries reads back as the same event.
    assert ChargeEvent.from_json(event.to_json()) == event


def test_nothing_to_charge_makes_no_event(config: YamlConfig) -> None:
    ex = finished(config)
    ex.metered = Metered(Usage(0, 0), UsageSource.ESTIMATED)
    assert settle(ex, 100.5).event is None
