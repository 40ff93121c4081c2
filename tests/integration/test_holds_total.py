"""The running total and expiry index of a user's holds (proxy/billing/reservations.py,
proxy/ledger/projection.py) against a real redis-server, as hypothesis invariants:
whatever the interleaving of reservations, settlements, the ledger's releases, expiry
and writes by something that does not keep the total (a hash deleted by hand, an
older proxy or ledger), every reservation sees exactly what walking the hash would
(the sum of the holds not yet expired at its moment), and the keys end in step."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.billing.reservations import _RESERVE_LUA, _SETTLE_LUA
from proxy.contract.redis_keys import RedisKeys, decode_hold, encode_snapshot
from proxy.ledger.projection import Projection
from tests.fixtures_redis import RedisServer

USER = 5


def ops(foreign: list[str]) -> st.SearchStrategy[list[tuple[str, int, Any]]]:
    return st.lists(
        st.one_of(
            st.tuples(
                st.just("reserve"), st.integers(1, 400), st.sampled_from([5, 20, 60, 60_000])
            ),
            st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 500)),
            st.tuples(st.just("release"), st.integers(0, 50), st.integers(1, 3)),
            st.tuples(st.just("sleep"), st.integers(0, 40), st.just(0)),
            st.tuples(st.just("foreign"), st.integers(0, 50), st.sampled_from(foreign)),
        ),
        max_size=40,
    )


# Foreign writes a reservation notices (the hash and the index differ in size): a
# hash deleted by hand, an older ledger deleting holds, an older proxy adding them.
# (Both of the latter between two reservations can leave the sizes equal: that drift
# lasts until a due index entry misses its hold, or the 1-in-1024 audit.)
programs = st.one_of(ops(["del", "hdel"]), ops(["hset"]))


async def _hash(client: Any, keys: RedisKeys) -> dict[str, tuple[int, int]]:
    raw = await client.hgetall(keys.holds(USER))
    out = {}
    for k, v in raw.items():
        hold = decode_hold(v)
        assert hold is not None
        out[k.decode()] = hold
    return out


async def _now_ms(client: Any) -> int:
    s, us = await client.time()
    return int(s) * 1000 + int(us) // 1000


async def _in_step(client: Any, keys: RedisKeys) -> None:
    """What every script that keeps the keys leaves: the index holds exactly the
    hash's fields at their expiry, the total is their sum, the keys expire together
    and not before their holds. Read in one MULTI: one moment of Redis."""
    h, s, x = keys.hold_keys(USER)
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(h).zrange(x, 0, -1, withscores=True).get(s)
        pipe.pexpiretime(h).pexpiretime(s).pexpiretime(x)
        raw, index_raw, total, *expire_at = await pipe.execute()
    fields = {k.decode(): decode_hold(v) for k, v in raw.items()}
    index = {k.decode(): int(v) for k, v in index_raw}
    assert index == {rid: hold[1] for rid, hold in fields.items() if hold is not None}
    if fields:
        assert total is not None and float(total) == sum(c for c, _ in fields.values())  # type: ignore[misc]
        assert len(set(expire_at)) == 1
        assert expire_at[0] == -1 or expire_at[0] >= max(e for _, e in fields.values())  # type: ignore[misc]


async def _program(url: str, program: list[tuple[str, int, Any]]) -> None:
    client = aioredis.Redis.from_url(url)
    keys = RedisKeys(f"test:{uuid.uuid4().hex[:12]}:")
    reserve = client.register_script(_RESERVE_LUA)
    settle = client.register_script(_SETTLE_LUA)
    projection = Projection(client, keys.prefix)
    rkeys = [keys.snapshot(USER), keys.blocked(USER), *keys.hold_keys(USER)]
    await client.set(keys.snapshot(USER), encode_snapshot(5000))
    ids: list[str] = []
    foreign = False  # something that does not keep the total wrote since the last reserve
    try:
        for step, (op, a, b) in enumerate(program):
            if op == "reserve":
                rid = f"r{step}"
                before = await _hash(client, keys)
                t0 = await _now_ms(client)
                lasting = await client.pttl(keys.holds(USER)) > 50  # the keys outlive the call
                code, available, held, expired, take = (
                    int(x) for x in await reserve(keys=rkeys, args=[f"{a} 0 {b} 300 {rid}"])
                )
                t1 = await _now_ms(client)
                after = await _hash(client, keys)
                if take and not after:
                    continue  # the whole hash expired since (a ttl of a few ms): no check
                # Exactly what a walk would have seen at the script's moment.
                assert held + take == sum(c for c, _ in after.values())
                assert all(e > t0 for _, e in after.values())
                assert set(after) - {rid} <= set(before)
                assert all(after[r] == before[r] for r in after if r != rid)
                due = [r for r, (_, e) in before.items() if e <= t1]
                assert expired <= len(due)
                if lasting:  # a purged hold is counted (unless its whole hash expired)
                    assert len([r for r, (_, e) in before.items() if e <= t0]) <= expired
                assert code == (1 if available - held >= a else 0)
                if code == 1:
                    ids.append(rid)
                    assert take == a and after[rid][0] == a
                foreign = False
                await _in_step(client, keys)
            elif op == "settle" and ids:
                rid = ids[a % len(ids)]
                await settle(keys=list(keys.hold_keys(USER)), args=[f"{b} 60000 {rid}"])
            elif op == "release" and ids:
                chosen = [ids[(a + i) % len(ids)] for i in range(b)]
                await projection.write([(USER, 5000)], {USER: chosen})
            elif op == "sleep":
                await asyncio.sleep(a / 1000)
            elif op == "foreign":
                foreign = True
                if b == "del":
                    await client.delete(keys.holds(USER))
                elif b == "hset":  # an older proxy's reservation
                    expires = int(time.time() * 1000) + 60_000
                    await client.hset(keys.holds(USER), f"old{step}", f"{a + 1}:{expires}")
                    if await client.pttl(keys.holds(USER)) < 60_000:
                        await client.pexpire(keys.holds(USER), 60_000)
                elif ids:  # an older ledger's release
                    await client.hdel(keys.holds(USER), ids[a % len(ids)])
            if not foreign:
                await _in_step(client, keys)
    finally:
        await client.delete(*rkeys)
        await client.aclose()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=programs)
def test_the_holds_total_is_what_a_walk_would_sum(
    redis_server: RedisServer, program: list[tuple[str, int, Any]]
) -> None:
    asyncio.run(_program(redis_server.url, program))
