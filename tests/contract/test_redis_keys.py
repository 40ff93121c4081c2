"""The Redis key layout and the snapshot codec shared by the proxy and the ledger."""

from __future__ import annotations

import hashlib
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.contract.redis_keys import (
    DEFAULT_PREFIX,
    RedisKeys,
    decode_hold,
    decode_snapshot,
    encode_hold,
    encode_snapshot,
    key_digest,
    key_sha256,
    live_held,
)

ISO_MS_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


def test_default_key_names() -> None:
    k = RedisKeys()
    assert k.prefix == DEFAULT_PREFIX == "llmproxy:"
    # The user id is a hash tag: one user's keys share a Redis Cluster slot.
    assert k.blocked(7) == "llmproxy:credit:{7}:blocked"
    assert k.snapshot(7) == "llmproxy:credit:{7}:snapshot"
    assert k.blocked(7).startswith(k.credit_prefix)
    assert k.apikey("ab" * 32) == f"llmproxy:apikey:{'ab' * 32}"
    assert k.apikeys_of(7) == "llmproxy:apikeys:user:7"


def test_prefix_is_used_as_given() -> None:
    k = RedisKeys("tenant-a:")
    assert k.blocked(42) == "tenant-a:credit:{42}:blocked"


def test_key_sha256_is_the_hashlib_hex_digest() -> None:
    for key in ("sk-abc", "", "ключ-🔑", "x" * 512):
        expected = hashlib.sha256(key.encode("utf-8")).hexdigest()
        assert key_sha256(key) == expected
        assert key_digest(key) == bytes.fromhex(expected)
        assert len(key_digest(key)) == 32


@given(st.text())
def test_key_sha256_matches_hashlib_for_any_text(key: str) -> None:
    assert key_sha256(key) == hashlib.sha256(key.encode("utf-8")).hexdigest()


def test_encode_snapshot_shape() -> None:
    raw = encode_snapshot(1500, "2024-05-01T12:00:00.123Z")
    assert raw == b'{"available_credit":1500,"updated_at":"2024-05-01T12:00:00.123Z"}'


def test_encode_snapshot_stamps_the_current_time() -> None:
    data = orjson.loads(encode_snapshot(3))
    assert set(data) == {"available_credit", "updated_at"}
    assert ISO_MS_Z.fullmatch(data["updated_at"])


@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_snapshot_round_trip(credit: int) -> None:
    assert decode_snapshot(encode_snapshot(credit, "2024-01-01T00:00:00.000Z")) == credit


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1]",
        b"12",
        b"{}",
        b'{"available_credit": null}',
        b'{"available_credit": "lots"}',
        b'{"available_credit": true}',
        b'{"balance": 100}',
    ],
)
def test_decode_snapshot_of_anything_else_is_none(raw: bytes) -> None:
    assert decode_snapshot(raw) is None


def test_decode_snapshot_ignores_updated_at() -> None:
    assert decode_snapshot(b'{"available_credit": -5}') == -5
    assert decode_snapshot(b'{"available_credit": 5, "updated_at": 3, "x": 1}') == 5


def test_hold_codec_round_trips_and_rejects_garbage() -> None:
    assert decode_hold(encode_hold(1500, 1_700_000_000_000)) == (1500, 1_700_000_000_000)
    for bad in (b"", b"12", b"-1:5", b"1:x", b"a:b", b"1.5:3"):
        assert decode_hold(bad) is None


def test_live_held_counts_only_unexpired_readable_holds() -> None:
    values = [encode_hold(100, 2_000), encode_hold(50, 1_000), b"junk", encode_hold(7, 1_001)]
    assert live_held(values, now_ms=1_000) == 107
    assert live_held(values, now_ms=2_000) == 0
    assert RedisKeys("p:").holds(9) == "p:holds:{9}"


def test_holds_share_the_users_slot_but_not_the_tracked_prefix() -> None:
    keys = RedisKeys("p:")
    # Same hash tag: one script may touch snapshot, blocked marker and holds on a cluster.
    assert "{9}" in keys.holds(9) and "{9}" in keys.snapshot(9)
    # Not under the guard cache's tracked prefix: a hold written twice a request must not
    # push an invalidation to every proxy.
    assert not keys.holds(9).startswith(keys.credit_prefix)
    assert keys.blocked(9).startswith(keys.credit_prefix)
