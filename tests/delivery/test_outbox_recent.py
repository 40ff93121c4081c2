"""The outbox's read path from memory (committed rows kept for the publisher) against
what the file really holds: for any sequence of puts (repeated ids included), reads,
deletes of published batches or of odd subsets, and reopenings, the publisher is
handed exactly the file's pending rows, in seq order, and a delete removes exactly
the rows it names."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.delivery import outbox as outbox_module
from proxy.delivery.outbox import Outbox, OutboxRow


def file_rows(path: Path) -> list[tuple[int, str, bytes, bytes]]:
    """The pending rows as an independent connection reads them."""
    with sqlite3.connect(path) as conn:
        cur = conn.execute("SELECT seq, event_id, key, payload FROM outbox ORDER BY seq")
        return [(s, e, bytes(k), bytes(p)) for s, e, k, p in cur]


def as_tuples(rows: list[OutboxRow]) -> list[tuple[int, str, bytes, bytes]]:
    return [(r.seq, r.event_id, r.key, r.payload) for r in rows]


async def put_all(outbox: Outbox, items: list[tuple[str, bytes]]) -> None:
    """One batch (one commit): every put of the same loop round."""
    await asyncio.gather(*(outbox.put_nowait(e, b"k", p) for e, p in items))


# One step: ("put", ids of one batch) | ("read+delete", how many) |
# ("delete odd", which of the pending rows) | ("reopen",)
# Mostly new ids (the normal flow, the rows kept in memory), now and then a repeat.
_ID = st.integers(0, 9).map(lambda i: "again" if i == 0 else None)
_STEP = st.one_of(
    st.tuples(st.just("put"), st.lists(_ID, min_size=1, max_size=6)),
    st.tuples(st.just("read+delete"), st.integers(1, 10)),
    st.tuples(st.just("delete odd"), st.lists(st.integers(0, 15), min_size=1, max_size=4)),
    st.tuples(st.just("reopen")),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(_STEP, max_size=14), keep=st.sampled_from([3, 20_000]))
def test_reads_and_deletes_match_the_file(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    steps: list[tuple],
    keep: int,
) -> None:
    monkeypatch.setattr(outbox_module, "_MAX_RECENT", keep)  # 3: overflow to the file
    path = tmp_path_factory.mktemp("recent") / "o.sqlite3"

    async def run() -> None:
        outbox = Outbox(path)
        await outbox.start()
        n = 0
        try:
            for step in steps:
                if step[0] == "put":
                    items = []
                    for repeat in step[1]:
                        n += 1
                        items.append((repeat or f"e{n}", f"payload {n}".encode()))
                    await put_all(outbox, items)
                elif step[0] == "read+delete":
                    rows = await outbox.fetch_pending(step[1])
                    assert as_tuples(rows) == file_rows(path)[: step[1]]
                    await outbox.delete(rows)
                elif step[0] == "delete odd":
                    pending = await outbox.fetch_pending(100)
                    chosen = [pending[i] for i in sorted(set(step[1])) if i < len(pending)]
                    await outbox.delete(chosen)
                    gone = {r.seq for r in chosen}
                    assert [r[0] for r in file_rows(path)] == [
                        r.seq for r in pending if r.seq not in gone
                    ]
                else:
                    await outbox.close()
                    outbox = Outbox(path)
                    await outbox.start()
                in_file = file_rows(path)
                assert as_tuples(await outbox.fetch_pending(100)) == in_file
                assert outbox.pending_count() == len(in_file)
                # A repeated id is stored once while it is pending.
                ids = [e for _, e, _, _ in in_file]
                assert len(ids) == len(set(ids))
        finally:
            await outbox.close()

    asyncio.run(run())


async def test_published_batches_are_read_from_memory(tmp_path: Path, monkeypatch) -> None:
    """No leftovers: the publisher's reads never query the file's payloads."""
    outbox = Outbox(tmp_path / "o.sqlite3")
    await outbox.start()
    monkeypatch.setattr(outbox, "_db_fetch", lambda limit: pytest.fail("read the file"))
    await put_all(outbox, [(f"e{i}", b"p") for i in range(5)])
    rows = await outbox.fetch_pending(3)
    assert [r.event_id for r in rows] == ["e0", "e1", "e2"]
    await outbox.delete(rows)
    assert [r[1] for r in file_rows(tmp_path / "o.sqlite3")] == ["e3", "e4"]
    assert [r.event_id for r in await outbox.fetch_pending(10)] == ["e3", "e4"]
    await outbox.close()


async def test_leftovers_are_read_from_the_file_then_memory_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "o.sqlite3"
    first = Outbox(path)
    await first.start()
    await put_all(first, [("old1", b"1"), ("old2", b"2")])
    await first.close()

    again = Outbox(path)
    await again.start()
    await put_all(again, [("new1", b"3")])
    rows = await again.fetch_pending(10)
    assert [r.event_id for r in rows] == ["old1", "old2", "new1"]  # seq order, file read
    await again.delete(rows)
    # The file is empty: what is committed from now on is read from memory.
    monkeypatch.setattr(again, "_db_fetch", lambda limit: pytest.fail("read the file"))
    await put_all(again, [("new2", b"4")])
    assert [r.event_id for r in await again.fetch_pending(10)] == ["new2"]
    assert [r[1] for r in file_rows(path)] == ["new2"]
    await again.close()


async def test_a_second_writer_on_the_file_loses_no_event(tmp_path: Path) -> None:
    """Two outboxes on one file (a misconfiguration): a seq the other took is not a
    reason to drop an event; each one's rows stay, and reads come from the file."""
    path = tmp_path / "o.sqlite3"
    a, b = Outbox(path), Outbox(path)
    await a.start()
    await b.start()
    await put_all(a, [("a1", b"1")])
    await put_all(b, [("b1", b"2")])  # b's next seq is a's: taken
    await put_all(a, [("a2", b"3")])
    assert sorted(r[1] for r in file_rows(path)) == ["a1", "a2", "b1"]
    assert [r.event_id for r in await b.fetch_pending(10)] == ["a1", "b1", "a2"]
    # a deletes two rows: as many as it committed, so by its own count the file is
    # empty, but b's rows are in it too: a keeps reading the file, nothing is missed.
    await a.delete((await a.fetch_pending(10))[:2])
    await put_all(b, [("b2", b"4")])
    assert [r.event_id for r in await a.fetch_pending(10)] == ["a2", "b2"]
    await a.close()
    await b.close()


def wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one at each restart."""
    with open(f"{path}-wal", "rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


@pytest.mark.parametrize("limit_kb, restarted", [(64, True), (64 * 1024, False)])
async def test_a_wal_past_its_limit_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit_kb: int, restarted: bool
) -> None:
    """Under steady writes SQLite never restarts the WAL by itself (the checkpoint
    beside them never catches up): past the limit the outbox restarts it, and the
    events are all still there."""
    monkeypatch.setattr(outbox_module, "_WAL_RESTART_BYTES", limit_kb * 1024)
    path = tmp_path / "o.sqlite3"
    outbox = Outbox(path, checkpoint_interval=3600)  # no periodic checkpoint meanwhile
    await outbox.start()
    for i in range(40):
        await put_all(outbox, [(f"e{i}-{j}", b"x" * 2000) for j in range(4)])
    before = wal_restarts(path)
    outbox._restart_wal()
    await put_all(outbox, [("last", b"y")])
    assert wal_restarts(path) == before + (1 if restarted else 0)
    assert len(file_rows(path)) == 161
    assert [r.event_id for r in await outbox.fetch_pending(1000)][-1] == "last"
    await outbox.close()
