"""The `auth:` section of the configuration: mode and service keys.

Service keys are configured by their sha256 only; the key itself never appears in
configuration, logs or Redis.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.errors import ConfigError

ANY_SCENE = "*"
SCENE_RE = re.compile(r"[a-z0-9][a-z0-9._:/-]{0,63}")


class AuthMode(StrEnum):
    KEYS = "keys"
    NONE = "none"  # local development only: trusts X-User-Id & co. without any key


@dataclass(frozen=True, slots=True)
class ServiceKey:
    name: str
    sha256: bytes  # digest (32 bytes), compared with hmac.compare_digest
    scenes: frozenset[str]  # contains "*" for any scene

    def allows(self, scene: str) -> bool:
        return ANY_SCENE in self.scenes or scene in self.scenes


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: AuthMode = AuthMode.KEYS
    service_keys: tuple[ServiceKey, ...] = ()
    user_key_cache_ttl_s: float = 30.0  # a revoked user key keeps working this long
    user_key_negative_ttl_s: float = 5.0  # a brand-new key is refused at most this long
    user_key_cache_size: int = 10_000
    redis_timeout_s: float = 1.0  # Redis lookup of a user key; then 503

    @classmethod
    def from_yaml(cls, raw: Any, path: str = "auth") -> AuthConfig:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {type(raw).__name__}")
        known = {
            "mode",
            "service_keys",
            "user_key_cache_ttl_s",
            "user_key_negative_ttl_s",
            "user_key_cache_size",
            "redis_timeout_s",
        }
        for key in raw:
            if key not in known:
                raise ConfigError(f"{path}.{key}: unknown key (known: {', '.join(sorted(known))})")
        mode_raw = raw.get("mode", AuthMode.KEYS.value)
        try:
            mode = AuthMode(mode_raw)
        except ValueError:
            raise ConfigError(f"{path}.mode: must be 'keys' or 'none', got {mode_raw!r}") from None
        default = cls()
        return cls(
            mode=mode,
            service_keys=_service_keys(raw.get("service_keys"), f"{path}.service_keys"),
            user_key_cache_ttl_s=parse_number(raw, "user_key_cache_ttl_s", path, default),
            user_key_negative_ttl_s=parse_number(raw, "user_key_negative_ttl_s", path, default),
            user_key_cache_size=int(
                parse_number(raw, "user_key_cache_size", path, default, whole=True)
            ),
            redis_timeout_s=parse_number(raw, "redis_timeout_s", path, default, positive=True),
        )


def parse_number(
    raw: Mapping[str, Any],
    key: str,
    path: str,
    default: object,
    *,
    whole: bool = False,
    positive: bool = False,
) -> float:
    """`raw[key]` (else `default.key`) as a validated number; shared by config sections."""
    value = raw.get(key, getattr(default, key))
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    if ok and whole:
        ok = float(value).is_integer()
    if ok and positive:
        ok = value > 0
    if not ok:
        what = "whole number" if whole else "number"
        sign = "positive" if positive else "non-negative"
        raise ConfigError(f"{path}.{key}: must be a {sign} {what}, got {value!r}")
    return float(value)


def _service_keys(raw: Any, path: str) -> tuple[ServiceKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: must be a list, got {type(raw).__name__}")
    keys: list[ServiceKey] = []
    for i, entry in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a mapping with name, sha256, scenes")
        for key in entry:
            if key not in ("name", "sha256", "scenes"):
                raise ConfigError(f"{where}.{key}: unknown key (known: name, scenes, sha256)")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name: must be a non-empty string, got {name!r}")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            # The value is a hash, not a key, so echoing it back is harmless.
            raise ConfigError(f"{where}.sha256: must be 64 hex characters, got {digest!r}")
        scenes = entry.get("scenes")
        if not isinstance(scenes, list) or not scenes:
            raise ConfigError(f"{where}.scenes: must be a non-empty list of scenes or ['*']")
        parsed: set[str] = set()
        for j, scene in enumerate(scenes):
            text = scene.strip().lower() if isinstance(scene, str) else None
            if text != ANY_SCENE and (text is None or not SCENE_RE.fullmatch(text)):
                raise ConfigError(f"{where}.scenes[{j}]: not a valid scene: {scene!r}")
            parsed.add(text)
        key = ServiceKey(name.strip(), bytes.fromhex(digest), frozenset(parsed))
        for other in keys:
            if other.name == key.name:
                raise ConfigError(f"{where}.name: duplicate service key name {key.name!r}")
            if other.sha256 == key.sha256:
                raise ConfigError(f"{where}.sha256: same key as {other.name!r}")
        keys.append(key)
    return tuple(keys)
