"""Processes of a benchmark run: start pinned, wait for ports, read CPU and RSS from /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cores: str | None, argv: Sequence[str]) -> list[str]:
    """`taskset -c cores argv...` (taskset execs, so the pid is the program's own)."""
    if cores is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return list(argv)
    return ["taskset", "-c", cores, *argv]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(x) for x in path.read_text().split()]
    except OSError:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live children (the workers of `serve --workers N`)."""
    total = 0.0
    for p in (pid, *children(pid)):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None
    cwd: Path = REPO  # `python -m proxy` imports the proxy found here
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, wait_s: float = 20.0) -> Proc:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd
            )
        if self.port is not None:
            wait_port(self.port, wait_s, self)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_port(port: int, wait_s: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            tail = proc.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{proc.name} exited during start-up:\n{tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {wait_s} s")


def run_json(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600) -> Any:
    """Run a load generator to completion; its last stdout line is JSON."""
    done = subprocess.run(
        argv, env=env, capture_output=True, timeout=timeout, cwd=REPO, check=False
    )
    lines = [ln for ln in done.stdout.decode().splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{argv[:6]} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return orjson.loads(lines[-1])


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
