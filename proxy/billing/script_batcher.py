"""Calls of one Lua script made in the same event-loop tick go out as one pipeline.

Each script stays atomic on its own (the pipeline is not a transaction); what is
shared is the round trip and the connection checkout, which redis-py makes cost
~100-200 us CPU per command (bench/bench_routing.py). A tick with one call sends
it plainly (a pipeline of one costs more). The sending is done by a task, not by
the callers: a caller that gives up (its budget, the client leaving) never
cancels the others' calls, and `on_orphan` learns the result nobody took, so
whatever it reserved can be given back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Call = tuple[list[str], list[Any]]


class ScriptBatcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        script: AsyncScript,
        timeout_s: float,
        on_orphan: Callable[[Call, Any], None] = lambda _c, _r: None,
    ) -> None:
        self._redis = redis
        self._script = script
        self._timeout = timeout_s
        self._on_orphan = on_orphan
        self._queue: list[tuple[Call, asyncio.Future[Any] | None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Calls queued or in flight (tests wait for 0)."""
        return len(self._queue) + len(self._tasks)

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue((keys, args), fut)
        return await fut  # cancelled (the caller's timeout): the result becomes an orphan

    def submit(self, keys: list[str], args: list[Any]) -> None:
        """Fire and forget (failures are the orphan's: `on_orphan(call, exception)`)."""
        self._enqueue((keys, args), None)

    def _enqueue(self, call: Call, fut: asyncio.Future[Any] | None) -> None:
        self._queue.append((call, fut))
        if len(self._queue) == 1:  # the first of this tick: one send for all of them
            task = asyncio.get_running_loop().create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        batch, self._queue = self._queue, []
        calls = [call for call, _ in batch]
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._run(calls)
        except Exception as exc:
            results = [exc] * len(calls)
        for (call, fut), result in zip(batch, results, strict=True):
            if fut is None or fut.done():
                self._on_orphan(call, result)
            elif isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _run(self, calls: list[Call]) -> list[Any]:
        script = self._script
        if len(calls) == 1:
            keys, args = calls[0]
            try:
                return [await script(keys=keys, args=args)]
            except Exception as exc:
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, NoScriptError):  # Redis lost it (restart): loads it again
                keys, args = calls[i]
                try:
                    results[i] = await script(keys=keys, args=args)
                except Exception as exc:
                    results[i] = exc
        return results

    async def close(self, wait_s: float = 2.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=wait_s)
