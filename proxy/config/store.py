"""The credit store's YAML sections: `packages:` (what can be bought) and `rewards:`
(what a service may grant), read into frozen values.

```yaml
packages:
  - {id: starter, name: Starter, credits: 100000, price: "4.99", original_price: "6.99",
     currency: USD}
rewards:
  - {id: signup, credits: 5000, once_per_user: true}
  - {id: daily-checkin, credits: 200, max_per_day: 1}
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from proxy.config.readers import Section, type_name
from proxy.errors import ConfigError

ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
CURRENCY_RE = re.compile(r"[A-Z]{3}")
MAX_CREDITS = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    name: str
    credits: int
    price: Decimal
    original_price: Decimal
    currency: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "credits": self.credits,
            "original_price": money(self.original_price),
            "price": money(self.price),
            "currency": self.currency,
        }


@dataclass(frozen=True, slots=True)
class RewardRule:
    id: str
    credits: int
    once_per_user: bool = False
    max_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    packages: tuple[Package, ...] = ()
    rewards: tuple[RewardRule, ...] = ()

    def package(self, package_id: str) -> Package | None:
        return next((p for p in self.packages if p.id == package_id), None)

    def reward(self, rule_id: str) -> RewardRule | None:
        return next((r for r in self.rewards if r.id == rule_id), None)


def money(value: Decimal) -> str:
    """A price as a decimal string, at least to the cent: 5 -> "5.00", 4.995 -> "4.995"."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        value = value.quantize(Decimal("0.01"))
    return format(value, "f")


def _price(m: Section, key: str, default: Decimal | None = None) -> Decimal:
    raw = m.get(key)
    if raw is None:
        if default is None:
            raise ConfigError(f"{m.where(key)}: required")
        return default
    # A string keeps what was written ("4.90"); a YAML float is read via str().
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ConfigError(f"{m.where(key)}: must be a decimal price, got {type_name(raw)}")
    try:
        value = Decimal(str(raw).strip())
    except InvalidOperation:
        raise ConfigError(f"{m.where(key)}: not a decimal price: {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{m.where(key)}: must be a non-negative price, got {raw!r}")
    return value


def _id(m: Section, where: str, seen: set[str]) -> str:
    ident = m.get("id")
    if not isinstance(ident, str) or not ID_RE.fullmatch(ident):
        raise ConfigError(f"{where}.id: must be 1-64 characters of a-z 0-9 . _ -, got {ident!r}")
    if ident in seen:
        raise ConfigError(f"{where}.id: duplicate id {ident!r}")
    seen.add(ident)
    return ident


def _credits(m: Section) -> int:
    credits = m.count("credits")
    if credits > MAX_CREDITS:
        raise ConfigError(f"{m.where('credits')}: must fit 64 bits, got {credits}")
    return credits


def parse_packages(raw: Any, path: str = "packages") -> tuple[Package, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: must be a list, got {type_name(raw)}")
    seen: set[str] = set()
    packages = []
    for i, entry in enumerate(raw):
        where = f"{path}[{i}]"
        m = Section(
            entry,
            where,
            ("id", "name", "credits", "price", "original_price", "currency"),
            required=True,
        )
        ident = _id(m, where, seen)
        price = _price(m, "price")
        currency = m.text("currency", "USD")
        if not CURRENCY_RE.fullmatch(currency):
            raise ConfigError(
                f"{where}.currency: must be a 3-letter code like USD, got {currency!r}"
            )
        packages.append(
            Package(
                id=ident,
                name=m.text("name", ident) or ident,
                credits=_credits(m),
                price=price,
                original_price=_price(m, "original_price", price),
                currency=currency,
            )
        )
    return tuple(packages)


def parse_rewards(raw: Any, path: str = "rewards") -> tuple[RewardRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: must be a list, got {type_name(raw)}")
    seen: set[str] = set()
    rules = []
    for i, entry in enumerate(raw):
        where = f"{path}[{i}]"
        m = Section(entry, where, ("id", "credits", "once_per_user", "max_per_day"), required=True)
        ident = _id(m, where, seen)
        once = m.flag("once_per_user", False)
        per_day = m.count("max_per_day") if "max_per_day" in m else None
        if once == (per_day is not None):
            raise ConfigError(f"{where}: give exactly one of once_per_user: true or max_per_day: N")
        rules.append(RewardRule(ident, _credits(m), once_per_user=once, max_per_day=per_day))
    return tuple(rules)


def parse_store(packages: Any, rewards: Any) -> StoreConfig:
    return StoreConfig(parse_packages(packages), parse_rewards(rewards))
