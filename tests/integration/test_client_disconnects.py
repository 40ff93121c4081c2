"""Clients that go away at random points, many at once: nothing leaks, and every
request the proxy finished is accounted exactly once.

"Nothing leaks" is checked against a baseline taken before the run: asyncio tasks,
open file descriptors of this process (client, proxy and fake upstream all live in
it), connections the fake upstream is still streaming on, and connections the
proxy's upstream pool has handed out. Idle keep-alive connections in that pool are
legitimate; each one accounts for two descriptors (both ends are in this process)
and one server task on the fake's side, and the comparison allows exactly that.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from typing import Any

import aiohttp
import orjson

from proxy.contract.outcome import Outcome
from proxy.contract.usage import UsageSource
from proxy.devtools.fake_upstream import ENCODINGS, Behaviour
from tests.fixtures_proxy import SERVICE_KEY, ProxyHarness, RecordingObserver, StartProxy

STREAMS = 240  # concurrent requests, all started together
CHUNKS = 16
SEED = 20240611
KINDS = ("complete", "after_chunks", "before_head", "json_cancel")


def open_fds() -> int:
    """Open sockets of this process. Files are left out: the outbox's checkpoint opens
    its own short-lived handle on the database file every second while it has work,
    which a count of all descriptors caught now and then (a flaky +1)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor among them)
    return count


def pool_counts(h: ProxyHarness) -> tuple[int, int]:
    """(connections handed out, idle keep-alive connections) of the upstream pool."""
    pool = h.state.upstream.pools["fake"]
    return pool.in_use, pool.idle


