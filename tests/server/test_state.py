"""close_all: closers run in reverse order of registration, a failing one does not
stop the others."""

from __future__ import annotations

import asyncio

import pytest

from proxy.server.state import Closer, close_all


def recorder(log: list[str], name: str, error: BaseException | None = None) -> Closer:
    async def close() -> None:
        await asyncio.sleep(0)
        log.append(name)
        if error is not None:
            raise error

    return close


async def test_closers_run_in_reverse_order() -> None:
    log: list[str] = []
    await close_all([recorder(log, n) for n in ("pools", "redis", "http", "observer")])
    assert log == ["observer", "http", "redis", "pools"]


async def test_errors_are_swallowed_and_the_rest_still_close() -> None:
    log: list[str] = []
    closers = [
        recorder(log, "first"),
        recorder(log, "broken", RuntimeError("close failed")),
        recorder(log, "last", OSError("socket gone")),
    ]
    await close_all(closers)
    assert log == ["last", "broken", "first"]


async def test_no_closers_is_fine() -> None:
    await close_all([])


async def test_closers_may_return_values() -> None:
    async def returns_something() -> object:
        return 42

    await close_all([returns_something])


async def test_a_cancellation_is_not_swallowed() -> None:
    log: list[str] = []
    closers = [recorder(log, "first"), recorder(log, "cancelled", asyncio.CancelledError())]
    with pytest.raises(asyncio.CancelledError):
        await close_all(closers)
    assert log == ["cancelled"]


async def test_the_list_is_not_modified() -> None:
    log: list[str] = []
    closers = [recorder(log, "a"), recorder(log, "b")]
    await close_all(closers)
    assert len(closers) == 2
    await close_all(closers)
    assert log == ["b", "a", "b", "a"]
