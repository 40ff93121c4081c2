"""BillingContext normalisation, auth config parsing and the Authenticator.

User-key cases run against the session's real redis-server; outages of that
server are in tests/integration/test_guard_redis.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re

import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.billing.auth import Authenticator
from proxy.billing.payer import BillingContext
from proxy.config import AuthConfig, AuthMode
from proxy.config.load import parse_auth
from proxy.contract.redis_keys import key_sha256 as hash_key
from proxy.errors import ApiError, ConfigError
from tests.fixtures_redis import free_port

SERVICE_KEY = "sk-svc-agent-0123456789"
WILDCARD_KEY = "sk-svc-ops-abcdef"
USER_KEY = "sk-user-42-secret"
USER_ID = 42


def headers(**values: str) -> CIMultiDictProxy[str]:
    """aiohttp-style case-insensitive headers; `x_user_id` -> `X-User-Id`."""
    names = {k: "-".join(part.capitalize() for part in k.split("_")) for k in values}
    return CIMultiDictProxy(CIMultiDict({names[k]: v for k, v in values.items()}))


def bearer(key: str, **values: str) -> CIMultiDictProxy[str]:
    return headers(authorization=f"Bearer {key}", **values)


def auth_config(**overrides: object) -> AuthConfig:
    raw = {
        "service_keys": [
            {
                "name": "agent-service",
                "sha256": hash_key(SERVICE_KEY),
                "scenes": ["agent", "Memory"],
                "may_skip_charge": True,
            },
            {"name": "ops", "sha256": hash_key(WILDCARD_KEY), "scenes": ["*"]},
        ],
        **overrides,
    }
    return parse_auth(raw, "auth")


async def api_error(coro: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        await coro  # type: ignore[misc]
    return info.value


# -- BillingContext ----------------------------------------------------------------------


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()


def test_normalize_defaults() -> None:
    ctx = BillingContext.normalize()
    assert (ctx.user_id, ctx.scene, ctx.conversation_id, ctx.skip_charge) == (
        0,
        "unknown",
        None,
        False,
    )
    assert ctx.principal == "anonymous"
    assert re.fullmatch(r"[0-9a-f]{32}", ctx.request_id)
    assert BillingContext.normalize().request_id != ctx.request_id


def test_normalize_trims_and_lowercases() -> None:
    ctx = BillingContext.normalize(
        user_id=" 17 ",
        scene="  Agent ",
        request_id="  req-1 ",
        conversation_id=" conv-9 ",
        skip_charge=" YES ",
        principal="agent-service",
    )
    assert ctx == BillingContext(17, "agent", "req-1", "conv-9", True, "agent-service")


@pytest.mark.parametrize("bad", ["x" * 129, "caf\u00e9", "a b", "tab\there", "   "])
def test_unusable_request_id_is_replaced(bad: str) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", BillingContext.normalize(request_id=bad).request_id)


@pytest.mark.parametrize(
    "bad", ["abc", "-1", "0", "1.5", "99999999999999999999", True, "042", "+5", "\u0665"]
)
def test_bad_user_id_is_400(bad: str | bool) -> None:
    with pytest.raises(ApiError) as info:
        BillingContext.normalize(user_id=bad)
    assert (info.value.status, info.value.param) == (400, "X-User-Id")


def test_bad_scene_skip_and_conversation_are_400() -> None:
    for kwargs, param in (
        ({"scene": "bad scene"}, "X-Billing-Scene"),
        ({"scene": "x" * 65}, "X-Billing-Scene"),
        ({"skip_charge": "maybe"}, "X-Skip-Charge"),
        ({"conversation_id": "c" * 257}, "X-Conversation-Id"),
    ):
        with pytest.raises(ApiError) as info:
            BillingContext.normalize(**kwargs)  # type: ignore[arg-type]
        assert (info.value.status, info.value.param) == (400, param)


# -- AuthConfig ---------------------------------------------------------------------------


def test_auth_config_defaults_when_absent() -> None:
    c = parse_auth(None)
    assert (c.mode, c.service_keys, c.user_key_cache_ttl_s) == (AuthMode.KEYS, (), 30)


def test_auth_config_reads_service_keys() -> None:
    c = auth_config(user_key_cache_ttl_s=10, mode="keys")
    assert c.user_key_cache_ttl_s == 10
    agent, ops = c.service_keys
    assert agent.name == "agent-service"
    assert agent.sha256 == hashlib.sha256(SERVICE_KEY.encode()).digest()
    assert agent.scenes == {"agent", "memory"}
    assert agent.allows("memory") and not agent.allows("chat")
    assert ops.allows("anything")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mode": "open"}, "auth.mode: must be 'keys' or 'none', got 'open'"),
        ({"user_key_cache_ttl_s": -1}, "auth.user_key_cache_ttl_s: must be a non-negative"),
        ({"service_keys": {}}, "auth.service_keys: must be a list"),
        ({"service_keys": [{"name": "a", "sha256": "abc", "scenes": ["x"]}]}, "[0].sha256"),
        ({"service_keys": [{"name": "", "sha256": "a" * 64, "scenes": ["x"]}]}, "[0].name"),
        ({"service_keys": [{"name": "a", "sha256": "a" * 64, "scenes": []}]}, "[0].scenes"),
        ({"service_keys": [{"name": "a", "sha256": "a" * 64, "scenes": ["a b"]}]}, "scenes[0]"),
        ({"service_keys": [{"name": "a", "sha256": "a" * 64, "scenes": ["x"], "key": 1}]}, ".key"),
        (
            {
                "service_keys": [
                    {"name": "a", "sha256": "a" * 64, "scenes": ["x"]},
                    {"name": "b", "sha256": "A" * 64, "scenes": ["x"]},
                ]
            },
            "auth.service_keys[1].sha256: same key as 'a'",
        ),
        ({"cache_ttl": 5}, "auth.cache_ttl: unknown key"),
    ],
)
def test_auth_config_errors_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_auth(raw, "auth")
    assert message in str(info.value)


# -- service keys -------------------------------------------------------------------------


async def test_service_key_acts_for_user() -> None:
    auth = Authenticator(auth_config(), None, "p:")
    ctx = await auth.authenticate(
        bearer(
            SERVICE_KEY,
            x_user_id="7",
            x_billing_scene="Memory",
            x_request_id="r-1",
            x_conversation_id="c-1",
            x_skip_charge="1",
        ),
        body_user=None,
    )
    assert ctx == BillingContext(7, "memory", "r-1", "c-1", True, "agent-service")


async def test_service_key_forbidden_scene_is_403() -> None:
    auth = Authenticator(auth_config(), None, "p:")
    err = await api_error(auth.authenticate(bearer(SERVICE_KEY, x_billing_scene="chat"), None))
    assert (err.status, err.code, err.param) == (403, "permission_denied", "X-Billing-Scene")
    # No scene header means "unknown", which this key may not bill either.
    err = await api_error(auth.authenticate(bearer(SERVICE_KEY, x_user_id="7"), None))
    assert err.status == 403 and "agent" in err.message


async def test_wildcard_service_key_any_scene() -> None:
    auth = Authenticator(auth_config(), None, "p:")
    ctx = await auth.authenticate(bearer(WILDCARD_KEY, x_billing_scene="chat"), None)
    assert (ctx.scene, ctx.principal, ctx.user_id) == ("chat", "ops", 0)


async def test_user_from_header_over_body() -> None:
    auth = Authenticator(auth_config(), None, "p:")
    by_header = await auth.authenticate(bearer(WILDCARD_KEY, x_user_id="5"), body_user="6")
    by_body = await auth.authenticate(bearer(WILDCARD_KEY), body_user=" 6 ")
    nobody = await auth.authenticate(bearer(WILDCARD_KEY), body_user=None)
    assert (by_header.user_id, by_body.user_id, nobody.user_id) == (5, 6, 0)


# Forms one reader could take for 42 and another for "nobody": each is refused.
NON_CANONICAL_USERS = [
    "042",
    "+42",
    "-42",
    "42.0",
    "4e1",
    "0x2a",
    "\u0664\u0662",  # Arabic-Indic 42
    "\uff14\uff12",  # full-width 42
    "42\u00a0",  # trailing no-break space
    "0",
    "00",
    str(2**63),
    "alice@example.com",
    "",
]


@pytest.mark.parametrize("value", NON_CANONICAL_USERS)
async def test_non_canonical_body_user_is_invalid_user(value: str) -> None:
    auth = Authenticator(auth_config(), None, "p:")
    err = await api_error(auth.authenticate(bearer(WILDCARD_KEY), body_user=value))
    assert (err.status, err.code, err.param) == (400, "invalid_user", "user")


@pytest.mark.parametrize("value", [v for v in NON_CANONICAL_USERS if v.strip()])
async def test_non_canonical_header_user_is_invalid_user(value: str) -> None:
    auth = Authenticator(auth_config(), None, "p:")
    err = await api_error(auth.authenticate(bearer(WILDCARD_KEY, x_user_id=value), None))
    assert (err.status, err.code, err.param) == (400, "invalid_user", "X-User-Id")


@pytest.mark.parametrize("value", ["1", "42", str(2**63 - 1)])
async def test_canonical_ids_bill_that_user_from_header_and_body(value: str) -> None:
    auth = Authenticator(auth_config(), None, "p:")
    by_header = await auth.authenticate(bearer(WILDCARD_KEY, x_user_id=value), None)
    by_body = await auth.authenticate(bearer(WILDCARD_KEY), body_user=value)
    assert by_header.user_id == by_body.user_id == int(value)


async def test_skip_charge_needs_may_skip_charge() -> None:
    auth = Authenticator(auth_config(), None, "p:")
    err = await api_error(
        auth.authenticate(bearer(WILDCARD_KEY, x_user_id="7", x_skip_charge="true"), None)
    )
    assert (err.status, err.code, err.param) == (403, "permission_denied", "X-Skip-Charge")
    # Saying "false" asks for nothing and is fine for any key.
    ctx = await auth.authenticate(bearer(WILDCARD_KEY, x_user_id="7", x_skip_charge="0"), None)
    assert (ctx.user_id, ctx.skip_charge) == (7, False)
    allowed = await auth.authenticate(
        bearer(SERVICE_KEY, x_user_id="7", x_billing_scene="agent", x_skip_charge="1"), None
    )
    assert allowed.skip_charge is True


def test_may_skip_charge_defaults_false_and_must_be_a_boolean() -> None:
    ops = auth_config().service_keys[1]
    assert ops.may_skip_charge is False
    raw = {"service_keys": [{"name": "a", "sha256": "a" * 64, "scenes": ["x"]}]}
    raw["service_keys"][0]["may_skip_charge"] = "yes"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"\[0\]\.may_skip_charge: must be true or false"):
        parse_auth(raw, "auth")


async def test_service_key_bad_user_header_is_400() -> None:
    auth = Authenticator(auth_config(), None, "p:")
    err = await api_error(auth.authenticate(bearer(WILDCARD_KEY, x_user_id="bob"), None))
    assert (err.status, err.param) == (400, "X-User-Id")


# -- rejected credentials -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwdw==", "Bearer a b", "Bearer " + "k" * 600],
)
async def test_missing_or_malformed_authorization_is_401(value: str | None) -> None:
    auth = Authenticator(auth_config(), None, "p:")
    hdrs = headers() if value is None else headers(authorization=value)
    err = await api_error(auth.authenticate(hdrs, None))
    assert (err.status, err.code) == (401, "invalid_api_key")
    assert err.type in ("invalid_request_error", "authentication_error")
    assert err.headers is not None and err.headers["WWW-Authenticate"].startswith("Bearer")


async def test_unknown_key_is_401(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    for redis in (None, redis_client):
        auth = Authenticator(auth_config(), redis, redis_prefix)
        err = await api_error(auth.authenticate(bearer("sk-nope"), None))
        assert (err.status, err.code) == (401, "invalid_api_key")
        assert err.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}


async def test_keys_never_logged(
    caplog: pytest.LogCaptureFixture, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    await redis_client.set(f"{redis_prefix}apikey:{hash_key(USER_KEY)}", b"not-a-number")
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    try:
        with caplog.at_level(logging.DEBUG):
            for redis in (redis_client, dead):
                auth = Authenticator(auth_config(), redis, redis_prefix)
                auth.log_startup()
                for key in (USER_KEY, SERVICE_KEY, "sk-unknown-zzz"):
                    with contextlib.suppress(ApiError):
                        await auth.authenticate(bearer(key, x_billing_scene="chat"), None)
    finally:
        await dead.aclose()
    assert caplog.records, "expected the malformed record and the outage to be logged"
    for secret in (USER_KEY, SERVICE_KEY, "sk-unknown", "sk-", hash_key(USER_KEY)[:16]):
        assert secret not in caplog.text


# -- user keys (real Redis) -----------------------------------------------------------------


@pytest.fixture
async def user_auth(redis_client: aioredis.Redis, redis_prefix: str) -> Authenticator:
    await redis_client.set(f"{redis_prefix}apikey:{hash_key(USER_KEY)}", str(USER_ID))
    return Authenticator(auth_config(), redis_client, redis_prefix)


async def test_user_key_bills_its_user(user_auth: Authenticator) -> None:
    ctx = await user_auth.authenticate(
        bearer(USER_KEY, x_billing_scene="Chat", x_user_id=str(USER_ID)), body_user="999"
    )
    assert (ctx.user_id, ctx.scene, ctx.principal, ctx.skip_charge) == (
        USER_ID,
        "chat",
        "user",
        False,
    )
    plain = await user_auth.authenticate(bearer(USER_KEY), None)
    assert (plain.user_id, plain.scene) == (USER_ID, "unknown")


async def test_user_key_cannot_act_for_another_user(user_auth: Authenticator) -> None:
    err = await api_error(user_auth.authenticate(bearer(USER_KEY, x_user_id="43"), None))
    assert (err.status, err.code, err.param) == (403, "permission_denied", "X-User-Id")


async def test_user_key_cannot_skip_charge(user_auth: Authenticator) -> None:
    err = await api_error(user_auth.authenticate(bearer(USER_KEY, x_skip_charge="true"), None))
    assert (err.status, err.code) == (403, "permission_denied")
    ctx = await user_auth.authenticate(bearer(USER_KEY, x_skip_charge="false"), None)
    assert ctx.skip_charge is False


async def test_user_key_cache_ttl_and_revocation(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    now = [1000.0]
    auth = Authenticator(
        auth_config(user_key_cache_ttl_s=30, user_key_negative_ttl_s=5),
        redis_client,
        redis_prefix,
        clock=lambda: now[0],
    )
    record = f"{redis_prefix}apikey:{hash_key(USER_KEY)}"
    await redis_client.set(record, b"42")
    assert (await auth.authenticate(bearer(USER_KEY), None)).user_id == 42
    await redis_client.delete(record)  # revoked
    now[0] += 29
    assert (await auth.authenticate(bearer(USER_KEY), None)).user_id == 42  # still cached
    now[0] += 2
    err = await api_error(auth.authenticate(bearer(USER_KEY), None))
    assert err.status == 401
    # The refusal is cached briefly: re-creating the key takes effect after the negative TTL.
    await redis_client.set(record, b"42")
    now[0] += 4
    assert (await api_error(auth.authenticate(bearer(USER_KEY), None))).status == 401
    now[0] += 2
    assert (await auth.authenticate(bearer(USER_KEY), None)).user_id == 42


async def test_lookups_are_cached_and_coalesced(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    await redis_client.set(f"{redis_prefix}apikey:{hash_key(USER_KEY)}", b"42")
    auth = Authenticator(auth_config(), redis_client, redis_prefix)

    async def gets() -> int:
        stats = await redis_client.info("commandstats")
        return int(stats.get("cmdstat_get", {}).get("calls", 0))

    before = await gets()
    results = await asyncio.gather(
        *(auth.authenticate(bearer(USER_KEY), None) for _ in range(20)),
        *(auth.authenticate(bearer("sk-bad"), None) for _ in range(20)),
        return_exceptions=True,
    )
    for _ in range(5):  # sequential repeats hit the cache, good and bad keys alike
        await auth.authenticate(bearer(USER_KEY), None)
        await asyncio.gather(auth.authenticate(bearer("sk-bad"), None), return_exceptions=True)
    assert await gets() - before == 2
    assert [r.user_id for r in results[:20]] == [42] * 20  # type: ignore[union-attr]
    assert all(isinstance(r, ApiError) and r.status == 401 for r in results[20:])


async def test_user_key_redis_down_is_503() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    try:
        auth = Authenticator(auth_config(), dead, "p:")
        err = await api_error(auth.authenticate(bearer(USER_KEY), None))
        assert (err.status, err.code) == (503, "auth_unavailable")
        # Service keys never need Redis.
        ctx = await auth.authenticate(bearer(WILDCARD_KEY), None)
        assert ctx.principal == "ops"
    finally:
        await dead.aclose()


# -- mode none ----------------------------------------------------------------------------


async def test_mode_none_trusts_headers(caplog: pytest.LogCaptureFixture) -> None:
    auth = Authenticator(parse_auth({"mode": "none"}), None, "p:")
    with caplog.at_level(logging.INFO):
        auth.log_startup()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "mode=none" in caplog.text
    ctx = await auth.authenticate(
        headers(x_user_id="9", x_billing_scene="anything", x_skip_charge="yes"), None
    )
    assert (ctx.user_id, ctx.scene, ctx.skip_charge, ctx.principal) == (
        9,
        "anything",
        True,
        "anonymous",
    )
    # Any Authorization header is ignored, and bad values are still refused.
    ctx = await auth.authenticate(headers(authorization="Bearer whatever"), body_user="3")
    assert ctx.user_id == 3
    assert (await api_error(auth.authenticate(headers(x_user_id="-2"), None))).status == 400


def test_describe_names_keys_not_hashes() -> None:
    text = Authenticator(auth_config(), None, "p:").describe()
    assert "agent-service" in text and "ops" in text
    assert hash_key(SERVICE_KEY)[:8] not in text
