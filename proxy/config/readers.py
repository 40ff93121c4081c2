"""Typed readers for YAML sections: the one set every section is read with.

Each error names the key path (`providers.openai.timeouts.connect: ...`) and is
worded the same way wherever the key lives; `load_config` adds the file name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any

from proxy.errors import ConfigError

_MISSING: Any = object()
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


def flag_word(text: str, *, on_off: bool = True) -> bool | None:
    """The one reading of a boolean written as text (environment, headers): true/false,
    1/0, yes/no in any case, and on/off unless `on_off` is False (request headers
    refuse them, as they always did); None when it is none of these."""
    word = text.strip().lower()
    if word in _TRUE or (on_off and word == "on"):
        return True
    if word in _FALSE or (on_off and word == "off"):
        return False
    return None


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


class Section:
    """One YAML mapping at `path`, with its allowed keys checked up front."""

    def __init__(
        self,
        raw: Any,
        path: str,
        allowed: Iterable[str] | None = None,
        *,
        required: bool = False,
    ) -> None:
        self.path = path
        if raw is None:
            if required:
                raise ConfigError(f"{path or '(top level)'}: required section is missing")
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path or '(top level)'}: must be a mapping, got {type_name(raw)}")
        self.raw: Mapping[Any, Any] = raw
        if allowed is not None:
            known = frozenset(allowed)
            for key in raw:
                if key not in known:
                    raise ConfigError(
                        f"{self.where(key)}: unknown key (allowed: {', '.join(sorted(known))})"
                    )

    def where(self, key: object) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def __len__(self) -> int:
        return len(self.raw)

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def entries(self, what: str) -> Iterator[tuple[str, Any]]:
        """(name, raw value) of a mapping of named entries (providers, aliases, rules)."""
        for name, value in self.raw.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{self.where(repr(name))}: {what} must be a non-empty string")
            yield name, value

    def section(
        self, key: str, allowed: Iterable[str] | None = None, *, required: bool = False
    ) -> Section:
        return Section(self.raw.get(key), self.where(key), allowed, required=required)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        """A string, stripped; `required` also refuses blank ones."""
        raw = self.raw.get(key, default)
        if raw is None:
            if required:
                raise ConfigError(f"{self.where(key)}: required")
            return ""
        if not isinstance(raw, str):
            raise ConfigError(f"{self.where(key)}: must be a string, got {raw!r}")
        if required and not raw.strip():
            raise ConfigError(f"{self.where(key)}: must not be empty")
        return raw.strip()

    def flag(self, key: str, default: bool) -> bool:
        raw = self.raw.get(key, default)
        if not isinstance(raw, bool):
            raise ConfigError(f"{self.where(key)}: must be true or false, got {raw!r}")
        return raw

    def number(
        self, key: str, default: float = _MISSING, *, positive: bool = False, whole: bool = False
    ) -> float:
        """A non-negative (or positive) number; `whole` refuses fractions."""
        value = self.raw.get(key, default)
        if value is _MISSING:
            raise ConfigError(f"{self.where(key)}: required")
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        if ok and whole:
            ok = float(value).is_integer()
        if ok and positive:
            ok = value > 0
        if not ok:
            what = "whole number" if whole else "number"
            sign = "positive" if positive else "non-negative"
            raise ConfigError(f"{self.where(key)}: must be a {sign} {what}, got {value!r}")
        return float(value)

    def count(self, key: str, default: int = _MISSING, *, positive: bool = True) -> int:
        return int(self.number(key, default, positive=positive, whole=True))

    def decimal(self, key: str, default: Decimal | None = None) -> Decimal:
        """A non-negative rate, exactly as written: YAML floats are read via str()."""
        value = self.raw.get(key, _MISSING)
        if value is _MISSING:
            if default is None:
                raise ConfigError(f"{self.where(key)}: required")
            return default
        # bool is an int subclass: "input: yes" must not become a rate of 1.
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            raise ConfigError(f"{self.where(key)}: must be a non-negative number, got {value!r}")
        # str() first: Decimal(0.1) is 0.1000000000000000055...; str() gives the
        # short repr the YAML author actually wrote.
        number = Decimal(str(value))
        if not number.is_finite() or number < 0:
            raise ConfigError(f"{self.where(key)}: must be a non-negative number, got {value!r}")
        return number

    def items_list(self, key: str) -> list[Any]:
        raw = self.raw.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ConfigError(f"{self.where(key)}: must be a list, got {type_name(raw)}")
        return raw
