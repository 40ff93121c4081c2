"""The upstream HTTP/1.1 client: one keep-alive pool per provider, streamed reads.

Why not aiohttp's ClientSession here: the proxy sends one kind of request to one
host per provider, and a ClientSession request (URL building, header multidicts,
cookie jar, tracing, redirects, payload objects, a body-writer task) was the
largest single item of the relay's CPU (bench/RESULTS.md, issue 23). This client
does only what the relay needs: the request head is pre-built per provider, the
request goes out in one write, the response is parsed by httptools (llhttp, the
parser aiohttp itself uses) straight into the response's buffer.

Failures raise aiohttp's exception classes (proxy.upstream.failures classifies
them): a connection lost before or in the middle of a response is
`ServerDisconnectedError` / `ClientPayloadError`, bytes that are not HTTP are
`InvalidUpstreamResponse`, a connect that takes too long `ConnectionTimeoutError`.
Nothing is retried here: a request whose connection breaks is the router's to
retry (proxy.upstream.router), never sent twice behind its back.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlencode, urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

# Reading is paused while this much of a response waits for its reader (a slow
# client behind a fast stream), resumed when the reader took it.
_HIGH_WATER = 256 * 1024


class InvalidUpstreamResponse(aiohttp.ClientConnectionError):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


class UpstreamResponse:
    """A response whose head arrived; its body is read with `read_any`/`iter_any`/
    `read`. `close()` (or `release()`) when done: a response not read to its end
    takes its connection down with it (a half-read connection is never reused)."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_size",
        "_waiter",
        "headers",
        "parts",
        "status",
    )

    def __init__(self, conn: _Connection, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # the whole body arrived
        self._error: BaseException | None = None
        self.status = status
        self.headers = headers
        self.parts: list[bytes] = []  # what `read()` has read so far

    @property
    def content_type(self) -> str:
        raw = self.headers.get("content-type")
        if raw is None:
            return "application/octet-stream"
        return raw.split(";", 1)[0].strip().lower()

    # -- fed by the connection ---------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None  # the connection is the pool's again (or closed)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the relay ---------------------------------------------------------------

    async def read_any(self) -> bytes:
        """What arrived since the last read (waiting for something); b"" at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._size > _HIGH_WATER and self._conn is not None:
            self._conn.resume()
        self._size = 0
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        while data := await self.read_any():
            yield data

    async def read(self) -> bytes:
        """The whole body. What was read before a failure stays in `parts`."""
        parts = self.parts
        while data := await self.read_any():
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.close()

    release = close  # read to its end, the connection went back to the pool already

    def __del__(self) -> None:
        # Dropped half-read (a path that forgot close()): never leak its connection.
        if self._conn is not None:
            self._conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight."""

    __slots__ = (
        "_head",
        "_headers",
        "_loop",
        "_parser",
        "_paused",
        "_pool",
        "_response",
        "_status",
        "idle_since",
        "lost",
        "transport",
    )

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[str, str]] = []
        self._response: UpstreamResponse | None = None
        self.lost = False
        self._paused = False
        self.idle_since = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # The connection's loop, asked once (a getpid() system call each time on 3.11).
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._response is None:
            # Bytes nobody asked for (an idle connection): not a connection to reuse.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(InvalidUpstreamResponse("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._broken(InvalidUpstreamResponse(f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        response = self._response
        if response is not None:
            self._response = None
            if self._until_close(response):
                response._finish()  # a body delimited by the end of the connection
            else:
                response._fail(aiohttp.ClientPayloadError("Response payload is not completed"))
        head = self._head
        if head is not None:
            self._head = None
            if not head.done():
                head.set_exception(aiohttp.ServerDisconnectedError())
        self._pool._lost(self)

    def pause_writing(self) -> None:  # the request is one write; nothing to pace
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers = self._headers
        self._headers = []
        if status < 200:  # 1xx: informational, the real head follows
            return
        response = UpstreamResponse(self, status, CIMultiDictProxy(CIMultiDict(headers)))
        self._response = response
        head = self._head
        self._head = None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is None:
            return  # the end of a 1xx message
        self._response = None
        keep = self._parser.should_keep_alive()
        response._finish()
        if keep and not self.lost:
            # The body's last read may have paused reading (the response holds it
            # now): the pooled connection must read again for its next request.
            self.resume()
            self._pool._put(self)
        else:
            self.close()

    # -- used by the pool and the response --------------------------------------------------

    def send(self, data: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None and self._loop is not None  # connected
        head: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        self._head = head
        self.transport.write(data)
        return head

    def usable(self, now: float, keepalive_s: float) -> bool:
        transport = self.transport
        return (
            not self.lost
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < keepalive_s
        )

    def pause(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()  # connection_lost follows and frees the slot

    def _broken(self, exc: BaseException) -> None:
        head = self._head
        self._head = None
        if head is not None and not head.done():
            head.set_exception(exc)
        response = self._response
        self._response = None
        if response is not None:
            response._fail(exc)
        self.close()

    def _until_close(self, response: UpstreamResponse) -> bool:
        """The body ends with the connection (no length, not chunked)."""
        h = response.headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "")


class ConnectionPool:
    """The keep-alive connections to one provider's host, at most `limit` open."""

    def __init__(
        self,
        base_url: str,
        *,
        limit: int,
        connect_timeout_s: float | None,
        keepalive_s: float = 30.0,
        static_headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: for an https base URL; the system's CA store by default."""
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._tls = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._tls else 80)
        self._prefix = url.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        if url.port is not None and url.port != (443 if self._tls else 80):
            host = f"{host}:{url.port}"
        lines = [f"Host: {host}", "Accept: */*"]
        for name, value in (static_headers or {}).items():
            _check_header(name, value)
            lines.append(f"{name}: {value}")
        self._static = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._limit = max(1, limit)
        self._connect_timeout = connect_timeout_s
        self._keepalive = keepalive_s
        self._ssl: ssl.SSLContext | None = None
        if self._tls:
            self._ssl = ssl_context or ssl.create_default_context()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()  # every open connection, for close()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def in_use(self) -> int:
        """Open connections with a request on them."""
        return self._open - len(self._idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        query: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        """Send one request to `path` under the base URL; returns at its response head.
        `headers` come after the pool's own (they are ours: never the caller's)."""
        target = self._prefix + path
        if query:
            target = f"{target}?{urlencode(query)}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            extra += f"Content-Length: {len(body)}\r\n"
        data = b"".join(
            (
                f"{method} {target} HTTP/1.1\r\n".encode("latin-1"),
                self._static,
                extra.encode("latin-1"),
                b"\r\n",
                body or b"",
            )
        )
        conn = await self._acquire()
        try:
            return await conn.send(data)
        except BaseException:
            conn.close()
            raise

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):  # busy ones too: their requests fail
            conn.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(aiohttp.ClientConnectionError("the pool is closed"))

    # -- connections -------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise aiohttp.ClientConnectionError("the pool is closed")
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable(now, self._keepalive):
                return conn
            conn.close()
        while self._open >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()  # pass on the slot this waiter was given
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            while idle:
                conn = idle.pop()
                if conn.usable(time.monotonic(), self._keepalive):
                    return conn
                conn.close()
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        connect = loop.create_connection(
            lambda: conn,
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._host if self._ssl is not None else None,
        )
        try:
            if self._connect_timeout is None:
                await connect
            else:
                async with asyncio.timeout(self._connect_timeout):
                    await connect
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(
                f"connecting to {self._host}:{self._port} timed out"
            ) from None
        if conn.lost:  # closed again before it could be used (e.g. during a TLS handshake)
            raise aiohttp.ServerDisconnectedError()
        self._all.add(conn)  # from here on its loss frees its slot (`_lost`)
        return conn

    def _put(self, conn: _Connection) -> None:
        """A connection whose response ended, kept alive: idle, or to a waiter."""
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake_one()

    def _lost(self, conn: _Connection) -> None:
        """A connection closed (by either side): its slot is free. One that never got
        out of `_connect` (cancelled or failed there) was counted off by `_acquire`."""
        if conn not in self._all:
            return
        self._open -= 1
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _check_header(name: str, value: str) -> None:
    if any(c in name or c in value for c in "\r\n\0"):
        raise ValueError(f"header {name!r} holds a line break or NUL")
