"""Real redis-server fixture (pytest plugin loaded from tests/conftest.py).

One redis-server per test session on a free 127.0.0.1 port, no persistence, in its
own temp dir. Set `REDIS_URL` to use an existing server instead; the tests that
stop, restart or pause the server then skip, since they must not do that to a
server they do not own. Tests isolate themselves with `redis_prefix`, never by
flushing, so a shared external server is safe.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis

from tests.servers import ChildServer, free_port


class RedisServer(ChildServer):
    """A redis-server child process, or a handle on an external server."""

    kind = "redis-server"
    env_var = "REDIS_URL"
    ready_timeout = 10.0

    def __init__(self, url: str | None = None) -> None:
        if url is not None:
            parts = urlsplit(url)
            super().__init__(parts.hostname or "127.0.0.1", parts.port or 6379, external=True)
            self.url = url
        else:
            super().__init__("127.0.0.1", free_port(), external=False)
            self.url = f"redis://{self.host}:{self.port}/0"

    def command(self, workdir: Path) -> list[str]:
        options = {
            "port": str(self.port),
            "bind": self.host,
            "save": "",  # no RDB snapshots: a test server needs no persistence
            "appendonly": "no",
            "daemonize": "no",  # stay our child so stop/pause/kill reach it
            "dir": str(workdir),
        }
        binary = shutil.which("redis-server") or "redis-server"
        return [binary, *(arg for key, value in options.items() for arg in (f"--{key}", value))]

    def is_ready(self) -> bool:
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()


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


async def fund(client: Any, prefix: str, *users: int, credit: int = 10**6) -> None:
    """Give `users` a credit snapshot, as the ledger's projection would after a grant:
    in guard.mode reserve a user Redis knows nothing of has no credit."""
    from proxy.contract.redis_keys import RedisKeys, encode_snapshot

    keys = RedisKeys(prefix)
    for user in users:
        await client.set(keys.snapshot(user), encode_snapshot(credit))
