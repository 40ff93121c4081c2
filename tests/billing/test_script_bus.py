"""The script bus on a real redis-server: a batch past its deadline fails alone and
leaves the bus usable, a caller that left hands its reply to the orphan hook, a
connection the server dropped under a batch is retried once on a new one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from proxy.billing.redis_raw import PipeReset, pack
from proxy.billing.script_batcher import MAX_CALLS, BusCall, Call, ScriptBus
from tests.fixtures_redis import RedisServer


@pytest.fixture
async def bus(redis_client: aioredis.Redis) -> AsyncIterator[ScriptBus]:
    bus = ScriptBus(redis_client)
    try:
        yield bus
    finally:
        await bus.close(2.0)


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of its own, beside the bus's."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


SLOW = (
    "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6;"
    " while true do local n = redis.call('TIME'); if n[1] + n[2] / 1e6 - s > 0.3 then"
    " break end end; return 'slow'"
)


async def test_a_batch_past_its_deadline_fails_and_the_bus_goes_on(
    bus: ScriptBus, redis_prefix: str
) -> None:
    slow = bus.register(SLOW, 0.1)
    echo = bus.register("return ARGV[1]", 0.1)
    with pytest.raises(TimeoutError):
        await slow.call([f"{redis_prefix}k"], [])
    assert bus.pending == 0
    await asyncio.sleep(0.3)  # the slow script ends; its reply is never read as another's
    assert await echo.call([f"{redis_prefix}k"], ["after"]) == b"after"


async def test_calls_behind_an_overdue_reply_fail_and_are_not_sent_again(
    bus: ScriptBus, admin: aioredis.Redis, redis_prefix: str
) -> None:
    """The reset after an overdue reply fails what was queued behind it on that
    connection: Redis was slow, not gone, so those calls may have run; sending them
    again could run a reservation twice."""
    slow = bus.register(SLOW, 0.1)
    incr = bus.register("return redis.call('INCR', KEYS[1])", 0.1)
    key = f"{redis_prefix}n"
    first = slow.submit([f"{redis_prefix}k"], [])
    await asyncio.sleep(0.01)  # its own batch, then one behind it
    behind = incr.submit([key], [])
    with pytest.raises(TimeoutError):
        await first
    with pytest.raises(PipeReset):
        await behind
    await asyncio.sleep(0.35)  # the slow script has ended
    ran = int(await admin.get(key) or 0)
    assert ran <= 1  # Redis may have run it (or dropped it with the client): not twice
    assert await incr.call([key], []) == ran + 1  # a new connection


async def test_a_caller_that_left_hands_its_reply_to_the_orphan_hook(
    bus: ScriptBus, redis_prefix: str
) -> None:
    orphans: list[tuple[Call, Any]] = []
    incr = bus.register(
        "return redis.call('INCR', KEYS[1])", 5.0, lambda call, reply: orphans.append((call, reply))
    )
    key = f"{redis_prefix}n"
    task = asyncio.ensure_future(incr.call([key], []))
    await asyncio.sleep(0)
    task.cancel()
    kept = incr.submit([key], [])
    assert await kept == 2  # both ran, in order
    assert orphans == [(([key], []), 1)]


async def test_a_dropped_connection_under_a_batch_is_tried_once_more(
    bus: ScriptBus, admin: aioredis.Redis, redis_prefix: str
) -> None:
    echo = bus.register("return ARGV[1]", 5.0)
    assert await echo.call([f"{redis_prefix}k"], ["one"]) == b"one"
    assert bus._pipe is not None
    first = await bus._pipe.send(pack(["CLIENT", "ID"]))
    assert await admin.client_kill_filter(_id=first) == 1
    # Sent right away: on the dead connection (failed, then tried again on a new
    # one) or, if the reader saw the end first, on a new one at once.
    assert await echo.call([f"{redis_prefix}k"], ["two"]) == b"two"
    assert await bus._pipe.send(pack(["CLIENT", "ID"])) != first


async def test_calls_of_several_scripts_in_one_tick_are_one_command(
    bus: ScriptBus, admin: aioredis.Redis, redis_prefix: str
) -> None:
    a = bus.register("return {'a', ARGV[1]}", 5.0)
    b = bus.register("return {'b', KEYS[1], KEYS[2]}", 5.0)
    for script in bus.scripts:  # no NOSCRIPT round in the count
        await admin.script_load(script.script)
    before = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    got = await asyncio.gather(
        a.submit([f"{redis_prefix}k"], ["1"]),
        b.submit([f"{redis_prefix}x", f"{redis_prefix}y"], []),
        a.submit([f"{redis_prefix}k"], ["2"]),
    )
    after = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert got == [
        [b"a", b"1"],
        [b"b", f"{redis_prefix}x".encode(), f"{redis_prefix}y".encode()],
        [b"a", b"2"],
    ]
    assert after - before == 1


async def test_a_callers_budget_ends_its_wait_and_the_reply_goes_to_the_orphan_hook(
    bus: ScriptBus, redis_prefix: str
) -> None:
    """The budget is the caller's (the bus's own deadline is longer): TimeoutError
    once it passed, the connection kept, the reply handed to `on_orphan`."""
    orphans: list[Any] = []
    slow = bus.register(SLOW, 5.0, lambda call, reply: orphans.append(reply))
    echo = bus.register("return ARGV[1]", 5.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await slow.call([f"{redis_prefix}k"], [], budget_s=0.05)
    waited = loop.time() - started
    assert 0.05 <= waited < 0.25, waited  # the sweep may be up to budget/10 late
    assert orphans == []  # the script is still running
    assert await echo.call([f"{redis_prefix}k"], ["after"]) == b"after"  # queued behind it
    assert orphans == [b"slow"]  # same connection, in order: nothing was reset
    for n in range(3):  # later budgets are swept as well
        with pytest.raises(TimeoutError):
            await slow.call([f"{redis_prefix}k"], [], budget_s=0.02 * (n + 1))


async def test_aclose_returns_once_the_calls_in_flight_are_answered(
    bus: ScriptBus, redis_prefix: str
) -> None:
    echo = bus.register("return ARGV[1]", 5.0)
    loop = asyncio.get_running_loop()
    fut = echo.submit([f"{redis_prefix}k"], ["x"])
    started = loop.time()
    await bus.aclose(5.0)  # waits for the reply, not for its whole allowance
    assert fut.done() and fut.result() == b"x"
    assert loop.time() - started < 1.0


# A chain's scripts: the first counts its calls and answers with the code it is
# given; the second counts its own (an error when its key is not a number).
FIRST = "redis.call('INCR', KEYS[1]); return {tonumber(ARGV[1]), ARGV[2]}"
SECOND = "return {redis.call('INCR', KEYS[1]), ARGV[1]}"


async def test_a_chain_runs_the_second_script_only_when_the_first_says_so(
    bus: ScriptBus, admin: aioredis.Redis, redis_prefix: str
) -> None:
    first = bus.register(FIRST, 5.0)
    second = bus.register(SECOND, 5.0)
    chain = bus.chain(first, second, (1, 2))
    k1, k2 = f"{redis_prefix}{{u}}:a", f"{redis_prefix}{{u}}:b"
    for script in bus.scripts:  # no NOSCRIPT round in the count
        await admin.script_load(script.script)
    before = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    got = await asyncio.gather(
        *(
            chain.call([k1], [str(code), f"first {code}"], BusCall(second, [k2], [f"then {code}"]))
            for code in (0, 1, 2, 3)
        ),
        first.call([k1], ["7", "alone"]),
    )
    after = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert got == [
        ([0, b"first 0"], None),
        ([1, b"first 1"], [1, b"then 1"]),
        ([2, b"first 2"], [2, b"then 2"]),
        ([3, b"first 3"], None),
        [7, b"alone"],
    ]
    assert await admin.get(k1) == b"5" and await admin.get(k2) == b"2"
    assert after - before == 1  # the chains and the plain call: one command


async def test_a_chained_scripts_error_is_its_own_and_the_first_ones_writes_stand(
    bus: ScriptBus, admin: aioredis.Redis, redis_prefix: str
) -> None:
    first = bus.register(FIRST, 5.0)
    second = bus.register(SECOND, 5.0)
    chain = bus.chain(first, second, (1,))
    k1, k2 = f"{redis_prefix}{{u}}:a", f"{redis_prefix}{{u}}:b"
    await admin.hset(k2, "not", "a number")  # INCR fails: WRONGTYPE
    then = BusCall(second, [k2], ["x"])
    r1, r2 = await chain.call([k1], ["1", "kept"], then)
    assert r1 == [1, b"kept"]
    assert isinstance(r2, ResponseError) and "WRONGTYPE" in str(r2)
    assert await admin.get(k1) == b"1"
    # alone (one call in its batch, the chain's own script) and batched: the same
    results = await asyncio.gather(chain.call([k1], ["1", "a"], then), first.call([k1], ["0", "b"]))
    assert isinstance(results[0][1], ResponseError) and results[1] == [0, b"b"]
    assert await admin.get(k1) == b"3"


async def test_a_chained_call_nobody_waited_for_reaches_each_scripts_orphan_hook(
    bus: ScriptBus, redis_prefix: str
) -> None:
    orphans: list[tuple[str, Call, Any]] = []
    first = bus.register(FIRST, 5.0, lambda call, reply: orphans.append(("first", call, reply)))
    second = bus.register(SECOND, 5.0, lambda call, reply: orphans.append(("second", call, reply)))
    chain = bus.chain(first, second, (1,))
    k1, k2 = f"{redis_prefix}{{u}}:a", f"{redis_prefix}{{u}}:b"
    for code in ("1", "0"):
        task = asyncio.ensure_future(chain.call([k1], [code, "f"], BusCall(second, [k2], ["s"])))
        await asyncio.sleep(0)
        task.cancel()
        await first.call([k1], ["5", "after"])  # the orphan's batch was answered first
    assert orphans == [
        ("first", ([k1], ["1", "f"]), [1, b"f"]),
        ("second", ([k2], ["s"]), [1, b"s"]),
        ("first", ([k1], ["0", "f"]), [0, b"f"]),  # the second did not run
    ]


async def test_a_chain_of_another_bus_is_refused(
    bus: ScriptBus, redis_client: aioredis.Redis
) -> None:
    other = ScriptBus(redis_client)
    try:
        with pytest.raises(ValueError, match="registered on its bus"):
            bus.chain(bus.register(FIRST, 1.0), other.register(SECOND, 1.0), (1,))
    finally:
        await other.close(0)


async def test_a_ticks_calls_go_out_in_commands_of_at_most_max_calls(
    bus: ScriptBus, admin: aioredis.Redis, redis_prefix: str
) -> None:
    """Redis answers a command once all of its calls ran: a whole tick in one
    command would make every caller wait for the slowest part of it."""
    echo = bus.register("return ARGV[1]", 5.0)
    for script in bus.scripts:
        await admin.script_load(script.script)
    n = MAX_CALLS * 2 + 1
    before = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    got = await asyncio.gather(*(echo.submit([f"{redis_prefix}k"], [str(i)]) for i in range(n)))
    after = (await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert got == [str(i).encode() for i in range(n)]
    assert after - before == 3  # two full commands and the lone last call


async def test_posted_calls_hand_their_replies_to_their_callbacks(
    bus: ScriptBus, admin: aioredis.Redis, redis_prefix: str
) -> None:
    """A posted call's reply (an error as its exception) reaches its callback; one
    callback that raises costs the other calls of its command nothing."""
    incr = bus.register("return redis.call('INCR', KEYS[1])", 1.0)
    fail = bus.register("return redis.error_reply('no such luck')", 1.0)
    key = f"{redis_prefix}posted"
    got: list[Any] = []

    def broken(reply: Any) -> None:
        got.append(("broken", reply))
        raise RuntimeError("a bug in a callback")

    incr.post([key], [], broken)
    fail.post([key], [], lambda reply: got.append(("fail", reply)))
    incr.post([key], [], lambda reply: got.append(("incr", reply)))
    await bus.aclose(2.0)
    assert bus.pending == 0
    assert [name for name, _ in got] == ["broken", "fail", "incr"]
    assert got[0][1] == 1 and got[2][1] == 2
    assert isinstance(got[1][1], ResponseError) and "no such luck" in str(got[1][1])
    assert int(await admin.get(key) or 0) == 2


async def test_posted_calls_still_queued_at_close_are_told_so(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    bus = ScriptBus(redis_client)
    echo = bus.register("return ARGV[1]", 1.0)
    got: list[Any] = []
    echo.post([f"{redis_prefix}k"], ["x"], got.append)
    await bus.close(0)  # before its flush: cancelled, not lost in silence
    assert len(got) == 1 and isinstance(got[0], asyncio.CancelledError)
