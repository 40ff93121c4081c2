"""check_price_params: price-changing fields are priced by the version in force, or 400."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.billing.price_params import check_price_params
from proxy.config import parse_config
from proxy.config.model import Alias
from proxy.errors import ApiError

JAN_2027 = 1_798_761_600_000  # 2027-01-01T00:00:00Z
CONFIG = {
    "providers": {"p": {"base_url": "http://x/v1"}},
    "price_rules": {
        "r": {
            "input": 1,
            "output": 1,
            "versions": [
                {
                    "effective_from": "2027-01-01T00:00:00Z",
                    "input": 2,
                    "output": 2,
                    "audio_input": 9,
                    "audio_output": 9,
                    "request_fee": 1,
                    "service_tiers": {"priority": {"multiplier": 2}},
                }
            ],
        }
    },
    "aliases": {
        "a": {
            "provider": "p",
            "model": "m",
            "price_rule": "r",
            "allow_params": ["service_tier", "audio", "web_search_options", "route"],
        },
        "plain": {"provider": "p", "model": "m", "price_rule": "r"},
        "gratis": {"provider": "p", "model": "m", "free": True, "allow_params": ["audio"]},
    },
}


def alias(name: str) -> Alias:
    return parse_config(CONFIG, "t.yaml", {}).aliases[name]


def refused(body: dict[str, Any], name: str, at: int) -> ApiError:
    with pytest.raises(ApiError) as info:
        check_price_params({"model": name, "messages": [], **body}, alias(name), at)
    assert (info.value.status, info.value.code) == (400, "unsupported_parameter")
    return info.value


@pytest.mark.parametrize(
    ("body", "tier"),
    [
        ({"service_tier": "priority"}, "priority"),
        ({"service_tier": "default"}, "default"),
        ({"audio": {"voice": "x"}, "modalities": ["text", "audio"]}, None),
        ({"web_search_options": {}}, None),
        ({"route": "fallback"}, None),  # a field the operator vouched for
    ],
)
def test_allowed_and_priced_fields_pass(body: dict[str, Any], tier: str | None) -> None:
    assert check_price_params(body, alias("a"), JAN_2027) == tier


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"service_tier": "priority"}, "service_tier"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
def test_allowed_fields_the_version_in_force_does_not_price_are_refused(
    body: dict[str, Any], param: str
) -> None:
    # Before 2027 the undated rates apply: no tiers, no audio rates, no fee.
    err = refused(body, "a", JAN_2027 - 1)
    assert err.param == param and "not priced" in err.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"service_tier": "priority"}, "service_tier"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"web_search_options": {"x": 1}}, "web_search_options"),
        ({"x-" * 80: 1}, "x-" * 50),  # unknown fields are named, bounded
    ],
)
def test_fields_the_alias_does_not_allow_are_refused(body: dict[str, Any], param: str) -> None:
    assert refused(body, "plain", JAN_2027).param == param


def test_unpriced_tier_value_and_bad_type() -> None:
    assert "priced: default, priority" in refused({"service_tier": "flex"}, "a", JAN_2027).message
    assert refused({"service_tier": 2}, "a", JAN_2027).param == "service_tier"


def test_free_alias_needs_the_permission_but_no_price() -> None:
    assert check_price_params({"audio": {"voice": "x"}}, alias("gratis"), 0) is None
    assert refused({"web_search_options": {}}, "gratis", 0).param == "web_search_options"
