from __future__ import annotations

from typing import Any

import pytest

from proxy.config import parse_config
from proxy.config.yaml_loader import load_yaml
from proxy.errors import ConfigError

BASE = """
providers:
  a: {base_url: "http://a/v1"}
  b: {base_url: "http://b/v1"}
price_rules:
  std: {input: 1, output: 2}
  cheap: {input: 0.5, output: 1}
"""


def load(text: str) -> Any:
    return parse_config(load_yaml(BASE + text), "t.yaml", {})


def test_shorthand_is_one_target() -> None:
    c = load("aliases:\n  x: {provider: a, model: m, price_rule: std}\n")
    (t,) = c.aliases["x"].targets
    assert (t.provider.name, t.model, t.price_rule.id, t.weight, t.priority) == (
        "a",
        "m",
        "std",
        1.0,
        0,
    )
    assert c.aliases["x"].routing.retries is None


def test_targets_priorities_overrides_fallbacks_and_routing() -> None:
    c = load(
        """
routing: {retries: 3, backoff_base_ms: 10, deadline_s: 20, retry_on: [connect, 5xx]}
aliases:
  x:
    price_rule: std
    targets:
      - {provider: b, model: mb, priority: 1, price_rule: cheap, max_concurrency: 4}
      - {provider: a, model: ma, weight: 3}
    fallbacks: [y]
    routing: {retries: 1, cooldown_s: 5}
  y: {provider: b, model: my, price_rule: std}
"""
    )
    x = c.aliases["x"]
    assert [t.key for t in x.targets] == ["a/ma", "b/mb"]
    assert (x.provider.name, x.model, x.price_rule.id) == ("a", "ma", "std")
    assert x.targets[1].price_rule.id == "cheap" and x.targets[1].max_concurrency == 4
    assert x.fallbacks == ("y",)
    assert (x.routing.retries, x.routing.cooldown_s, x.routing.backoff_base_ms) == (1, 5, 10)
    assert x.routing.retry_on == frozenset({"connect", "5xx"}) and x.routing.deadline_s == 20
    assert c.aliases["y"].routing.retries == 3


def test_alias_price_rule_may_come_from_every_target() -> None:
    c = load(
        "aliases:\n  x:\n    targets: [{provider: a, model: m, price_rule: cheap},"
        " {provider: b, model: n, price_rule: std}]\n"
    )
    assert c.aliases["x"].price_rule.id == "cheap"


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ("  x: {targets: [], price_rule: std}\n", "at least one target"),
        ("  x: {targets: [{provider: a, model: m}], provider: a, price_rule: std}\n", "either"),
        ("  x: {targets: [{provider: z, model: m}], price_rule: std}\n", "unknown provider"),
        ("  x: {targets: [{provider: a, model: m}]}\n", "price_rule: required"),
        ("  x: {targets: [{provider: a, model: m, weight: 0}], price_rule: std}\n", "positive"),
        (
            "  x: {targets: [{provider: a, model: m}, {provider: a, model: m}], price_rule: std}\n",
            "duplicate target",
        ),
        ("  x: {provider: a, model: m, price_rule: std, fallbacks: [x]}\n", "itself"),
        ("  x: {provider: a, model: m, price_rule: std, fallbacks: [nope]}\n", "unknown alias"),
        (
            "  x: {provider: a, model: m, price_rule: std, routing: {retry_on: [404]}}\n",
            "ever retried",
        ),
        ("  x: {provider: a, model: m, price_rule: std, routing: {tries: 1}}\n", "unknown key"),
    ],
)
def test_bad_routing_config(aliases: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load("aliases:\n" + aliases)


def test_limits_section() -> None:
    c = load(
        "aliases:\n  x: {provider: a, model: m, price_rule: std}\n"
        "limits: {user: {rpm: 60, tpm: 10000}, key: {concurrency: 4}, fail_open: false}\n"
    )
    lim = c.limits
    assert lim.enabled and not lim.fail_open
    assert (lim.user.rpm, lim.user.tpm, lim.user.concurrency) == (60, 10000, None)
    assert lim.key.concurrency == 4
    assert not load("aliases:\n  x: {provider: a, model: m, price_rule: std}\n").limits.enabled
    with pytest.raises(ConfigError, match=r"limits\.user\.rpm"):
        load("aliases:\n  x: {provider: a, model: m, price_rule: std}\nlimits: {user: {rpm: 0}}\n")
