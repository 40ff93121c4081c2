"""AccessWriter: lines go straight to the plain handler's stream and reach the file in
one write per flush interval, not one per line; `flush` (stopping) leaves nothing."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.logs import PlainLineHandler
from proxy.telemetry.access_log import MAX_PENDING_LINES, AccessWriter


class CountingRaw(io.RawIOBase):
    """A file that remembers each write() it was given (a system call, for a real one)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any, /) -> int:  # a buffer (typeshed: collections.abc.Buffer, 3.12)
        self.writes.append(bytes(b))
        return len(self.writes[-1])


@pytest.fixture
def raw_and_logger() -> Iterator[tuple[CountingRaw, logging.Logger]]:
    raw = CountingRaw()
    stream = io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")  # block-buffered
    logger = logging.getLogger("tests.access_writer")
    handler = PlainLineHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield raw, logger
    finally:
        logger.removeHandler(handler)


async def wait_for_writes(raw: CountingRaw) -> None:
    for _ in range(500):  # "at all", not a latency claim
        if raw.writes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the buffered lines were never flushed")


async def test_lines_written_together_reach_the_file_in_one_write(
    raw_and_logger: tuple[CountingRaw, logging.Logger],
) -> None:
    raw, logger = raw_and_logger
    writer = AccessWriter(logger, flush_interval_s=0.02)
    for n in range(5):
        writer.write(f'{{"n":{n}}}')
        await asyncio.sleep(0)  # loop rounds pass: each used to flush
    assert raw.writes == []
    await wait_for_writes(raw)
    assert raw.writes == [b"".join(b'{"n":%d}\n' % n for n in range(5))]


async def test_flush_writes_out_at_once_and_cancels_the_timer(
    raw_and_logger: tuple[CountingRaw, logging.Logger],
) -> None:
    raw, logger = raw_and_logger
    writer = AccessWriter(logger, flush_interval_s=3600)
    writer.write('{"n":1}')
    writer.flush()  # what Observer.close does when the server stops
    assert raw.writes == [b'{"n":1}\n']
    writer.write('{"n":2}')  # a new timer for the next line
    writer.flush()
    assert raw.writes == [b'{"n":1}\n', b'{"n":2}\n']


def test_without_a_loop_each_line_is_flushed(
    raw_and_logger: tuple[CountingRaw, logging.Logger],
) -> None:
    raw, logger = raw_and_logger
    writer = AccessWriter(logger)
    writer.write('{"n":1}')
    assert raw.writes == [b'{"n":1}\n']


def test_a_write_through_stream_gets_one_write_per_flush(
    raw_and_logger: tuple[CountingRaw, logging.Logger],
) -> None:
    # PYTHONUNBUFFERED (or a terminal): the stream itself writes through every line.
    raw, logger = raw_and_logger
    handler = logger.handlers[0]
    assert isinstance(handler, PlainLineHandler)
    handler.setStream(io.TextIOWrapper(io.BufferedWriter(raw), write_through=True))
    writer = AccessWriter(logger, flush_interval_s=3600)

    async def lines() -> None:
        for n in range(MAX_PENDING_LINES + 1):
            writer.write(f'{{"n":{n}}}')

    asyncio.run(lines())
    assert raw.writes == [b"".join(b'{"n":%d}\n' % n for n in range(MAX_PENDING_LINES))]
    writer.flush()
    assert raw.writes[1:] == [b'{"n":%d}\n' % MAX_PENDING_LINES]


def test_a_new_stream_gets_the_next_lines_and_the_old_one_its_own(
    raw_and_logger: tuple[CountingRaw, logging.Logger],
) -> None:
    # An operator re-points the handler (log rotation, a new stream) between two lines.
    raw, logger = raw_and_logger
    handler = logger.handlers[0]
    assert isinstance(handler, PlainLineHandler)
    writer = AccessWriter(logger, flush_interval_s=3600)
    other = CountingRaw()

    async def lines() -> None:
        writer.write('{"n":1}')
        handler.setStream(io.TextIOWrapper(io.BufferedWriter(other)))
        writer.write('{"n":2}')
        writer.flush()

    asyncio.run(lines())
    assert raw.writes == [b'{"n":1}\n']
    assert other.writes == [b'{"n":2}\n']
