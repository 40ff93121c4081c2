"""`llm-proxy serve --workers N`: N processes sharing one port (SO_REUSEPORT).

Each worker is a whole proxy: its own event loop, upstream pools, Redis client and
outbox. Nothing is shared between workers but the listening port (the kernel
spreads connections over the workers' sockets) and Redis/Kafka, so there is no
cross-process lock on the request path.

* Outbox: one SQLite file per worker. Worker 0 keeps the configured path
  (`LLM_PROXY_OUTBOX_PATH`, default data/outbox.sqlite3) so going from one process to
  several keeps draining the same file; worker i > 0 uses `<stem>-w<i><suffix>`
  (data/outbox-w1.sqlite3, ...). The JSON-lines sink (no Kafka) is split the same
  way. A file of a worker index that is no longer started is not drained: the
  supervisor warns about it at start (run once with enough workers to drain it).
* Metrics: `PROMETHEUS_MULTIPROC_DIR` is set to a fresh directory when the user did
  not set one (removed on exit); a user-given one is emptied of stale `*.db` files at
  start, as prometheus_client requires.
* Supervision: the parent forwards SIGTERM/SIGINT to every worker (each then drains
  like a single process does) and exits when they have. A worker that dies while
  the proxy is not stopping is restarted after a second; a worker that dies
  `MAX_RESTARTS` times within `RESTART_WINDOW_S` stops the whole proxy (exit 1),
  since it will most likely keep dying (port taken, broken environment).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from proxy.config.env import (
    MULTIPROC_ENV,
    OUTBOX_PATH_ENV,
    SINK_PATH_ENV,
    WORKER_ENV,
    EnvSettings,
)
from proxy.logs import setup_logging
from proxy.server.options import ServeOptions

if TYPE_CHECKING:  # the worker imports the app only after its environment is set
    from proxy.server.lifecycle import EmbeddedLedgerFactory

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
RESTART_DELAY_S = 1.0


def worker_path(path: str, index: int) -> str:
    """Worker 0 keeps `path`; worker i > 0 gets `<stem>-w<i><suffix>` beside it."""
    if index == 0:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-w{index}{p.suffix}"))


def worker_env(settings: EnvSettings, index: int) -> dict[str, str]:
    """The environment overrides that give worker `index` its own files."""
    return {
        WORKER_ENV: str(index),
        OUTBOX_PATH_ENV: worker_path(settings.outbox_path, index),
        SINK_PATH_ENV: worker_path(settings.sink_path, index),
    }


def orphaned_outboxes(outbox_path: str, workers: int) -> list[Path]:
    """Outbox files of worker indexes >= `workers`: nobody will drain them this run."""
    p = Path(outbox_path)
    found = []
    for candidate in p.parent.glob(f"{p.stem}-w*{p.suffix}"):
        index = candidate.name[len(p.stem) + 2 : len(candidate.name) - len(p.suffix)]
        if index.isdigit() and int(index) >= workers:
            found.append(candidate)
    return sorted(found)


def prepare_metrics_dir(given: str | None) -> tuple[Path, bool]:
    """The PROMETHEUS_MULTIPROC_DIR for the workers, and whether it is ours (a fresh
    one, to remove on exit). A user-given one is emptied of stale `*.db` files."""
    if given:
        d = Path(given)
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*.db"):
            stale.unlink(missing_ok=True)
        return d, False
    return Path(tempfile.mkdtemp(prefix="llm-proxy-metrics-")), True


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker if the supervisor is killed without forwarding."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child(
    index: int,
    options: ServeOptions,
    env: dict[str, str],
    embedded_ledger: EmbeddedLedgerFactory | None,
) -> None:
    # Own session: a terminal's Ctrl-C reaches the supervisor only, which forwards
    # one SIGTERM, instead of every worker getting two signals.
    os.setsid()
    _die_with_parent()
    os.environ.update(env)  # before anything reads it: the worker's own files
    setup_logging(options.log_level)
    log.info("worker %d (pid %d) starting", index, os.getpid())
    from proxy.server.serve import serve_one  # imports prometheus_client: after the env

    sys.exit(serve_one(options, reuse_port=True, embedded_ledger=embedded_ledger))


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(
        self,
        workers: int,
        start: Callable[[int], BaseProcess],
        *,
        stop_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._n = workers
        self._start = start
        self._stop_timeout = stop_timeout_s
        self._clock = clock
        self._procs: dict[int, BaseProcess] = {}
        self._deaths: dict[int, deque[float]] = {i: deque() for i in range(workers)}
        self._stopping = False
        self.exit_code = 0

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        if not self._stopping:
            log.info("signal %d: stopping %d workers", signum, len(self._procs))
        self._stopping = True
        for proc in self._procs.values():
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def run(self) -> int:
        for i in range(self._n):
            self._procs[i] = self._start(i)
        while not self._stopping:
            wait([p.sentinel for p in self._procs.values()], timeout=1.0)
            for index, proc in list(self._procs.items()):
                if proc.exitcode is not None and not self._stopping:
                    self._on_exit(index, proc)
        self._wait_all()
        return self.exit_code

    def _on_exit(self, index: int, proc: BaseProcess) -> None:
        _mark_dead(proc.pid)
        now = self._clock()
        deaths = self._deaths[index]
        deaths.append(now)
        while deaths and now - deaths[0] > RESTART_WINDOW_S:
            deaths.popleft()
        if len(deaths) >= MAX_RESTARTS:
            log.error(
                "worker %d exited (code %s) %d times within %.0f s: stopping the proxy",
                index,
                proc.exitcode,
                len(deaths),
                RESTART_WINDOW_S,
            )
            self.exit_code = 1
            self.request_stop(signal.SIGTERM)
            return
        log.warning("worker %d exited (code %s); restarting it", index, proc.exitcode)
        time.sleep(RESTART_DELAY_S)
        if not self._stopping:
            self._procs[index] = self._start(index)

    def _wait_all(self) -> None:
        deadline = self._clock() + self._stop_timeout
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - self._clock()))
        for index, proc in self._procs.items():
            if proc.exitcode is None:
                log.error("worker %d did not stop in time: killing it", index)
                proc.kill()
                proc.join()
            _mark_dead(proc.pid)


def _mark_dead(pid: int | None) -> None:
    """Let prometheus_client drop the live-gauge files of a worker that is gone."""
    if pid is None:
        return
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def run_workers(
    options: ServeOptions,
    settings: EnvSettings,
    *,
    stop_timeout_s: float,
    embedded_ledger: EmbeddedLedgerFactory | None = None,
) -> int:
    """Supervise `options.workers` worker processes until SIGTERM/SIGINT."""
    metrics_dir, own_metrics_dir = prepare_metrics_dir(settings.metrics_dir)
    for orphan in orphaned_outboxes(settings.outbox_path, options.workers):
        log.warning(
            "outbox %s belongs to a worker index not started now; its pending events "
            "are only sent once the proxy runs with enough workers again",
            orphan,
        )
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop

    def start(index: int) -> BaseProcess:
        child_env = {MULTIPROC_ENV: str(metrics_dir), **worker_env(settings, index)}
        proc = ctx.Process(
            target=_child,
            args=(index, options, child_env, embedded_ledger),
            name=f"llm-proxy-w{index}",
        )
        proc.start()
        return proc

    supervisor = Supervisor(options.workers, start, stop_timeout_s=stop_timeout_s)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    log.info(
        "serving on %s:%d with %d workers (SO_REUSEPORT)",
        options.host,
        options.port,
        options.workers,
    )
    try:
        return supervisor.run()
    finally:
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