async def poll(predicate: Any, within: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def one_client(
    session: aiohttp.ClientSession, url: str, i: int, kind: str, rng: random.Random
) -> tuple[str, int]:
    """Run one request, leaving at the point `kind` says; returns (kind, chunks read)."""
    headers = {
        "Authorization": f"Bearer {SERVICE_KEY}",
        "X-User-Id": str(1 + i % 17),
        "X-Request-Id": f"dc-{i}",
    }
    body: dict[str, Any] = {
        "model": "smart",
        "messages": [{"role": "user", "content": f"client {i} says hello"}],
        "stream": kind != "json_cancel",
    }
    if kind in ("after_chunks", "before_head"):
        # The upstream stalls half-way and never ends by itself: only the proxy
        # closing its upstream connection ends these exchanges.
        body["x_fault"] = "stall"
    if kind in ("before_head", "json_cancel"):
        task = asyncio.ensure_future(_read_all(session, url, body, headers))
        await asyncio.sleep(rng.uniform(0, 0.4))
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return kind, -1  # left before the end (or before anything came back)
        return kind, 0  # it finished before we left
    async with session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        if kind == "complete":
            raw = await resp.read()
            assert raw.endswith(b"data: [DONE]\n\n")
            return kind, raw.count(b"\n\n")
        leave_after = rng.randint(1, CHUNKS // 2)  # the stall comes after CHUNKS // 2 + 1
        read = 0
        while read < leave_after:
            event = await resp.content.readuntil(b"\n\n")
            if not event:
                break
            read += 1
        resp.close()  # drop the connection mid-stream
        return kind, read


async def _read_all(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> bytes:
    async with session.post(url, json=body, headers=headers) as resp:
        return await resp.read()


async def test_random_disconnects_under_concurrency_leak_nothing_and_account_once(
    start_proxy: StartProxy,
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(
        behaviour=Behaviour(
            chunks=CHUNKS, chunk_delay=0.01, first_byte_delay=0.02, fault_field="x_fault"
        ),
        idle=60,  # no timeout may clean up after a client that left: the proxy must
        observer=obs,
    )
    h.fake_app[ENCODINGS].preload(["o200k_base"])
    await h.session.close()  # the harness's own client would hold connections too

    base_tasks = len(asyncio.all_tasks())
    base_fds = open_fds()
    assert pool_counts(h) == (0, 0)

    rng = random.Random(SEED)
    kinds = [KINDS[i % len(KINDS)] for i in range(STREAMS)]
    url = f"{h.url}/v1/chat/completions"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        results = await asyncio.gather(
            *(
                one_client(session, url, i, kind, random.Random(rng.random()))
                for i, kind in enumerate(kinds)
            )
        )
    finally:
        await session.close()

    # -- nothing leaks --------------------------------------------------------------
    settled = await poll(
        lambda: obs.in_flight == 0 and h.recorder.open_connections == 0 and pool_counts(h)[0] == 0,
        within=15,
    )
    assert settled, (
        f"in flight {obs.in_flight}, upstream streams open {h.recorder.open_connections}, "
        f"pool connections handed out {pool_counts(h)[0]}"
    )

    def back_to_baseline() -> bool:
        idle = pool_counts(h)[1]
        return open_fds() == base_fds + 2 * idle and len(asyncio.all_tasks()) == base_tasks + idle

    ok = await poll(back_to_baseline, within=15)
    idle = pool_counts(h)[1]
    assert ok, (
        f"fds {open_fds()} vs {base_fds} + 2*{idle} idle; "
        f"tasks {len(asyncio.all_tasks())} vs {base_tasks} + {idle}"
    )

    # -- every finished request accounted exactly once -----------------------------
    await h.flush_events()
    events = h.sink_events()
    finished = Counter(f.request_id for f in obs.finished)
    assert all(n == 1 for n in finished.values()), "a request finished twice"
    reached_upstream = {r["headers"]["X-Client-Request-Id"] for r in h.recorder.requests}
    assert reached_upstream <= finished.keys()

    charged = {f.request_id: f for f in obs.finished if f.event_id is not None}
    assert Counter(e["event_id"] for e in events).most_common(1)[0][1] == 1
    assert {e["request_id"]: e["event_id"] for e in events} == {
        rid: f.event_id for rid, f in charged.items()
    }
    for f in obs.finished:
        tokens = f.usage.total_tokens if f.usage is not None else 0
        assert (f.event_id is not None) == (tokens > 0), f

    by_kind = Counter()
    for i, (kind, read) in enumerate(results):
        rid = f"dc-{i}"
        if kind == "complete":
            f = charged[rid]
            assert (f.outcome, f.usage_source) == (Outcome.COMPLETED, UsageSource.UPSTREAM)
        elif kind == "after_chunks":
            # Tokens reached the client: charged, whatever the stream's end looked like.
            assert read >= 1 and rid in charged
            assert charged[rid].outcome in (Outcome.CLIENT_ABORTED, Outcome.COMPLETED)
        by_kind[(kind, rid in charged)] += 1
    assert by_kind[("after_chunks", True)] == STREAMS // len(KINDS)
    assert any(f.outcome is Outcome.CLIENT_ABORTED for f in obs.finished)

    # -- and the proxy still serves normally -----------------------------------------
    async with (
        aiohttp.ClientSession() as fresh,
        fresh.post(
            url,
            data=orjson.dumps({"model": "smart", "messages": [{"role": "user", "content": "x"}]}),
            headers={"Authorization": f"Bearer {SERVICE_KEY}", "X-User-Id": "1"},
        ) as resp,
    ):
        assert resp.status == 200


async def test_client_leaving_while_sending_its_body_is_an_abort_not_a_500(
    start_proxy: StartProxy,
) -> None:
    obs = RecordingObserver()
    h = await start_proxy(observer=obs)
    port = int(h.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + SERVICE_KEY.encode()
        + b'\r\nContent-Length: 1000\r\n\r\n{"model":'
    )
    await writer.drain()
    await poll(lambda: obs.in_flight == 1, within=5)  # the handler is reading the body
    writer.close()
    await writer.wait_closed()
    assert await poll(lambda: len(obs.finished) == 1, within=5)
    [f] = obs.finished
    assert (f.outcome, f.status, f.event_id) == (Outcome.CLIENT_ABORTED, 499, None)
    assert h.recorder.requests == []
