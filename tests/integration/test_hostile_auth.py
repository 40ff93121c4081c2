"""Hostile callers against the real proxy (real redis-server for user keys): forged
`X-User-Id`, skip-charge without a service key, keys compared in constant time and
never logged. Every refusal is checked to cost nothing: no upstream call, no charge.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import textwrap
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict

from proxy.ledger.apikeys import ApiKeyStore
from tests.fixtures_proxy import (
    SERVICE_KEY,
    ProxyHarness,
    RecordingObserver,
    StartProxy,
    service_key_yaml,
)
from tests.fixtures_redis import RedisServer, fund

REQ = {"model": "smart", "messages": [{"role": "user", "content": "hi"}]}
OWNER = 55  # the user the user key belongs to
VICTIM = 56


async def post(
    h: ProxyHarness, headers: list[tuple[str, str]], body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST with headers given as pairs, so a name may repeat."""
    async with h.session.post(
        f"{h.url}/v1/chat/completions",
        data=orjson.dumps(body or REQ),
        headers=CIMultiDict([("Content-Type", "application/json"), *headers]),
    ) as resp:
        return resp.status, orjson.loads(await resp.read())


@pytest.fixture
async def user_key(redis_client: aioredis.Redis, redis_prefix: str) -> str:
    return (await ApiKeyStore(redis_client, prefix=redis_prefix).create(OWNER)).api_key


