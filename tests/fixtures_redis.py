"""Real redis-server fixture (pytest plugin loaded from tests/conftest.py).

One redis-server per test session on a free 127.0.0.1 port, no persistence, in its
own temp dir. Set `REDIS_URL` to use an existing server instead; the tests that
stop, restart or pause the server then skip, since they must not do that to a
server they do not own. Tests isolate themselves with `redis_prefix`, never by
flushing, so a shared external server is safe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server child process, or a handle on an external server."""

    def __init__(self, url: str | None = None) -> None:
        self.external = url is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._paused = False
        if url is not None:
            self.url = url
            parts = urlsplit(url)
            self.host = parts.hostname or "127.0.0.1"
            self.port = parts.port or 6379
        else:
            self.host = "127.0.0.1"
            self.port = free_port()
            self.url = f"redis://{self.host}:{self.port}/0"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until PING answers."""
        self._own("start")
        if self.running:
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        log = open(self._dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the child
        try:
            self._proc = subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", *self._options()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self._paused = False
        self._wait_ready()

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL); `start()` brings it back."""
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
        assert self._proc is not None and self._proc.poll() is None, "server not running"
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

    def _options(self) -> list[str]:
        options = {
            "port": str(self.port),
            "bind": self.host,
            "save": "",  # no RDB snapshots: a test server needs no persistence
            "appendonly": "no",
            "daemonize": "no",  # stay our child so stop/pause/kill reach it
            "dir": str(self._dir),
        }
        return [arg for key, value in options.items() for arg in (f"--{key}", value)]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _own(self, what: str) -> None:
        if self.external:
            pytest.skip(f"cannot {what} an external Redis (REDIS_URL is set)")

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5)
        try:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited early; log: {self._log_tail()}")
                with contextlib.suppress(redis.RedisError, OSError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server not ready; log: {self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            return (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    external = os.environ.get("REDIS_URL")
    server = RedisServer(external or None)
    if not server.external:
        server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis_server.ensure_up()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_server: RedisServer) -> AsyncIterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    redis_server.ensure_up()
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    except (redis.RedisError, OSError):
        pass  # best effort: a prefix is unique, leftovers do not collide
    finally:
        await client.aclose()
