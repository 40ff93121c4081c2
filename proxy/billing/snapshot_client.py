"""Client of the credit snapshot provider, the source of truth the guard falls back to.

`GET {base_url}/users/{id}/credit-snapshot` -> `{"balance": int, "is_blocked": bool}`.
Every failure (network, timeout, status, body shape) is a `SnapshotError`, so the
guard has exactly one thing to catch and fail open on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import aiohttp
import orjson

MAX_BODY_BYTES = 64 * 1024  # a snapshot is a few dozen bytes; more is not a snapshot


@dataclass(frozen=True, slots=True)
class Snapshot:
    balance: int
    is_blocked: bool


class SnapshotView(Protocol):
    @property
    def balance(self) -> int: ...

    @property
    def is_blocked(self) -> bool: ...


class SnapshotSource(Protocol):
    """Who the guard asks when Redis has no snapshot: this client (the ledger's
    credit API), or the embedded ledger's books."""

    async def fetch(self, user_id: int) -> SnapshotView: ...


class SnapshotError(Exception):
    """The provider could not give a usable snapshot (the message has no secrets)."""


class SnapshotClient:
    def __init__(self, base_url: str, timeout: float, session: aiohttp.ClientSession) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("credit snapshot URL must start with http:// or https://")
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session

    async def fetch(self, user_id: int) -> Snapshot:
        url = f"{self._base_url}/users/{user_id}/credit-snapshot"
        try:
            async with self._session.get(
                url, timeout=self._timeout, headers={"Accept": "application/json"}
            ) as resp:
                if resp.status != 200:
                    raise SnapshotError(f"snapshot provider answered HTTP {resp.status}")
                body = await resp.content.read(MAX_BODY_BYTES + 1)
        except TimeoutError:
            raise SnapshotError("snapshot provider timed out") from None
        except aiohttp.ClientError as exc:
            raise SnapshotError(f"snapshot provider unreachable: {type(exc).__name__}") from None
        if len(body) > MAX_BODY_BYTES:
            raise SnapshotError("snapshot provider answer too large")
        return parse_snapshot(body)


def parse_snapshot(body: bytes) -> Snapshot:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SnapshotError("snapshot provider answer is not JSON") from None
    if not isinstance(data, dict):
        raise SnapshotError("snapshot provider answer is not a JSON object")
    balance = data.get("balance")
    blocked = data.get("is_blocked")
    # bool is an int subclass: `true` is not a balance.
    if not isinstance(balance, int) or isinstance(balance, bool):
        raise SnapshotError("snapshot provider answer: 'balance' must be an integer")
    if not isinstance(blocked, bool):
        raise SnapshotError("snapshot provider answer: 'is_blocked' must be a boolean")
    return Snapshot(balance=balance, is_blocked=blocked)
