"""A fast OpenAI-shaped fake upstream for benchmarks (raw asyncio protocol + uvloop).

`proxy/devtools/fake_upstream.py` is built for fault injection and counts usage with the
tokenizer on every reply; here the upstream must never be the bottleneck, so it
answers from precomputed bytes on a bare `asyncio.Protocol` (HTTP/1.1 keep-alive,
Content-Length request bodies, chunked SSE responses).

Per request, read from the JSON body (the proxy forwards unknown fields as is):
* `"stream": true` selects the SSE reply;
* `max_tokens` is the number of content chunks (default `--chunks`);
* `bench_chunk_interval_ms` the pause between chunks (default `--interval-ms`).
`stream_options.include_usage` is honoured like OpenAI does (usage-only last chunk).

Run: python -m bench.upstream --port 18100 [--chunks 200] [--interval-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import re

import orjson

USAGE = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}
REPLY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "the quick brown fox jumps over"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
)
JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: req_bench\r\n"
    b"openai-processing-ms: 1\r\nContent-Length: %d\r\n\r\n" % len(REPLY)
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nx-request-id: req_bench\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_EVENT_HEAD = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
    b'"created":1700000000,"model":"bench-model","choices":'
)
_CL_RE = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
_TOKENS_RE = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_INTERVAL_RE = re.compile(rb'"bench_chunk_interval_ms"\s*:\s*([0-9.]+)')


def _chunk(payload: bytes) -> bytes:
    """One HTTP chunk holding one SSE event."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def stream_events(chunks: int, include_usage: bool) -> list[bytes]:
    """The SSE events of one streamed reply, each already framed as an HTTP chunk."""
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
    events = [
        _EVENT_HEAD
        + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]'
        + tail
    ]
    word = b'[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]'
    events.extend(_EVENT_HEAD + word + tail for _ in range(chunks))
    events.append(_EVENT_HEAD + b'[{"index":0,"delta":{},"finish_reason":"stop"}]' + tail)
    if include_usage:
        usage = dict(USAGE, completion_tokens=chunks, total_tokens=12 + chunks)
        events.append(_EVENT_HEAD + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    return [_chunk(e) for e in events]


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, default_chunks: int, default_interval_s: float) -> None:
        self._chunks = default_chunks
        self._interval = default_interval_s
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._streaming is not None:
            self._streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._streaming is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buf[:end]
            m = _CL_RE.search(head)
            length = int(m.group(1)) if m else 0
            if len(self._buf) < end + 4 + length:
                return
            body = self._buf[end + 4 : end + 4 + length]
            self._buf = self._buf[end + 4 + length :]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        t = self._transport
        assert t is not None
        if not head.startswith(b"POST ") or b"/chat/completions" not in head[:200]:
            t.write(NOT_FOUND)
            return
        if not _STREAM_RE.search(body):
            t.write(JSON_HEAD + REPLY)
            return
        m = _TOKENS_RE.search(body)
        chunks = int(m.group(1)) if m else self._chunks
        m = _INTERVAL_RE.search(body)
        interval = float(m.group(1)) / 1000 if m else self._interval
        events = stream_events(chunks, bool(_USAGE_RE.search(body)))
        self._streaming = asyncio.get_running_loop().create_task(self._stream(events, interval))

    async def _stream(self, events: list[bytes], interval: float) -> None:
        t = self._transport
        assert t is not None
        try:
            t.write(SSE_HEAD + events[0])
            for event in events[1:]:
                if interval:
                    await asyncio.sleep(interval)
                if t.is_closing():
                    return
                t.write(event)
            t.write(b"0\r\n\r\n")
        finally:
            self._streaming = None
        if self._buf:  # a request that arrived while streaming (not expected)
            self.data_received(b"")


async def serve(host: str, port: int, chunks: int, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(chunks, interval_s), host, port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dev dependency
        runner = asyncio.run
    runner(serve(args.host, args.port, args.chunks, args.interval_ms / 1000))


if __name__ == "__main__":
    main()
