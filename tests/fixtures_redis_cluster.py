"""A real 3-node Redis Cluster (pytest plugin loaded from tests/conftest.py).

Three `redis-server --cluster-enabled yes` children on free 127.0.0.1 ports (each
also needs its bus port, port + 10000), joined by `redis-cli --cluster create`
with no replicas, once per session and only for the tests that ask for it.
`redis_target` runs a test on one redis-server and on the cluster (`target_client`
is a client of either).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.fixtures_redis import RedisServer
from tests.servers import free_port


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535 and _free(port + 10000):
            return port
        if port > 55535:  # ephemeral ports run high: pick from below instead
            low = 20000 + port % 20000
            if _free(low) and _free(low + 10000):
                return low


class ClusterNode(RedisServer):
    kind = "redis-cluster-node"

    def __init__(self) -> None:
        super().__init__()
        self.port = cluster_port()
        self.url = f"redis://{self.host}:{self.port}/0"

    def command(self, workdir: Path) -> list[str]:
        return [
            *super().command(workdir),
            *("--cluster-enabled", "yes"),
            *("--cluster-config-file", str(workdir / "nodes.conf")),
            *("--cluster-node-timeout", "2000"),
        ]


class RedisClusterServers:
    def __init__(self, nodes: int = 3) -> None:
        self.nodes = [ClusterNode() for _ in range(nodes)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or "redis-cli"
        addresses = [f"{n.host}:{n.port}" for n in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 30
        while not self._ok(cli):
            assert time.monotonic() < deadline, "redis cluster did not become ok"
            time.sleep(0.1)

    def _ok(self, cli: str) -> bool:
        for node in self.nodes:
            info = subprocess.run(
                [cli, "-h", node.host, "-p", str(node.port), "cluster", "info"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if "cluster_state:ok" not in info:
                return False
        return True

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli")
    servers = RedisClusterServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def cluster_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["single", "cluster"])
def redis_target(request: pytest.FixtureRequest, redis_prefix: str) -> tuple[str, bool, str]:
    """(url, is a cluster, prefix): a test taking it runs on one node and on the cluster."""
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url, False, redis_prefix
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return cluster.url, True, request.getfixturevalue("cluster_prefix")


@pytest.fixture
async def target_client(redis_target: tuple[str, bool, str]) -> Any:
    url, is_cluster, _ = redis_target
    client = RedisCluster.from_url(url) if is_cluster else aioredis.Redis.from_url(url)
    yield client
    await client.aclose()
