"""Outbox and relay on a real SQLite file (tmp_path) with fake publishers."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest

from proxy.delivery.kafka import producer_config
from proxy.delivery.outbox import Outbox, OutboxClosedError, OutboxRow
from proxy.delivery.publisher import JsonLinesSink, OutboxPublisher
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


class RecordingPublisher:
    """Acknowledges everything; remembers what it was given, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list[OutboxRow]] = []
        self.sent = asyncio.Event()
        self.closed = False

    @property
    def event_ids(self) -> list[str]:
        return [r.event_id for b in self.batches for r in b]

    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        self.batches.append(list(rows))
        self.sent.set()

    async def close(self) -> None:
        self.closed = True


class FlakyPublisher(RecordingPublisher):
    """Fails the first `failures` calls, then acknowledges."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.calls = 0

    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("broker down")
        await super().send_batch(rows)


class GatedPublisher(RecordingPublisher):
    """Receives a batch, then waits for `release` before acknowledging."""

    def __init__(self) -> None:
        super().__init__()
        self.received = asyncio.Event()
        self.release = asyncio.Event()

    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        self.received.set()
        await self.release.wait()
        await super().send_batch(rows)


class HangingPublisher(RecordingPublisher):
    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        await asyncio.Event().wait()


async def opened(path: Path, **kw: object) -> Outbox:
    outbox = Outbox(path, **kw)  # type: ignore[arg-type]
    await outbox.start()
    return outbox


def rows_in_file(path: Path) -> list[tuple[str, bytes, bytes]]:
    """What is really in the file, read by an independent connection."""
    with sqlite3.connect(path) as conn:
        cur = conn.execute("SELECT event_id, key, payload FROM outbox ORDER BY seq")
        return [(e, bytes(k), bytes(p)) for e, k, p in cur]


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a condition owned by the code under test (it has no event to await)."""
    for _ in range(int(within / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"condition not met within {within}s")


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def payload(i: int) -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "credits": i})


# -- write path ---------------------------------------------------------------------


@pytest.mark.parametrize("flush_interval", [0.0, 0.005])
async def test_group_commit_batches_concurrent_puts(tmp_path: Path, flush_interval: float) -> None:
    outbox = await opened(tmp_path / "o.sqlite3", flush_interval=flush_interval)
    futures = [outbox.put_nowait(f"e{i}", b"k", payload(i)) for i in range(1000)]
    assert not any(f.done() for f in futures)
    if flush_interval:
        await asyncio.sleep(0)
        assert not any(f.done() for f in futures)  # lingering for more
        await asyncio.sleep(flush_interval * 4)
    else:
        await asyncio.sleep(0)
    # All 1000 puts of one tick were committed by one flush, together.
    assert all(f.done() and f.exception() is None for f in futures)
    assert outbox.pending_count() == 1000
    await outbox.close()
    assert len(rows_in_file(tmp_path / "o.sqlite3")) == 1000


async def test_put_is_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox = await opened(path)
    for i in range(5):
        await outbox.put_nowait(f"e{i}", f"k{i}".encode(), payload(i))
    await outbox.close()
    again = await opened(path)
    assert again.pending_count() == 5
    rows = await again.fetch_pending(100)
    assert [(r.event_id, r.key, r.payload) for r in rows] == [
        (f"e{i}", f"k{i}".encode(), payload(i)) for i in range(5)
    ]
    await again.close()


def test_acknowledged_put_survives_process_death(tmp_path: Path) -> None:
    """The process dies (no close, no checkpoint) right after put() returned."""
    path = tmp_path / "o.sqlite3"
    child = run_child(
        f"""
        import asyncio, os
        from proxy.delivery.outbox import Outbox
        async def main():
            outbox = Outbox({str(path)!r})
            await outbox.start()
            await asyncio.gather(*(outbox.put_nowait(f"e{{i}}", b"k", b"{{}}") for i in range(50)))
            os._exit(0)
        asyncio.run(main())
        """
    )
    assert child.returncode == 0, child.stderr
    assert [e for e, _, _ in rows_in_file(path)] == [f"e{i}" for i in range(50)]


async def test_repeated_event_id_is_stored_once(tmp_path: Path) -> None:
    outbox = await opened(tmp_path / "o.sqlite3")
    await outbox.put_nowait("same", b"k", b"1")
    await outbox.put_nowait("same", b"k", b"1")
    assert outbox.pending_count() == 1
    await outbox.close()
    assert len(rows_in_file(tmp_path / "o.sqlite3")) == 1


async def test_put_after_close_is_refused(tmp_path: Path) -> None:
    outbox = await opened(tmp_path / "o.sqlite3")
    await outbox.close()
    with pytest.raises(OutboxClosedError):
        await outbox.put_nowait("e", b"k", b"{}")


