"""`packages:` and `rewards:` of the YAML: read exactly, refused with the key path."""

from __future__ import annotations

from decimal import Decimal

import pytest

from proxy.config.store import money, parse_packages, parse_rewards, parse_store
from proxy.errors import ConfigError


def test_packages_keep_prices_as_written() -> None:
    (p, q) = parse_packages(
        [
            {
                "id": "starter",
                "name": "Starter",
                "credits": 5000,
                "price": "4.90",
                "original_price": 6.99,
                "currency": "EUR",
            },
            {"id": "plain", "credits": 10, "price": 5},
        ]
    )
    assert p.as_dict() == {
        "id": "starter",
        "name": "Starter",
        "credits": 5000,
        "original_price": "6.99",
        "price": "4.90",
        "currency": "EUR",
    }
    assert (q.name, q.price, q.original_price, q.currency) == (
        "plain",
        Decimal(5),
        Decimal(5),
        "USD",
    )
    assert q.as_dict()["price"] == "5.00"
    assert money(Decimal("0.125")) == "0.125"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"packages": {"a": 1}}, "packages: must be a list"),
        ({"packages": [{"id": "A b", "credits": 1, "price": 1}]}, "packages[0].id: must be"),
        ({"packages": [{"id": "a", "credits": 1}]}, "packages[0].price: required"),
        ({"packages": [{"id": "a", "credits": 1, "price": -1}]}, "non-negative price"),
        ({"packages": [{"id": "a", "credits": 1, "price": True}]}, "must be a decimal price"),
        ({"packages": [{"id": "a", "credits": 0, "price": 1}]}, "packages[0].credits"),
        ({"packages": [{"id": "a", "credits": 1, "price": 1, "currency": "usd"}]}, "currency"),
        ({"packages": [{"id": "a", "credits": 1, "price": 1, "colour": "red"}]}, "unknown key"),
        (
            {
                "packages": [
                    {"id": "a", "credits": 1, "price": 1},
                    {"id": "a", "credits": 2, "price": 1},
                ]
            },
            "packages[1].id: duplicate id 'a'",
        ),
        ({"rewards": [{"id": "r", "credits": 5}]}, "exactly one of once_per_user"),
        (
            {"rewards": [{"id": "r", "credits": 5, "once_per_user": True, "max_per_day": 2}]},
            "exactly one of once_per_user",
        ),
        ({"rewards": [{"id": "r", "credits": 5, "max_per_day": 0}]}, "rewards[0].max_per_day"),
    ],
)
def test_bad_store_sections_are_refused_with_the_key_path(raw: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_store(raw.get("packages"), raw.get("rewards"))


def test_rewards() -> None:
    once, daily = parse_rewards(
        [
            {"id": "signup", "credits": 500, "once_per_user": True},
            {"id": "checkin", "credits": 20, "max_per_day": 3},
        ]
    )
    assert (once.once_per_user, once.max_per_day) == (True, None)
    assert (daily.once_per_user, daily.max_per_day, daily.credits) == (False, 3, 20)
    assert parse_store(None, None).packages == ()
