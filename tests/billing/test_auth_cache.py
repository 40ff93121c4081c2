"""The remembered service-key matches (Authorization value -> service key) and the
regex-free canonical user id: the same answers as the full checks, and bounded."""

from __future__ import annotations

import hmac
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.billing import auth as auth_module
from proxy.billing.auth import SERVICE_MATCH_CACHE_SIZE, Authenticator
from proxy.billing.payer import CANONICAL_USER_RE, parse_user_id
from proxy.errors import ApiError
from tests.billing.test_auth import SERVICE_KEY, WILDCARD_KEY, api_error, auth_config, bearer


def _authenticator() -> Authenticator:
    return Authenticator(auth_config(), None, "p:")


def _matches(auth: Authenticator) -> auth_module._ServiceKeyMatches:
    return auth._service_matches


async def test_a_hit_gives_what_the_full_check_gives() -> None:
    auth = _authenticator()
    first = await auth.authenticate(bearer(WILDCARD_KEY, x_user_id="5", x_request_id="r1"))
    assert len(_matches(auth)) == 1
    second = await auth.authenticate(bearer(WILDCARD_KEY, x_user_id="5", x_request_id="r1"))
    assert second == first
    assert (second.user_id, second.principal) == (5, "ops")
    # The permission checks still run on a hit: the key's scenes, skip-charge.
    err = await api_error(auth.authenticate(bearer(SERVICE_KEY, x_billing_scene="chat")))
    assert err.status == 403
    await auth.authenticate(bearer(SERVICE_KEY, x_billing_scene="agent"))
    err = await api_error(auth.authenticate(bearer(WILDCARD_KEY, x_skip_charge="true")))
    assert err.status == 403


async def test_a_wrong_key_is_never_authenticated_through_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = _authenticator()
    await auth.authenticate(bearer(WILDCARD_KEY, x_user_id="5"))
    compared: list[int] = []
    real = hmac.compare_digest
    monkeypatch.setattr(
        auth_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b)
    )
    for wrong in [WILDCARD_KEY[:-1], WILDCARD_KEY + "x", WILDCARD_KEY.upper(), "sk-other"]:
        err = await api_error(auth.authenticate(bearer(wrong, x_user_id="5")))
        assert err.status == 401
    # A miss is checked against every configured key, in constant time, as before.
    assert len(compared) == 4 * 2
    assert len(_matches(auth)) == 1  # refused keys are not remembered
    # Another spelling of a right key is checked in full, then remembered too.
    ctx = await auth.authenticate(
        {"Authorization": f"bearer   {WILDCARD_KEY} ", "X-User-Id": "5"}  # type: ignore[arg-type]
    )
    assert ctx.principal == "ops" and len(_matches(auth)) == 2


async def test_refused_and_malformed_values_fill_nothing() -> None:
    auth = _authenticator()
    for i in range(3 * SERVICE_MATCH_CACHE_SIZE):
        await api_error(auth.authenticate(bearer(f"sk-guess-{i}")))
        await api_error(auth.authenticate({"Authorization": f"Basic {i}"}))  # type: ignore[arg-type]
    await api_error(auth.authenticate({}))  # type: ignore[arg-type]
    assert len(_matches(auth)) == 0


async def test_the_matches_are_bounded() -> None:
    auth = _authenticator()
    for i in range(3 * SERVICE_MATCH_CACHE_SIZE):
        spelling = "Bearer" + " " * (i + 1) + WILDCARD_KEY  # distinct values, same key
        ctx = await auth.authenticate({"Authorization": spelling})  # type: ignore[arg-type]
        assert ctx.principal == "ops"
        assert len(_matches(auth)) <= SERVICE_MATCH_CACHE_SIZE
    assert len(_matches(auth)) == SERVICE_MATCH_CACHE_SIZE
    matches = auth_module._ServiceKeyMatches(0)  # size 0: remembers nothing
    matches.put("Bearer x", auth_config().service_keys[0])
    assert len(matches) == 0 and matches.get("Bearer x") is None


def test_the_matches_never_show_a_value() -> None:
    matches = auth_module._ServiceKeyMatches()
    matches.put(f"Bearer {SERVICE_KEY}", auth_config().service_keys[0])
    assert SERVICE_KEY not in repr(matches) and SERVICE_KEY not in str(matches)


def _by_regex(raw: str) -> int | None:
    text = raw.strip(" \t")
    if not text:
        return 0
    if not CANONICAL_USER_RE.fullmatch(text):
        return None
    value = int(text)
    return value if 0 < value <= 2**63 - 1 else None


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=22),
        st.text(alphabet="0123456789 \t+-٣²", max_size=22),
        st.integers(0, 10**20).map(str),
    )
)
def test_user_id_rule_is_the_canonical_regex(raw: str) -> None:
    expected = _by_regex(raw)
    try:
        got: int | None = parse_user_id(raw)
    except ApiError:
        got = None
    assert got == expected
    assert re.ASCII & CANONICAL_USER_RE.flags
