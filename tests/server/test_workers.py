"""`serve --workers N`: each worker's own files, orphaned outboxes, metrics
directory, and the supervisor's restart/stop policy (with fake processes)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from proxy.config import EnvSettings
from proxy.server import workers
from proxy.server.workers import (
    MAX_RESTARTS,
    Supervisor,
    orphaned_outboxes,
    prepare_metrics_dir,
    worker_env,
    worker_path,
)


def test_worker_zero_keeps_the_configured_files_and_others_get_their_own() -> None:
    assert worker_path("data/outbox.sqlite3", 0) == "data/outbox.sqlite3"
    assert worker_path("data/outbox.sqlite3", 3) == "data/outbox-w3.sqlite3"
    settings = EnvSettings.from_env({"LLM_PROXY_OUTBOX_PATH": "/var/lib/p/ob.db"})
    assert worker_env(settings, 1) == {
        "LLM_PROXY_WORKER": "1",
        "LLM_PROXY_OUTBOX_PATH": "/var/lib/p/ob-w1.db",
        "LLM_PROXY_SINK_PATH": "data/charge-events-w1.jsonl",
    }
    # What a worker reads back from that environment is its own files.
    child = EnvSettings.from_env(worker_env(settings, 2))
    assert (child.outbox_path, child.worker_index) == ("/var/lib/p/ob-w2.db", 2)


def test_outboxes_of_workers_not_started_are_reported(tmp_path: Path) -> None:
    for name in ("outbox.sqlite3", "outbox-w1.sqlite3", "outbox-w2.sqlite3", "outbox-wx.sqlite3"):
        (tmp_path / name).write_bytes(b"")
    base = str(tmp_path / "outbox.sqlite3")
    assert orphaned_outboxes(base, 2) == [tmp_path / "outbox-w2.sqlite3"]
    assert orphaned_outboxes(base, 3) == []


def test_metrics_dir_is_fresh_or_emptied_of_stale_files(tmp_path: Path) -> None:
    fresh, ours = prepare_metrics_dir(None)
    try:
        assert ours and fresh.is_dir() and not any(fresh.iterdir())
    finally:
        fresh.rmdir()
    given = tmp_path / "m"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"x")
    (given / "keep.txt").write_text("x")
    d, ours = prepare_metrics_dir(str(given))
    assert (d, ours) == (given, False)
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]


class FakeProcess:
    """What the supervisor uses of a multiprocessing process."""

    def __init__(self, pid: int, exitcode: int | None = None) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.sentinel = -1
        self.killed = False

    def join(self, timeout: float | None = None) -> None:
        return None

    def kill(self) -> None:
        self.killed = True
        self.exitcode = -9


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sentinel waits return at once, restarts do not sleep; collects SIGTERMed pids."""
    signalled: list[int] = []
    monkeypatch.setattr(workers, "wait", lambda sentinels, timeout: [])
    monkeypatch.setattr(workers.time, "sleep", lambda s: None)
    monkeypatch.setattr(workers.os, "kill", lambda pid, sig: signalled.append(pid))
    return signalled


def test_supervisor_restarts_a_dead_worker_and_stops_after_too_many_deaths(
    no_waiting: list[int],
) -> None:
    started: list[tuple[int, FakeProcess]] = []

    def start(index: int) -> FakeProcess:
        # Worker 1 dies at once, every time; worker 0 keeps running.
        proc = FakeProcess(pid=100 + len(started), exitcode=3 if index == 1 else None)
        started.append((index, proc))
        return proc

    sup = Supervisor(2, start, stop_timeout_s=1.0, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert sup.run() == 1  # gave up: the worker keeps dying
    indexes = [i for i, _ in started]
    assert indexes.count(0) == 1
    assert indexes.count(1) == MAX_RESTARTS  # the first start plus restarts, then stop
    # The surviving worker was asked to stop; killed because it never exited.
    survivor = started[0][1]
    assert survivor.pid in no_waiting and survivor.killed


def test_supervisor_forwards_stop_and_does_not_restart(no_waiting: list[int]) -> None:
    procs: list[FakeProcess] = []

    def start(index: int) -> FakeProcess:
        proc = FakeProcess(pid=200 + index)
        procs.append(proc)
        if index == 2:  # the last start asks to stop, as a SIGTERM would
            sup.request_stop(signal.SIGTERM)
        return proc

    sup = Supervisor(3, start, stop_timeout_s=1.0)  # type: ignore[arg-type]
    assert sup.run() == 0
    assert [p.pid for p in procs] == [200, 201, 202]  # nobody restarted
    assert sorted(no_waiting) == [200, 201]  # those running when the stop came
