"""Real servers started by the tests as child processes (redis-server, tansu).

`ChildServer` owns what they share: a free port, a temp dir with the log file (a
file, not a pipe nobody reads), start/stop/pause on the same port, waiting until
the server really answers, and refusing to touch a server it does not own (an
external one named by an environment variable).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent_prefix() -> list[str]:
    """Command prefix that has the kernel SIGKILL the child if pytest dies, so even a
    killed test run leaves no orphan server (setpriv is util-linux; without it the
    session teardown is the only cleanup). Not preexec_fn: unsafe with threads."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class ChildServer:
    """A server process on 127.0.0.1, or a handle on an external one (`external`)."""

    kind = "server"  # for messages
    env_var = ""  # the variable that points tests at an external server
    ready_timeout = 15.0

    def __init__(self, host: str, port: int, *, external: bool) -> None:
        self.host, self.port, self.external = host, port, external
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._paused = False

    # -- what a concrete server says ----------------------------------------------

    def command(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers."""
        self._own("start")
        if self.running:
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"{self.kind}-test-"))
        log = open(self._dir / "server.log", "ab")  # noqa: SIM115 - lives as long as the child
        try:
            self._proc = subprocess.Popen(
                [*die_with_parent_prefix(), *self.command(self._dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self._paused = False
        self._wait_ready()

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL); `start()` brings it back on the same port."""
        self._own("stop")
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self._paused:  # a stopped process would never handle SIGTERM
            proc.send_signal(signal.SIGCONT)
            self._paused = False
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing is answered."""
        self._own("pause")
        assert self._proc is not None and self._proc.poll() is None, f"{self.kind} not running"
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._own("resume")
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def ensure_up(self) -> None:
        """Undo what a previous test may have left (paused or stopped)."""
        if self.external:
            return
        if self._paused:
            self.resume()
        if not self.running:
            self.start()

    def close(self) -> None:
        if self.external:
            return
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- helpers -----------------------------------------------------------------

    def _own(self, what: str) -> None:
        if self.external:
            pytest.skip(f"cannot {what} an external {self.kind} ({self.env_var} is set)")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not self.is_ready():
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited early; log: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} not ready; log: {self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self) -> str:
        path = self.log_path
        try:
            return "" if path is None else path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""