async def test_pending_count_and_oldest_age(tmp_path: Path) -> None:
    now = [1000.0]
    outbox = await opened(tmp_path / "o.sqlite3", clock=lambda: now[0])
    assert outbox.pending_count() == 0
    assert outbox.oldest_pending_age() is None
    await outbox.put_nowait("a", b"k", b"{}")
    now[0] = 1003.0
    await outbox.put_nowait("b", b"k", b"{}")
    now[0] = 1010.0
    assert outbox.pending_count() == 2
    assert outbox.oldest_pending_age() == pytest.approx(10.0)
    first = await outbox.fetch_pending(1)
    await outbox.delete(first)
    assert outbox.pending_count() == 1
    assert outbox.oldest_pending_age() == pytest.approx(7.0)
    await outbox.delete(await outbox.fetch_pending(10))
    assert outbox.pending_count() == 0
    assert outbox.oldest_pending_age() is None
    await outbox.close()


# -- relay --------------------------------------------------------------------------


async def test_relay_publishes_in_order_and_deletes_after_ack(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox = await opened(path)
    publisher = GatedPublisher()
    relay = OutboxPublisher(outbox, publisher, batch_size=4)
    for i in range(10):
        await outbox.put_nowait(f"e{i}", b"k", payload(i))
    relay.start()
    await asyncio.wait_for(publisher.received.wait(), 5)
    # Handed to the publisher but not acknowledged: still in the file.
    assert outbox.pending_count() == 10
    assert len(rows_in_file(path)) == 10
    publisher.release.set()
    await wait_until(lambda: outbox.pending_count() == 0)
    assert publisher.event_ids == [f"e{i}" for i in range(10)]
    assert [len(b) for b in publisher.batches] == [4, 4, 2]
    assert rows_in_file(path) == []
    assert relay.published == 10
    assert relay.publish_failed == 0
    await relay.close(1.0)


async def test_relay_wakes_on_new_commits(tmp_path: Path) -> None:
    outbox = await opened(tmp_path / "o.sqlite3")
    publisher = RecordingPublisher()
    relay = OutboxPublisher(outbox, publisher)
    relay.start()
    await asyncio.sleep(0.05)  # let the relay find nothing and go to sleep
    assert publisher.batches == []
    await outbox.put_nowait("late", b"k", b"{}")
    await wait_until(lambda: publisher.event_ids == ["late"])
    await relay.close(1.0)


async def test_publisher_failures_are_retried_with_backoff(tmp_path: Path) -> None:
    outbox = await opened(tmp_path / "o.sqlite3")
    publisher = FlakyPublisher(failures=5)
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    failed: list[int] = []
    relay = OutboxPublisher(
        outbox,
        publisher,
        backoff_initial=0.1,
        backoff_max=0.5,
        rng=random.Random(7),
        sleep=fake_sleep,
        on_failed=failed.append,
    )
    for i in range(3):
        await outbox.put_nowait(f"e{i}", b"k", b"{}")
    relay.start()
    await wait_until(lambda: outbox.pending_count() == 0)
    assert publisher.event_ids == ["e0", "e1", "e2"]  # nothing lost, sent once acked
    assert relay.publish_failed == 15 and failed == [3] * 5
    assert relay.published == 3 and relay.consecutive_failures == 0
    # Exponential (0.1, 0.2, 0.4, then capped at 0.5), each scaled by jitter in [0.5, 1).
    for delay, base in zip(delays, [0.1, 0.2, 0.4, 0.5, 0.5], strict=True):
        assert base * 0.5 <= delay < base
    await relay.close(1.0)


async def test_nothing_is_deleted_while_the_publisher_fails(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox = await opened(path)
    publisher = FlakyPublisher(failures=10**9)
    relay = OutboxPublisher(outbox, publisher, backoff_initial=0.001, backoff_max=0.002)
    for i in range(4):
        await outbox.put_nowait(f"e{i}", b"k", b"{}")
    relay.start()
    await wait_until(lambda: publisher.calls >= 5)
    assert outbox.pending_count() == 4
    await relay.close(0.05)
    assert [e for e, _, _ in rows_in_file(path)] == ["e0", "e1", "e2", "e3"]


def test_crash_between_publish_and_delete_resends_same_ids(tmp_path: Path) -> None:
    """A child publishes (records the ids) and dies before the delete; the next
    start re-sends exactly those rows with the same event ids."""
    path, sent = tmp_path / "o.sqlite3", tmp_path / "sent.txt"
    child = run_child(
        f"""
        import asyncio, os
        from proxy.delivery.outbox import Outbox
        from proxy.delivery.publisher import OutboxPublisher
        class DieAfterPublish:
            async def send_batch(self, rows):
                with open({str(sent)!r}, "w") as f:
                    f.write(",".join(r.event_id for r in rows))
                os._exit(0)  # acknowledged by the "broker", never deleted
            async def close(self):
                pass
        async def main():
            outbox = Outbox({str(path)!r})
            await outbox.start()
            for i in range(3):
                await outbox.put_nowait(f"e{{i}}", b"k", b"{{}}")
            OutboxPublisher(outbox, DieAfterPublish()).start()
            await asyncio.sleep(30)
        asyncio.run(main())
        """
    )
    assert child.returncode == 0, child.stderr
    assert sent.read_text() == "e0,e1,e2"

    async def restart() -> list[str]:
        outbox = await opened(path)
        assert outbox.pending_count() == 3
        publisher = RecordingPublisher()
        relay = OutboxPublisher(outbox, publisher)
        relay.start()
        await wait_until(lambda: outbox.pending_count() == 0)
        await relay.close(1.0)
        return publisher.event_ids

    assert asyncio.run(restart()) == ["e0", "e1", "e2"]
    assert rows_in_file(path) == []


async def test_close_drains_then_closes(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox = await opened(path)
    publisher = RecordingPublisher()
    relay = OutboxPublisher(outbox, publisher, batch_size=7)
    relay.start()
    futures = [outbox.put_nowait(f"e{i}", b"k", b"{}") for i in range(50)]
    await relay.close(5.0)  # queued, not yet committed puts are committed and sent
    assert all(f.done() and f.exception() is None for f in futures)
    assert sorted(publisher.event_ids) == sorted(f"e{i}" for i in range(50))
    assert publisher.closed
    assert rows_in_file(path) == []


async def test_close_returns_at_deadline_when_publisher_hangs(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox = await opened(path)
    relay = OutboxPublisher(outbox, HangingPublisher())
    for i in range(3):
        await outbox.put_nowait(f"e{i}", b"k", b"{}")
    relay.start()
    await asyncio.wait_for(relay.close(0.1), 10)
    assert len(rows_in_file(path)) == 3  # kept for the next start
    with pytest.raises(OutboxClosedError):
        await outbox.put_nowait("x", b"k", b"{}")


async def test_relay_drains_leftovers_at_start(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    first = await opened(path)
    for i in range(20):
        await first.put_nowait(f"e{i}", b"k", b"{}")
    await first.close()
    outbox = await opened(path)
    publisher = RecordingPublisher()
    relay = OutboxPublisher(outbox, publisher, batch_size=6)
    relay.start()
    await wait_until(lambda: outbox.pending_count() == 0)
    assert publisher.event_ids == [f"e{i}" for i in range(20)]
    await relay.close(1.0)


async def test_relay_refuses_to_start_before_its_outbox(tmp_path: Path) -> None:
    relay = OutboxPublisher(Outbox(tmp_path / "o.sqlite3"), RecordingPublisher())
    with pytest.raises(RuntimeError, match="outbox"):
        relay.start()


# -- sink ---------------------------------------------------------------------------


async def test_sink_publisher_appends_json_lines(tmp_path: Path) -> None:
    sink = tmp_path / "events" / "charges.jsonl"
    outbox = await opened(tmp_path / "o.sqlite3")
    relay = OutboxPublisher(outbox, JsonLinesSink(sink), batch_size=3)
    relay.start()
    for i in range(5):
        await outbox.put_nowait(f"e{i}", b"k", payload(i))
    await outbox.put_nowait("pretty", b"k", b'{\n  "event_id": "pretty"\n}')
    await relay.close(5.0)
    lines = sink.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every record ends with a newline
    records = [orjson.loads(line) for line in lines[:-1]]
    assert records == [{"event_id": f"e{i}", "credits": i} for i in range(5)] + [
        {"event_id": "pretty"}
    ]


# -- Kafka settings (no broker needed) ----------------------------------------------


def test_producer_config_waits_for_all_replicas() -> None:
    cfg = producer_config("b:9092", idempotent=False, compression="gzip")
    assert cfg["acks"] == "all"
    assert cfg["enable_idempotence"] is False
    assert cfg["compression_type"] == "gzip"
    with pytest.raises(ConfigError, match="compression"):
        producer_config("b:9092", idempotent=True, compression="rar")


async def test_failed_commit_is_retried_not_dropped(tmp_path: Path, monkeypatch) -> None:
    """A commit that fails (disk full) tells its waiters, and the events stay queued
    and are committed by a later attempt."""
    outbox = Outbox(tmp_path / "o.sqlite3")
    await outbox.start()
    real = outbox._db_insert
    calls = {"n": 0}

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real(rows)

    monkeypatch.setattr(outbox, "_db_insert", flaky)
    fut = outbox.put_nowait("e1", b"1", b"{}")
    with pytest.raises(sqlite3.OperationalError):
        await fut
    for _ in range(200):
        if outbox.pending_count() == 1:
            break
        await asyncio.sleep(0.01)
    assert outbox.pending_count() == 1 and outbox.queued_count() == 0
    assert calls["n"] == 2
    await outbox.close()
