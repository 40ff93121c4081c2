"""The upstream HTTP/1.1 client against real sockets: servers on 127.0.0.1 that
answer with exact bytes, so every framing and failure case is what the wire says."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from proxy.upstream.http_client import ConnectionPool, InvalidUpstreamResponse

Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection


@dataclass
class RawServer:
    """Reads each request (head + Content-Length body), lets `reply` write bytes."""

    reply: Reply
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.reply(request, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def ok(body: bytes, *, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Reply], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(reply: Reply) -> RawServer:
        server = await RawServer(reply).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close()


def pool_for(server: RawServer, **kw: object) -> ConnectionPool:
    return ConnectionPool(
        f"http://127.0.0.1:{server.port}/v1",
        limit=int(kw.pop("limit", 4)),  # type: ignore[call-overload]
        connect_timeout_s=1.0,
        static_headers={"Authorization": "Bearer sk-up"},
        **kw,  # type: ignore[arg-type]
    )


async def test_a_request_carries_exactly_our_head_and_body(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b'{"ok":1}', extra=b"X-Request-Id: up-1\r\n"))
        return True

    server = await serve(reply)
    pool = pool_for(server)
    up = await pool.request("POST", "/chat/completions", b'{"a":1}', {"X-Client-Request-Id": "r1"})
    assert (up.status, up.content_type, up.headers["x-request-id"]) == (
        200,
        "application/json",
        "up-1",
    )
    assert await up.read() == b'{"ok":1}'
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert sorted(lines[1:]) == sorted(
        [
            f"Host: 127.0.0.1:{server.port}".encode(),
            b"Accept: */*",
            b"Authorization: Bearer sk-up",
            b"X-Client-Request-Id: r1",
            b"Content-Length: 7",
        ]
    )
    assert body == b'{"a":1}'
    await pool.close()


async def test_keep_alive_reuses_one_connection_and_close_is_honoured(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        closing = b"last" in req
        w.write(ok(b"x", extra=b"Connection: close\r\n" if closing else b""))
        return not closing

    server = await serve(reply)
    pool = pool_for(server)
    for _ in range(5):
        up = await pool.request("POST", "/c", b"{}", {})
        assert await up.read() == b"x"
    assert server.connections == 1 and pool.idle == 1
    up = await pool.request("POST", "/c", b"last", {})
    assert await up.read() == b"x"
    await asyncio.sleep(0.05)
    assert pool.idle == 0  # `Connection: close`: not kept
    up = await pool.request("POST", "/c", b"{}", {})
    assert await up.read() == b"x"
    assert server.connections == 2
    await pool.close()


async def test_chunked_and_until_close_bodies_are_read_whole(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        if b"chunked" in req:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"data: 1\n\n", b"data: 2\n\n"):
                w.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
            w.write(b"0\r\n\r\n")
            return True
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end")
        return False  # the body ends with the connection

    server = await serve(reply)
    pool = pool_for(server)
    up = await pool.request("POST", "/s", b"chunked", {})
    chunks = [c async for c in up.iter_any()]
    assert b"".join(chunks) == b"data: 1\n\ndata: 2\n\n" and len(chunks) >= 2
    up = await pool.request("POST", "/s", b"eof", {})
    assert await up.read() == b"to the end"
    await pool.close()


async def test_informational_head_is_skipped(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real"))
        return True

    pool = pool_for(await serve(reply))
    up = await pool.request("POST", "/c", b"{}", {})
    assert (up.status, await up.read()) == (200, b"real")
    await pool.close()


async def test_connection_lost_before_the_head_is_server_disconnected(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        return False

    pool = pool_for(await serve(reply))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await pool.request("POST", "/c", b"{}", {})
    assert pool.in_use == 0
    await pool.close()


async def test_connection_lost_mid_body_is_a_payload_error_and_keeps_what_came(
    serve: Callable,
) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"partial"')
        await w.drain()
        await asyncio.sleep(0.05)
        return False

    pool = pool_for(await serve(reply))
    up = await pool.request("POST", "/c", b"{}", {})
    with pytest.raises(aiohttp.ClientPayloadError):
        await up.read()
    assert up.parts == [b'{"partial"']
    await asyncio.sleep(0)
    assert (pool.in_use, pool.idle) == (0, 0)
    await pool.close()


async def test_bytes_that_are_not_http_are_an_invalid_response(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        return True

    pool = pool_for(await serve(reply))
    with pytest.raises(InvalidUpstreamResponse):
        await pool.request("POST", "/c", b"{}", {})
    await asyncio.sleep(0.01)
    assert (pool.in_use, pool.idle) == (0, 0)
    await pool.close()


async def test_a_refused_connect_is_an_os_error_and_frees_its_slot() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = ConnectionPool(f"http://127.0.0.1:{port}", limit=1, connect_timeout_s=1.0)
    for _ in range(3):  # the one slot comes back every time
        with pytest.raises(OSError):
            await pool.request("POST", "/c", b"{}", {})
    assert pool.in_use == 0
    await pool.close()


async def test_the_limit_bounds_open_connections_and_waiters_get_freed_ones(
    serve: Callable,
) -> None:
    gate = asyncio.Event()

    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        await gate.wait()
        w.write(ok(b"x"))
        return True

    server = await serve(reply)
    pool = pool_for(server, limit=2)

    async def one() -> bytes:
        up = await pool.request("POST", "/c", b"{}", {})
        return await up.read()

    tasks = [asyncio.create_task(one()) for _ in range(6)]
    await asyncio.sleep(0.1)
    assert server.connections == 2 and pool.in_use == 2
    gate.set()
    assert await asyncio.gather(*tasks) == [b"x"] * 6
    assert server.connections == 2  # the waiters reused the two
    await pool.close()


async def test_a_cancelled_waiter_passes_its_slot_on(serve: Callable) -> None:
    gate = asyncio.Event()

    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        await gate.wait()
        w.write(ok(b"x"))
        return True

    pool = pool_for(await serve(reply), limit=1)
    first = asyncio.create_task(pool.request("POST", "/c", b"{}", {}))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(pool.request("POST", "/c", b"{}", {}))
    third = asyncio.create_task(pool.request("POST", "/c", b"{}", {}))
    await asyncio.sleep(0.05)
    waiting.cancel()
    gate.set()
    assert await (await first).read() == b"x"
    assert await (await third).read() == b"x"
    await pool.close()


async def test_a_slow_reader_pauses_the_socket_and_gets_every_byte(serve: Callable) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB

    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(body))
        await w.drain()
        return True

    pool = pool_for(await serve(reply))
    up = await pool.request("POST", "/c", b"{}", {})
    got = []
    while data := await up.read_any():
        got.append(data)
        await asyncio.sleep(0.001)
    assert b"".join(got) == body
    assert pool.idle == 1  # read to its end: reusable
    await pool.close()


async def test_a_half_read_response_closed_takes_its_connection_down(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await w.drain()
        return True

    server = await serve(reply)
    pool = pool_for(server)
    up = await pool.request("POST", "/c", b"{}", {})
    assert await up.read_any() == b"abc"
    up.close()
    await asyncio.sleep(0.05)
    assert (pool.in_use, pool.idle) == (0, 0)
    await pool.close()


async def test_an_idle_connection_past_keepalive_is_not_reused(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"x"))
        return True

    server = await serve(reply)
    pool = pool_for(server, keepalive_s=0.05)
    assert await (await pool.request("POST", "/c", b"{}", {})).read() == b"x"
    await asyncio.sleep(0.1)
    assert await (await pool.request("POST", "/c", b"{}", {})).read() == b"x"
    assert server.connections == 2
    await pool.close()


async def test_an_idle_connection_the_server_closed_is_dropped(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"x"))
        return False  # closes right after answering

    server = await serve(reply)
    pool = pool_for(server)
    assert await (await pool.request("POST", "/c", b"{}", {})).read() == b"x"
    await asyncio.sleep(0.05)
    assert pool.idle == 0
    assert await (await pool.request("POST", "/c", b"{}", {})).read() == b"x"
    await pool.close()


async def test_closing_the_pool_fails_a_request_in_flight(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(3600)
        return False

    pool = pool_for(await serve(reply))
    pending = asyncio.create_task(pool.request("POST", "/c", b"{}", {}))
    await asyncio.sleep(0.05)
    await pool.close()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await pending
    with pytest.raises(aiohttp.ClientConnectionError):
        await pool.request("POST", "/c", b"{}", {})


async def test_query_and_method_of_a_bodyless_call(serve: Callable) -> None:
    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"{}"))
        return True

    server = await serve(reply)
    pool = pool_for(server)
    up = await pool.request("GET", "/responses/r_1", None, {}, {"model": "a b", "n": "1"})
    await up.read()
    first = server.requests[0].split(b"\r\n")
    assert first[0] == b"GET /v1/responses/r_1?model=a+b&n=1 HTTP/1.1"
    assert not any(line.lower().startswith(b"content-length") for line in first)
    await pool.close()


@pytest.mark.parametrize(
    ("base", "host"),
    [
        ("http://example.test", "example.test"),
        ("http://example.test:80/v1", "example.test"),
        ("https://example.test:8443/v1", "example.test:8443"),
        ("http://[::1]:9000", "[::1]:9000"),
    ],
)
def test_host_header_follows_the_base_url(base: str, host: str) -> None:
    pool = ConnectionPool(base, limit=1, connect_timeout_s=None)
    assert pool._static.startswith(f"Host: {host}\r\n".encode())


def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        ConnectionPool(
            "http://x", limit=1, connect_timeout_s=None, static_headers={"A": "b\r\nEvil: 1"}
        )


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its key."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_goes_over_tls_and_checks_the_certificate(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    raw = RawServer(lambda req, w: _reply_ok(w))
    raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0, ssl=server_ctx)
    raw.port = raw.server.sockets[0].getsockname()[1]
    base = f"https://127.0.0.1:{raw.port}/v1"
    trusting = ConnectionPool(
        base, limit=1, connect_timeout_s=2, ssl_context=ssl.create_default_context(cafile=cert)
    )
    up = await trusting.request("POST", "/c", b"{}", {})
    assert (up.status, await up.read()) == (200, b"tls")
    await trusting.close()
    default = ConnectionPool(base, limit=1, connect_timeout_s=2)  # the system's CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        await default.request("POST", "/c", b"{}", {})
    assert default.in_use == 0
    await default.close()
    await raw.close()


async def _reply_ok(w: asyncio.StreamWriter) -> bool:
    w.write(ok(b"tls"))
    return True


async def test_a_connect_past_its_bound_is_a_connection_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()

    async def never(*_: object, **__: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(loop, "create_connection", never)
    pool = ConnectionPool("http://127.0.0.1:9", limit=1, connect_timeout_s=0.05)
    with pytest.raises(aiohttp.ConnectionTimeoutError):
        await pool.request("POST", "/c", b"{}", {})
    assert pool.in_use == 0  # the slot is free again
    await pool.close()


@pytest.mark.parametrize("then", ["cancelled", "returns"])
async def test_a_connection_lost_while_connecting_is_counted_once(
    monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The transport made and closed inside `create_connection` (a cancelled connect,
    a server hanging up at once): the slot comes back exactly once."""
    loop = asyncio.get_running_loop()

    class Transport(asyncio.Transport):
        def close(self) -> None:
            pass

        def is_closing(self) -> bool:
            return True

    async def connect_then_lose(factory: Callable[[], asyncio.Protocol], *_: object, **__: object):  # type: ignore[no-untyped-def]
        proto = factory()
        transport = Transport()
        proto.connection_made(transport)
        proto.connection_lost(None)
        if then == "cancelled":
            raise asyncio.CancelledError
        return transport, proto

    monkeypatch.setattr(loop, "create_connection", connect_then_lose)
    pool = ConnectionPool("http://127.0.0.1:9", limit=2, connect_timeout_s=1.0)
    for _ in range(3):
        with pytest.raises((asyncio.CancelledError, aiohttp.ServerDisconnectedError)):
            await pool.request("POST", "/c", b"{}", {})
        assert (pool._open, pool.in_use, pool.idle) == (0, 0, 0)
    await pool.close()


async def test_a_connection_paused_by_a_big_unread_body_is_reusable(serve: Callable) -> None:
    """The whole body arrives (past the pause mark) before the reader looks: the
    connection goes back to the pool reading again, and serves the next request."""
    body = b"x" * (300 * 1024)  # past the mark; the end arrives with the read crossing it

    async def reply(req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(body))
        return True

    server = await serve(reply)
    pool = pool_for(server)
    up = await pool.request("POST", "/c", b"{}", {})
    await asyncio.sleep(0.3)  # everything arrives, nobody reads
    assert await up.read() == body
    second = await asyncio.wait_for(pool.request("POST", "/c", b"{}", {}), 2)
    assert await second.read() == body
    assert server.connections == 1
    await pool.close()