@pytest.fixture
async def proxy(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> tuple[ProxyHarness, RecordingObserver]:
    obs = RecordingObserver()
    h = await start_proxy(redis_url=redis_server.url, guard_prefix=redis_prefix, observer=obs)
    await fund(redis_client, redis_prefix, OWNER, VICTIM, 42)
    return h, obs


async def charged_users(h: ProxyHarness, obs: RecordingObserver) -> list[int]:
    await h.flush_events()
    return [e["user_id"] for e in h.sink_events()]


# Values a user-key holder might put in X-User-Id to bill someone else.
FORGED_USER_IDS = [
    str(VICTIM),
    f" {VICTIM} ",
    f"0{VICTIM}",
    "0",
    "-55",
    f"{OWNER},{VICTIM}",
    f"{OWNER} {VICTIM}",
    f"{VICTIM}.0",
    "1e2",
    "0x37",  # 55 in hex
    str(2**63),
    "\u0665\u0665",  # Arabic-Indic digits for 55
]


async def test_forged_user_id_with_a_user_key_never_bills_another_user(
    proxy: tuple[ProxyHarness, RecordingObserver], user_key: str
) -> None:
    h, obs = proxy
    auth = ("Authorization", f"Bearer {user_key}")
    for forged in FORGED_USER_IDS:
        status, body = await post(h, [auth, ("X-User-Id", forged)])
        assert status in (400, 403), (forged, status, body)
        assert body["error"]["param"] == "X-User-Id"
    # Naming yourself is allowed (and changes nothing).
    assert (await post(h, [auth, ("X-User-Id", str(OWNER))]))[0] == 200
    # ... but only in the canonical form: the header follows the body's rule (issue 16).
    status, body = await post(h, [auth, ("X-User-Id", f"0{OWNER}")])
    assert (status, body["error"]["code"]) == (400, "invalid_user")
    # A repeated header: the first one counts, and it must be the key's own user.
    status, _ = await post(h, [auth, ("X-User-Id", str(VICTIM)), ("X-User-Id", str(OWNER))])
    assert status == 403
    assert (await post(h, [auth, ("X-User-Id", str(OWNER)), ("X-User-Id", str(VICTIM))]))[0] == 200
    # The body's `user` field names nobody when a user key is used.
    assert (await post(h, [auth], {**REQ, "user": str(VICTIM)}))[0] == 200
    assert len(h.recorder.requests) == 3
    assert await charged_users(h, obs) == [OWNER] * 3


@pytest.mark.parametrize("value", ["true", "TRUE", " yes ", "1", "on", "maybe"])
async def test_skip_charge_needs_a_service_key(
    proxy: tuple[ProxyHarness, RecordingObserver], user_key: str, value: str
) -> None:
    h, obs = proxy
    status, body = await post(
        h, [("Authorization", f"Bearer {user_key}"), ("X-Skip-Charge", value)]
    )
    # "on" and "maybe" are not booleans at all (400); the others are refused (403).
    assert (status, body["error"]["param"]) == (
        400 if value in ("on", "maybe") else 403,
        "X-Skip-Charge",
    )
    for headers in (
        [("X-Skip-Charge", value), ("X-User-Id", str(VICTIM))],  # no key at all
        [("Authorization", "Bearer sk-guessed"), ("X-Skip-Charge", value)],
        [("Authorization", f"Bearer {SERVICE_KEY[:-1]}"), ("X-Skip-Charge", value)],
    ):
        status, body = await post(h, headers)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert h.recorder.requests == []
    assert await charged_users(h, obs) == []


async def test_false_skip_charge_from_a_user_key_is_harmless(
    proxy: tuple[ProxyHarness, RecordingObserver], user_key: str
) -> None:
    h, obs = proxy
    status, _ = await post(h, [("Authorization", f"Bearer {user_key}"), ("X-Skip-Charge", "false")])
    assert status == 200
    assert await charged_users(h, obs) == [OWNER]


async def test_without_a_key_nothing_is_served_whatever_the_headers_say(
    proxy: tuple[ProxyHarness, RecordingObserver],
) -> None:
    h, obs = proxy
    attempts = [
        [("X-User-Id", "7")],
        [("Authorization", "Basic dXNlcjpwYXNz"), ("X-User-Id", "7")],
        [("Authorization", "Bearer"), ("X-User-Id", "7")],
        [("Authorization", f"Bearer {SERVICE_KEY} extra")],
        [("Authorization", f"Bearer {SERVICE_KEY.upper()}")],
        [("Authorization", "Bearer " + "k" * 600)],
        [("Authorization", f"Bearer {hashlib.sha256(SERVICE_KEY.encode()).hexdigest()}")],
    ]
    for headers in attempts:
        status, body = await post(h, headers)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key"), headers
    assert h.recorder.requests == []
    assert await charged_users(h, obs) == []


async def test_user_key_lookup_fails_closed_when_redis_is_down(
    proxy: tuple[ProxyHarness, RecordingObserver], user_key: str, redis_server: RedisServer
) -> None:
    """Unlike the guard (fail-open), not knowing whom to charge refuses the request."""
    h, obs = proxy
    redis_server.stop()
    try:
        status, body = await post(h, [("Authorization", f"Bearer {user_key}")])
        assert (status, body["error"]["code"]) == (503, "auth_unavailable")
        # Service keys need no Redis and keep working (the guard fails open).
        status, _ = await post(h, [("Authorization", f"Bearer {SERVICE_KEY}"), ("X-User-Id", "7")])
        assert status == 200
    finally:
        redis_server.ensure_up()
    assert await charged_users(h, obs) == [7]


MULTI_KEYS = ["sk-first-service-key", "sk-second-service-key", "sk-third-service-key"]


def multi_key_yaml() -> str:
    entries = "".join(
        f"""
            - name: svc{i}
              sha256: "{hashlib.sha256(key.encode()).hexdigest()}"
              scenes: ["*"]"""
        for i, key in enumerate(MULTI_KEYS)
    )
    return (
        textwrap.dedent(
            """
        auth:
          mode: keys
          service_keys:"""
        )
        + textwrap.indent(textwrap.dedent(entries), "  ")
        + "\n"
    )


async def test_service_keys_are_compared_in_constant_time_against_every_entry(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing safety, checked structurally (timing itself is for benchmarks): the
    presented key is hashed and its digest compared with `hmac.compare_digest`
    against every configured key, matching or not, first or last; the key itself is
    never compared."""
    h = await start_proxy(auth_yaml=multi_key_yaml())
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    configured = {hashlib.sha256(k.encode()).digest() for k in MULTI_KEYS}
    for key in [*MULTI_KEYS, "sk-unknown-key", MULTI_KEYS[0][:-1]]:
        compared.clear()
        status, _ = await post(h, [("Authorization", f"Bearer {key}"), ("X-User-Id", "7")])
        assert status == (200 if key in MULTI_KEYS else 401)
        presented = hashlib.sha256(key.encode()).digest()
        assert len(compared) == len(MULTI_KEYS), key
        assert {a for a, _ in compared} == {presented}
        assert {b for _, b in compared} == configured


async def test_keys_never_appear_in_logs_or_answers(
    proxy: tuple[ProxyHarness, RecordingObserver],
    user_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h, _ = proxy
    secrets = [user_key, SERVICE_KEY, "sk-guessed-secret-value", user_key + "x"]
    answers = []
    with caplog.at_level(logging.DEBUG):
        for key in secrets:
            for extra in ([], [("X-User-Id", str(VICTIM))], [("X-Skip-Charge", "true")]):
                _, body = await post(h, [("Authorization", f"Bearer {key}"), *extra])
                answers.append(orjson.dumps(body).decode())
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in secrets:
        assert secret not in logged
        assert all(secret not in a for a in answers)
    # Nor does any key reach the upstream: it gets the provider's own key only.
    assert all(s not in str(r["headers"]) for r in h.recorder.requests for s in secrets)


# -- a service key's payer forms and skip-charge permission (issue 16) ----------------------

NON_CANONICAL = ["042", "+42", "42.0", "\u0664\u0662", "0", "", " ", "alice", "4\u200b2"]


@pytest.mark.parametrize("value", NON_CANONICAL)
async def test_service_key_non_canonical_body_user_is_400_and_free_of_nothing(
    proxy: tuple[ProxyHarness, RecordingObserver], value: str
) -> None:
    h, obs = proxy
    svc = ("Authorization", f"Bearer {SERVICE_KEY}")
    status, body = await post(h, [svc], {**REQ, "user": value})
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_user", "user")
    assert h.recorder.requests == []  # refused before the upstream: nothing consumed
    # The canonical form bills that user; the header and the body agree on it.
    assert (await post(h, [svc], {**REQ, "user": "42"}))[0] == 200
    assert (await post(h, [svc, ("X-User-Id", "42")]))[0] == 200
    assert await charged_users(h, obs) == [42, 42]


@pytest.mark.parametrize("value", [v for v in NON_CANONICAL if v.strip()])
async def test_service_key_non_canonical_header_user_is_400(
    proxy: tuple[ProxyHarness, RecordingObserver], value: str
) -> None:
    h, obs = proxy
    # Header values travel as UTF-8 bytes; aiohttp hands the proxy the same text.
    headers = [("Authorization", f"Bearer {SERVICE_KEY}"), ("X-User-Id", value)]
    status, body = await post(h, headers)
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        400,
        "invalid_user",
        "X-User-Id",
    )
    assert h.recorder.requests == []
    assert await charged_users(h, obs) == []


async def test_skip_charge_is_a_permission_of_its_own(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(
        auth_yaml=service_key_yaml(may_skip_charge=False),
        redis_url=redis_server.url,
        guard_prefix=redis_prefix,
        observer=obs,
    )
    await fund(redis_client, redis_prefix, 42)
    svc = ("Authorization", f"Bearer {SERVICE_KEY}")
    status, body = await post(h, [svc, ("X-User-Id", "42"), ("X-Skip-Charge", "true")])
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        403,
        "permission_denied",
        "X-Skip-Charge",
    )
    assert h.recorder.requests == []
    assert (await post(h, [svc, ("X-User-Id", "42"), ("X-Skip-Charge", "false")]))[0] == 200
    assert await charged_users(h, obs) == [42]
